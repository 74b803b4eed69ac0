"""k-fold cross-validation: one model per fold with the same recipe, and out-of-fold probabilities
for every image (what flowers.label_issues reads).

    python -m flowers.crossval --folds 5 [train.py flags]
    python -m flowers.crossval --resume outputs/cv-NAME     # continue; finished folds are kept

The images are dealt into K folds, stratified by class, seeded (--seed) and group-aware
(near-duplicate photos share a fold). Writes <output-dir>/<run-name> (default cv-<timestamp>):
fold-1 ... fold-K, ordinary run folders whose checkpoints record their fold, all in the group
<run-name> (python -m flowers.compare --group <run-name> --output-dir <that folder>);
crossval.json, each fold's and the mean and standard deviation of the validation accuracy; and
oof.csv, one row per image: path (relative to --data), label, one probability column per class,
from the fold model that did not train on it (its last/ weights: the end of the same recipe, not
an epoch chosen on those images). SIGINT/SIGTERM stop as in train.py; --resume continues the
interrupted fold exactly and skips finished ones.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import signal
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flowers import checkpoint
from flowers.cli import run
from flowers.config import CrossvalConfig, TrainConfig, from_dict, parse, to_dict
from flowers.errors import UserError

CONFIG_FILE = "crossval.yaml"
SUMMARY_FILE = "crossval.json"
OOF_FILE = "oof.csv"
FOLD_PREDICTIONS = "oof-fold.json"  # in each fold's run folder, written once its training has finished


def fold_dir(cv_dir: Path, number: int) -> Path:
    return cv_dir / f"fold-{number}"


def fold_config(cfg: CrossvalConfig, cv_dir: Path, number: int) -> TrainConfig:
    """train.py's config for fold `number`: the cross-validation's recipe, in its folder, its group."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    values.update(output_dir=str(cv_dir), run_name=fold_dir(cv_dir, number).name, resume=None, config=None,
                  group=cfg.group or cv_dir.name)
    return from_dict(TrainConfig, values, source=f"{cv_dir}/{CONFIG_FILE}")


def open_crossval(cfg: CrossvalConfig) -> tuple[CrossvalConfig, Path]:
    """The cross-validation folder and its config: a new one (its config saved), or with --resume
    the one named (its saved config wins, but for the runtime options of this command line)."""
    if cfg.resume:
        cv_dir = _find(cfg.resume, cfg.output_dir)
        from flowers.resume import RUNTIME_OPTIONS
        saved = yaml.safe_load((cv_dir / CONFIG_FILE).read_text())
        values = {**saved, **{k: getattr(cfg, k) for k in RUNTIME_OPTIONS}, "output_dir": str(cv_dir.parent),
                  "run_name": cv_dir.name, "resume": None, "config": None}
        return from_dict(CrossvalConfig, values, source=f"{cv_dir}/{CONFIG_FILE}"), cv_dir
    name = cfg.run_name or "cv-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    cv_dir = Path(cfg.output_dir) / name
    try:
        cv_dir.mkdir(parents=True)
    except FileExistsError:
        raise UserError(f"{cv_dir} already exists; continue it with --resume {cv_dir}, or choose another "
                        "--run-name") from None
    cfg = dataclasses.replace(cfg, run_name=name)
    checkpoint.write_file_atomic(cv_dir / CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    return cfg, cv_dir


def _find(resume: str, output_dir: str) -> Path:
    if resume == "latest":
        found = sorted(Path(output_dir).glob(f"*/{CONFIG_FILE}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"--resume: no cross-validation under {output_dir}/ (pass its folder: --resume DIR)")
        return found[-1].parent
    cv_dir = Path(resume).expanduser()
    if not (cv_dir / CONFIG_FILE).is_file():
        raise UserError(f"--resume {resume}: not a cross-validation folder (no {CONFIG_FILE})")
    return cv_dir


def train_fold(cfg: CrossvalConfig, cv_dir: Path, number: int) -> Path:
    """Train fold `number`, or continue it from its last/ (fit says when it had already finished)."""
    from flowers.training import fit
    train_cfg, folder = fold_config(cfg, cv_dir, number), fold_dir(cv_dir, number)
    if (folder / "last" / checkpoint.META_FILE).is_file():
        return fit(dataclasses.replace(train_cfg, resume=str(folder), init_from=None))
    return fit(train_cfg, fold=(number, cfg.folds))


def predict_fold(folder: Path, workers: int) -> dict[str, Any]:
    """The fold's last/ weights on its validation images: relative paths, labels, probabilities,
    and the class names."""
    import torch
    from flowers.data import LoaderOptions, default_workers, image_paths, load_splits, make_loader, \
        recorded_split, with_transform
    from flowers.engine import evaluate
    from flowers.loading import load_model
    from flowers.runtime import make_accelerator
    from flowers.transforms import eval_transform

    model, meta = load_model(folder / "last")
    data, train_cfg = meta["data"], meta["config"]
    splits = load_splits(data["source"], float(data["val_split"]), int(data["split_seed"]), False,
                         data.get("val_from"), recorded_split(data))
    accelerator = make_accelerator(int(data["split_seed"]))
    norm, size = meta["normalization"], int(meta["image_size"])
    options = LoaderOptions(workers=workers if workers >= 0 else default_workers(1, accelerator.device.type),
                            device_type=accelerator.device.type, image_size=size)
    loader = make_loader(with_transform(splits.val, eval_transform(size, norm["mean"], norm["std"])),
                         int(train_cfg.get("batch_size", 32)), shuffle=False, options=options)
    channels_last = bool(train_cfg.get("channels_last", True))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, loader = accelerator.prepare(model, loader)
    out = evaluate(accelerator, model, loader, desc=f"{folder.name} out-of-fold", channels_last=channels_last)
    labels = np.asarray(splits.val.select_columns("label")[:]["label"])
    if not np.array_equal(labels, out.labels):
        raise UserError(f"{folder}: an image of its validation fold no longer decodes; out-of-fold "
                        "probabilities need every image (fix or remove it, and run the fold again)")
    probs = torch.softmax(torch.from_numpy(out.scores).double(), dim=1).numpy()
    root = Path(splits.source)
    return {"paths": [str(Path(p).relative_to(root)) for p in image_paths(splits.val)],
            "labels": labels.tolist(), "probabilities": probs.tolist(), "class_names": splits.class_names,
            "source": splits.source, "accuracy": float((probs.argmax(1) == labels).mean())}


def fold_predictions(cfg: CrossvalConfig, cv_dir: Path, number: int) -> dict[str, Any]:
    """Fold `number`'s out-of-fold predictions: read back when the fold has finished (it is not
    trained again), else after training (or continuing) it; written atomically."""
    folder = fold_dir(cv_dir, number)
    saved = folder / FOLD_PREDICTIONS
    if saved.is_file():
        print(f"crossval: fold {number}/{cfg.folds} has finished (kept)", flush=True)
        return json.loads(saved.read_text())
    print(f"crossval: fold {number}/{cfg.folds}", flush=True)
    train_fold(cfg, cv_dir, number)
    predictions = predict_fold(folder, cfg.workers)
    checkpoint.write_file_atomic(saved, json.dumps(predictions).encode())
    return predictions


def summarise(folds: list[dict[str, Any]], cv_dir: Path) -> dict[str, Any]:
    """Mean and standard deviation of the folds' validation accuracies (crossval.json), and oof.csv."""
    accuracies = [f["accuracy"] for f in folds]
    summary = {"folds": len(folds), "val_accuracy": accuracies, "mean_val_accuracy": float(np.mean(accuracies)),
               "std_val_accuracy": float(np.std(accuracies, ddof=1)), "images": sum(len(f["paths"]) for f in folds),
               "source": folds[0]["source"], "class_names": folds[0]["class_names"],
               "weights": "last/ of each fold (out-of-fold predictions come from the same weights)"}
    checkpoint.write_file_atomic(cv_dir / SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    checkpoint.write_file_atomic(cv_dir / OOF_FILE, oof_table(folds).encode())
    return summary


def oof_table(folds: list[dict[str, Any]]) -> str:
    """oof.csv: path, label, one probability per class; rows sorted by path."""
    names = folds[0]["class_names"]
    rows = sorted((path, names[label], probs) for f in folds
                  for path, label, probs in zip(f["paths"], f["labels"], f["probabilities"]))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "label", *names])
    writer.writerows([path, label, *(f"{p:.8f}" for p in probs)] for path, label, probs in rows)
    return text.getvalue()


def read_oof(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """oof.csv as (paths, label ids, probabilities (n, classes), class names)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][2:]
    paths = [r[0] for r in rows[1:]]
    labels = np.array([names.index(r[1]) for r in rows[1:]], dtype=np.int64)
    probs = np.array([[float(x) for x in r[2:]] for r in rows[1:]], dtype=np.float64).reshape(len(paths), len(names))
    return paths, labels, probs, names


def crossval(cfg: CrossvalConfig) -> dict[str, Any]:
    """Train and predict each fold in turn (finished folds kept), then summarise. A signal stops it
    as train.py stops: the fold in training saves last/; run again with --resume."""
    from flowers.resume import StopOnSignal
    cfg, cv_dir = open_crossval(cfg)
    folds = []
    with StopOnSignal() as stop:
        for number in range(1, cfg.folds + 1):
            try:
                folds.append(fold_predictions(cfg, cv_dir, number))
            except SystemExit as e:  # a signal stopped the fold's training (it saved last/)
                _say_how_to_resume(cv_dir)
                raise e
            if stop.signum is not None and number < cfg.folds:
                print(f"{signal.Signals(stop.signum).name}: fold {number} has finished; stopping", flush=True)
                _say_how_to_resume(cv_dir)
                raise SystemExit(128 + stop.signum)
    summary = summarise(folds, cv_dir)
    print(f"crossval: val_acc {summary['mean_val_accuracy']:.2%} mean, {summary['std_val_accuracy']:.2%} std over "
          f"{cfg.folds} folds ({', '.join(f'{a:.2%}' for a in summary['val_accuracy'])}); out-of-fold "
          f"probabilities in {cv_dir / OOF_FILE}", flush=True)
    return summary


def _say_how_to_resume(cv_dir: Path) -> None:
    print(f"continue the cross-validation with:\n  python -m flowers.crossval --resume {cv_dir}", flush=True)


def main() -> None:
    crossval(parse(CrossvalConfig, description=__doc__))


if __name__ == "__main__":
    run(main)

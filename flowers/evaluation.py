"""eval.py's work: rebuild a checkpoint's model and data split, evaluate, report.

Every process evaluates its shard; the gathered scores are in dataset order on the main process,
which computes the metrics and writes `<run>/eval-<ckpt>-<split>/`: results.json,
predictions.csv, confusion_matrix.png and mistakes.png.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Image, concatenate_datasets

from flowers import checkpoint, report
from flowers.config import EvalConfig
from flowers.data import default_workers, full_dataset, image_paths, load_splits, make_loader, with_transform
from flowers.datacheck import warn_about_data
from flowers.engine import EvalOutput, evaluate
from flowers.errors import UserError
from flowers.imagefiles import load_rgb
from flowers.metrics import compute_metrics
from flowers.runtime import make_accelerator
from flowers.transforms import eval_transform


def _select_images(cfg: EvalConfig, meta: dict) -> tuple[Dataset, list[Dataset], list[str], str, str]:
    """(images to evaluate, every image of the source for the data checks, class names, split, source)."""
    data = meta["data"]
    source = cfg.data or data["source"]
    split = cfg.split or ("all" if cfg.data else "val")
    if cfg.data and split == "all":
        dataset, names = full_dataset(cfg.data, cfg.strict)
        return dataset, [dataset], names, split, source
    splits = load_splits(source, float(data["val_split"]), int(data["split_seed"]), cfg.strict)
    chosen = {"val": splits.val, "train": splits.train}.get(split)
    if chosen is None:
        chosen = concatenate_datasets([splits.train, splits.val])
    return chosen, [splits.train, splits.val], splits.class_names, split, source


def _report_dir(ckpt_dir: Path, cfg: EvalConfig, split: str) -> Path:
    data_tag = f"-{Path(cfg.data).expanduser().resolve().name}" if cfg.data else ""
    return ckpt_dir.parent / f"eval-{ckpt_dir.name}{data_tag}-{split}"


def _probabilities(scores: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(scores).double(), dim=1).numpy()


def _write_predictions(path: Path, files: list[str], out: EvalOutput, probs: np.ndarray,
                       class_names: list[str]) -> None:
    """One row per image (none when `files` is empty)."""
    predicted = probs.argmax(axis=1)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "true", "predicted", "confidence", "correct"])
        for file, label, pred, p in zip(files, out.labels, predicted, probs.max(axis=1)):
            writer.writerow([file, class_names[label], class_names[pred], f"{p:.4f}", int(label == pred)])


def confident_mistakes(out: EvalOutput, probs: np.ndarray, limit: int) -> list[int]:
    """Indices of wrongly classified examples, most confident first."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != out.labels)
    return wrong[np.argsort(-probs[wrong].max(axis=1), kind="stable")][:limit].tolist()


def _mistake_rows(files: list[str], out: EvalOutput, probs: np.ndarray,
                  class_names: list[str], limit: int) -> list[dict]:
    rows = []
    for i in confident_mistakes(out, probs, limit):
        pred = int(probs[i].argmax())
        rows.append({"index": i, "file": files[i], "true": class_names[out.labels[i]],
                     "predicted": class_names[pred], "confidence": float(probs[i, pred])})
    return rows


def _plot_mistakes(dataset: Dataset, rows: list[dict], title: str, path: Path) -> None:
    undecoded = dataset.cast_column("image", Image(decode=False))
    images, captions = [], []
    for row in rows:
        image = load_rgb(undecoded[row["index"]]["image"])
        image.thumbnail((320, 320))
        images.append(image)
        captions.append(f"true: {row['true']}\npredicted: {row['predicted']} ({row['confidence']:.0%})\n"
                        f"{Path(row['file']).name}")
    report.plot_mistakes(images, captions, title, path)


def run_eval(cfg: EvalConfig) -> dict:
    ckpt_dir = checkpoint.resolve(cfg.ckpt, cfg.output_dir)
    model, meta = checkpoint.load_model(ckpt_dir)
    train_cfg = meta.get("config", {})
    accelerator = make_accelerator(int(meta["data"]["split_seed"]))
    class_names = list(meta["class_names"])

    with accelerator.main_process_first():
        dataset, all_parts, names, split, source = _select_images(cfg, meta)
    if names != class_names:
        raise UserError(f"classes in {source} ({', '.join(names)}) do not match the checkpoint's "
                        f"({', '.join(class_names)})")
    warn_about_data(accelerator, all_parts, class_names)

    norm = meta["normalization"]
    transform = eval_transform(int(meta["image_size"]), norm["mean"], norm["std"])
    on_gpu = accelerator.device.type == "cuda"
    workers = cfg.workers if cfg.workers >= 0 else default_workers(accelerator.num_processes, on_gpu)
    loader = make_loader(with_transform(dataset, transform), cfg.batch_size or int(train_cfg.get("batch_size", 32)),
                         shuffle=False, workers=workers, on_gpu=on_gpu)
    channels_last = bool(train_cfg.get("channels_last", True))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, loader = accelerator.prepare(model, loader)
    out = evaluate(accelerator, model, loader, desc=f"eval {split}", channels_last=channels_last)
    metrics = compute_metrics(out.scores, out.labels, len(class_names), top_k=cfg.top_k, losses=out.losses)
    result = {"checkpoint": str(ckpt_dir), "data": source, "split": split, "epoch": meta.get("epoch"),
              "class_names": class_names, "processes": accelerator.num_processes,
              "seconds": out.seconds, "images_per_s": len(out.labels) / out.seconds if out.seconds else None,
              "metrics": metrics}

    report_dir = _report_dir(ckpt_dir, cfg, split)
    if accelerator.is_main_process:
        _write_report(report_dir, result, dataset, out, meta, cfg)
        accelerator.print(f"results written to {report_dir}")
    accelerator.wait_for_everyone()
    return result


def _write_report(report_dir: Path, result: dict, dataset: Dataset, out: EvalOutput, meta: dict,
                  cfg: EvalConfig) -> None:
    metrics, class_names, split = result["metrics"], result["class_names"], result["split"]
    files = [path or f"#{i}" for i, path in enumerate(image_paths(dataset))]
    probs = _probabilities(out.scores)
    labels = np.asarray(dataset.select_columns("label")[:]["label"])
    in_order = len(labels) == len(out.labels) and np.array_equal(labels, out.labels)
    if not in_order:  # an image that stopped decoding was dropped from its batch: rows no longer line up
        print("warning: some images were skipped while evaluating; predictions.csv and mistakes.png are left empty")
        files = []
    result["mistakes"] = _mistake_rows(files, out, probs, class_names, cfg.mistakes) if in_order else []
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "results.json").write_text(json.dumps(result, indent=2))
    _write_predictions(report_dir / "predictions.csv", files, out, probs, class_names)
    title = f"{split}: {metrics['num_samples']} images, accuracy {metrics['accuracy']:.1%}"
    report.plot_confusion(metrics["confusion_matrix"], class_names, title, report_dir / "confusion_matrix.png")
    _plot_mistakes(dataset, result["mistakes"], f"most confidently wrong ({split})", report_dir / "mistakes.png")

    print(f"checkpoint: {result['checkpoint']} (epoch {result['epoch']})  data: {result['data']} ({split})")
    print(report.metrics_table(metrics, class_names))
    print(f"{metrics['num_samples']} images in {result['seconds']:.1f}s ({result['images_per_s']:.1f} img/s, "
          f"{result['processes']} process(es))")
    recorded = meta.get("metrics", {}).get("val_accuracy")
    if split == "val" and not cfg.data and recorded is not None:
        same = "matches" if abs(recorded - metrics["accuracy"]) < 1e-9 else "DIFFERS FROM"
        print(f"{same} the accuracy recorded at training time: {recorded:.2%}")

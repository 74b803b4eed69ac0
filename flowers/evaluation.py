"""eval.py's work: rebuild a checkpoint's model and data split, evaluate, report.

Every process evaluates its shard; the gathered scores are in dataset order on the main process,
which computes the metrics and writes `<run>/eval-<ckpt>-<split>/`: results.json,
predictions.csv, confusion_matrix.png, mistakes.png, reliability.png and risk_coverage.png.
The probabilities reported are softmax(scores / T) with the checkpoint's temperature T
(1 when it has none); `--calibrate` first fits T on the evaluated images and records it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Image, concatenate_datasets

from flowers import calibration, checkpoint, report
from flowers.config import EvalConfig
from flowers.data import (AUTO, LoaderOptions, SplitOptions, recorded_split, default_workers, full_dataset, image_paths, load_splits, make_loader,
                          with_transform)
from flowers.datacheck import warn_about_data
from flowers.engine import EvalOutput, evaluate
from flowers.errors import UserError
from flowers.imagefiles import load_rgb
from flowers.loading import load_model
from flowers.model import DEFAULT_ARCH, check_eval_size
from flowers.metrics import compute_metrics
from flowers.runtime import has_gpu, make_accelerator
from flowers.transforms import eval_transform


def _select_images(cfg: EvalConfig, meta: dict) -> tuple[Dataset, list[Dataset], list[str], str, str, list]:
    """(images to evaluate, every image of the source for the data checks, class names, split, source,
    the near-duplicate groups of the split as absolute paths)."""
    data = meta["data"]
    source = cfg.data or data["source"]
    split = cfg.split or ("all" if cfg.data else "val")
    if cfg.data and split == "all":
        dataset, names = full_dataset(cfg.data, cfg.strict)
        return dataset, [dataset], names, split, source, []
    # the training run's validation split: its source's own (recorded as val_from), or held out of
    # train (checkpoints without val_from were all split that way); other data: its own, if any
    val_from = AUTO if cfg.data else data.get("val_from")
    # the run's groups, exclusions, new labels and fold (none for other data: its plain split)
    options = SplitOptions(groups=[]) if cfg.data else recorded_split(data)
    splits = load_splits(source, float(data["val_split"]), int(data["split_seed"]), cfg.strict, val_from, options)
    chosen = {"val": splits.val, "train": splits.train}.get(split)
    if chosen is None:
        chosen = concatenate_datasets([splits.train, splits.val])
    return chosen, [splits.train, splits.val], splits.class_names, split, source, splits.group_paths()


def _report_dir(ckpt_dir: Path, cfg: EvalConfig, split: str, meta: dict) -> Path:
    """<run>/eval-<ckpt>[-<data>]-<split>[-tta-<tta>][-<size>]: TTA or another size never
    overwrites the plain report."""
    data_tag = f"-{Path(cfg.data).expanduser().resolve().name}" if cfg.data else ""
    name = ckpt_dir.name.removesuffix(".old")  # best.old: read while a save swapped it (checkpoint._readable)
    tta_tag = f"-tta-{cfg.tta}" if cfg.tta != "none" else ""
    size = eval_crop(cfg, meta)
    size_tag = f"-{size}" if size != int(meta["image_size"]) else ""
    return ckpt_dir.parent / f"eval-{name}{data_tag}-{split}{tta_tag}{size_tag}"


def eval_crop(cfg: EvalConfig, meta: dict) -> int:
    """The centre crop evaluated: --eval-size, else the size the checkpoint was trained at."""
    return cfg.eval_size or int(meta["image_size"])


def is_plain(cfg: EvalConfig, meta: dict) -> bool:
    """The evaluation that training recorded an accuracy for: at the trained size, with the TTA its
    validation used (--val-tta; none for checkpoints from before it)."""
    return cfg.tta == recorded_tta(meta) and eval_crop(cfg, meta) == int(meta["image_size"])


def recorded_tta(meta: dict) -> str:
    return meta.get("config", {}).get("val_tta", "none")


def setting_label(tta: str, size: int) -> str:
    """How a result's evaluation setting is labelled in tables and titles, e.g. "TTA: flip, 160 px"."""
    return f"TTA: {tta}, {size} px"


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
    check_eval_size(checkpoint.load_meta(ckpt_dir).get("arch") or DEFAULT_ARCH, cfg.eval_size)
    model, meta = load_model(ckpt_dir)
    train_cfg = meta.get("config", {})
    accelerator = make_accelerator(int(meta["data"]["split_seed"]), mixed_precision=eval_precision(cfg, meta))
    class_names = list(meta["class_names"])

    with accelerator.main_process_first():
        dataset, all_parts, names, split, source, groups = _select_images(cfg, meta)
    if names != class_names:
        raise UserError(f"classes in {source} ({', '.join(names)}) do not match the checkpoint's "
                        f"({', '.join(class_names)})")
    warn_about_data(accelerator, all_parts, class_names, near_duplicates=groups)

    norm = meta["normalization"]
    size = eval_crop(cfg, meta)
    transform = eval_transform(size, norm["mean"], norm["std"])
    device_type = accelerator.device.type
    workers = cfg.workers if cfg.workers >= 0 else default_workers(accelerator.num_processes, device_type)
    loader = make_loader(with_transform(dataset, transform), cfg.batch_size or int(train_cfg.get("batch_size", 32)),
                         shuffle=False, options=LoaderOptions(workers=workers, device_type=device_type, image_size=size))
    channels_last = bool(train_cfg.get("channels_last", True))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, loader = accelerator.prepare(model, loader)
    out = evaluate(accelerator, model, loader, desc=f"eval {split}", channels_last=channels_last, tta=cfg.tta)
    metrics = compute_metrics(out.scores, out.labels, len(class_names), top_k=cfg.top_k, losses=out.losses)
    if cfg.calibrate:  # every process holds the gathered scores; one writes
        record = calibration.fitted_record(out.scores, out.labels, eval_size=size, tta=cfg.tta, split=split)
        if accelerator.is_main_process:
            checkpoint.update_meta(ckpt_dir, record)
            accelerator.print(f"temperature {record['temperature']:.4f} fitted on {len(out.labels)} images "
                              f"({setting_label(cfg.tta, size)}) and written to {ckpt_dir / checkpoint.META_FILE}")
            if "warning" in record["calibration"]:
                accelerator.print(f"warning: {record['calibration']['warning']}")
        meta = {**meta, **record}
    mismatch = calibration.setting_mismatch(meta, eval_size=size, tta=cfg.tta)
    if mismatch:
        accelerator.print(mismatch)
    result = {"checkpoint": str(ckpt_dir), "data": source, "split": split, "epoch": meta.get("epoch"),
              "class_names": class_names, "processes": accelerator.num_processes,
              "mixed_precision": accelerator.mixed_precision, "tta": cfg.tta, "eval_size": size,
              "seconds": out.seconds, "images_per_s": len(out.labels) / out.seconds if out.seconds else None,
              "metrics": metrics,
              "calibration": {**calibration.summarize(out.scores, out.labels, temperature=meta.get("temperature", 1.0)),
                              "fitted": meta.get("calibration") if "temperature" in meta else None}}

    report_dir = _report_dir(ckpt_dir, cfg, split, meta)
    if accelerator.is_main_process:
        _write_report(report_dir, result, dataset, out, meta, cfg)
        accelerator.print(f"results written to {report_dir}")
    accelerator.wait_for_everyone()
    return result


def _write_report(report_dir: Path, result: dict, dataset: Dataset, out: EvalOutput, meta: dict,
                  cfg: EvalConfig) -> None:
    metrics, class_names, split = result["metrics"], result["class_names"], result["split"]
    files = [path or f"#{i}" for i, path in enumerate(image_paths(dataset))]
    probs = calibration.scaled_probabilities(out.scores, result["calibration"]["temperature"])
    labels = np.asarray(dataset.select_columns("label")[:]["label"])
    in_order = len(labels) == len(out.labels) and np.array_equal(labels, out.labels)
    if not in_order:  # an image that stopped decoding was dropped from its batch: rows no longer line up
        print("warning: some images were skipped while evaluating; predictions.csv and mistakes.png are left empty")
        files = []
    result["mistakes"] = _mistake_rows(files, out, probs, class_names, cfg.mistakes) if in_order else []
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "results.json").write_text(json.dumps(result, indent=2))
    _write_predictions(report_dir / "predictions.csv", files, out, probs, class_names)
    label = setting_label(result["tta"], result["eval_size"])
    title = f"{split} ({label}): {metrics['num_samples']} images, accuracy {metrics['accuracy']:.1%}"
    report.plot_confusion(metrics["confusion_matrix"], class_names, title, report_dir / "confusion_matrix.png")
    _plot_mistakes(dataset, result["mistakes"], f"most confidently wrong ({split})", report_dir / "mistakes.png")
    _plot_calibration(report_dir, result, out, probs, label)

    print(f"checkpoint: {result['checkpoint']} (epoch {result['epoch']})  data: {result['data']} ({split})")
    print(label)
    print(report.metrics_table(metrics, class_names))
    print(report.calibration_lines(result["calibration"], result["calibration"]["fitted"]))
    print(f"{metrics['num_samples']} images in {result['seconds']:.1f}s ({result['images_per_s']:.1f} img/s, "
          f"{result['processes']} process(es))")
    recorded = meta.get("metrics", {}).get("val_accuracy")
    if split == "val" and not cfg.data and recorded is not None:
        if is_plain(cfg, meta):
            print(recorded_accuracy_verdict(recorded, metrics["accuracy"], metrics["num_samples"],
                                            _recorded_precision(meta), result["mixed_precision"]))
        else:
            print(f"accuracy with {label}: {metrics['accuracy']:.2%}; the accuracy recorded at training time, "
                  f"{recorded:.2%}, is for {setting_label(recorded_tta(meta), int(meta['image_size']))}")


def _plot_calibration(report_dir: Path, result: dict, out: EvalOutput, probs: np.ndarray, label: str) -> None:
    """reliability.png (before, and after the checkpoint's temperature) and risk_coverage.png."""
    cal, split = result["calibration"], result["split"]
    t = cal["temperature"]
    scaled = cal["reliability"] if t != 1.0 else None
    title = (f"{split} ({label}): ECE {cal['ece_uncalibrated']:.3f}"
             + (f", {cal['ece']:.3f} at T = {t:.2f}" if scaled else ""))
    report.plot_reliability(cal["reliability_uncalibrated"], title, report_dir / "reliability.png", scaled=scaled)
    coverage, accuracy = calibration.risk_coverage_curve(probs, out.labels)
    report.plot_risk_coverage(coverage, accuracy, cal["risk_coverage"], f"{split} ({label}), T = {t:.2f}",
                              report_dir / "risk_coverage.png")


def _recorded_precision(meta: dict) -> str:
    return (meta.get("environment") or {}).get("mixed_precision") or "no"


def eval_precision(cfg: EvalConfig, meta: dict) -> str:
    """--mixed-precision, else the launcher's (`accelerate launch --mixed_precision`), else the
    checkpoint's own when this machine has the kind of device it was trained on (a GPU-trained
    bf16 checkpoint on a CPU runs in fp32 instead: on CPUs without native bf16 it is many times slower)."""
    if cfg.mixed_precision:
        return cfg.mixed_precision
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    trained_on_cpu = str((meta.get("environment") or {}).get("device", "cpu")).startswith("cpu")
    return _recorded_precision(meta) if trained_on_cpu == (not has_gpu()) else "no"


def precision_name(mixed_precision: str) -> str:
    """How a precision reads in a sentence: Accelerate's "no" is fp32."""
    return "fp32" if mixed_precision in ("no", None, "") else mixed_precision


def mixed_precision_tolerance(num_images: int) -> int:
    """Images whose verdict may flip between precisions: bf16/fp16 round the logits, and images the
    model scores nearly even between two classes can change sides (an image or two of 570)."""
    return max(2, math.ceil(0.005 * num_images))


def recorded_accuracy_verdict(recorded: float, accuracy: float, num_images: int, recorded_precision: str,
                              precision: str) -> str:
    """Compare with the accuracy training recorded: to the image when neither side used mixed
    precision; within mixed_precision_tolerance() images when one did."""
    differing = round(abs(recorded - accuracy) * num_images)
    where = f"{recorded:.2%}, trained in {precision_name(recorded_precision)}; evaluated in {precision_name(precision)}"
    if differing == 0:
        return (f"matches the accuracy recorded at training time: {recorded:.2%} "
                f"(evaluated in {precision_name(precision)})")
    tolerance = mixed_precision_tolerance(num_images)
    if "no" != recorded_precision or "no" != precision:
        if differing <= tolerance:
            return (f"agrees with the accuracy recorded at training time within {differing} image(s) ({where}; "
                    f"mixed precision may move up to {tolerance} borderline images)")
    return f"DIFFERS FROM the accuracy recorded at training time by {differing} image(s) ({where})"

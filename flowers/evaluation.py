"""eval.py's work: rebuild a checkpoint's model and data split, evaluate, report."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flowers import checkpoint
from flowers.config import EvalConfig
from flowers.data import default_workers, full_dataset, load_splits, make_loader, with_transform
from flowers.engine import evaluate
from flowers.errors import UserError
from flowers.metrics import compute_metrics
from flowers.runtime import make_accelerator
from flowers.transforms import eval_transform


def run_eval(cfg: EvalConfig) -> dict:
    ckpt_dir = checkpoint.resolve(cfg.ckpt, cfg.output_dir)
    model, meta = checkpoint.load_model(ckpt_dir)
    train_cfg = meta.get("config", {})
    accelerator = make_accelerator(int(meta["data"]["split_seed"]))
    class_names = list(meta["class_names"])

    if cfg.data:
        with accelerator.main_process_first():
            dataset, names = full_dataset(cfg.data, cfg.strict)
        split_name, source = "all", cfg.data
    else:
        data = meta["data"]
        with accelerator.main_process_first():
            splits = load_splits(data["source"], float(data["val_split"]), int(data["split_seed"]), cfg.strict)
        dataset, names, split_name, source = splits.val, splits.class_names, "val", data["source"]
    if names != class_names:
        raise UserError(f"classes in {source} ({', '.join(names)}) do not match the checkpoint's "
                        f"({', '.join(class_names)})")

    norm = meta["normalization"]
    transform = eval_transform(int(meta["image_size"]), norm["mean"], norm["std"])
    on_gpu = accelerator.device.type == "cuda"
    workers = cfg.workers if cfg.workers >= 0 else default_workers(accelerator.num_processes, on_gpu)
    loader = make_loader(with_transform(dataset, transform), cfg.batch_size or int(train_cfg.get("batch_size", 32)),
                         shuffle=False, workers=workers, pin_memory=on_gpu)
    channels_last = bool(train_cfg.get("channels_last", True))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, loader = accelerator.prepare(model, loader)
    out = evaluate(accelerator, model, loader, desc=f"eval {split_name}", channels_last=channels_last)
    metrics = compute_metrics(out.scores, out.labels, len(class_names))
    metrics["loss"] = out.loss
    result = {"checkpoint": str(ckpt_dir), "data": source, "split": split_name, "epoch": meta.get("epoch"),
              "seconds": out.seconds, "images_per_s": len(out.labels) / out.seconds if out.seconds else None,
              "metrics": metrics}

    recorded = meta.get("metrics", {}).get("val_accuracy")
    report_dir = ckpt_dir.parent / f"eval-{ckpt_dir.name}-{split_name}"
    if accelerator.is_main_process:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "results.json").write_text(json.dumps(result, indent=2))
        accelerator.print(f"checkpoint: {ckpt_dir} (epoch {meta.get('epoch')})")
        accelerator.print(f"{split_name}: {metrics['num_samples']} images  accuracy {metrics['accuracy']:.2%}  "
                          f"loss {metrics['loss']:.4f}  macro_f1 {metrics['macro_f1']:.4f}  "
                          f"({result['images_per_s']:.1f} img/s)")
        if split_name == "val" and recorded is not None:
            same = "matches" if abs(recorded - metrics["accuracy"]) < 1e-9 else "DIFFERS FROM"
            accelerator.print(f"{same} the accuracy recorded at training time: {recorded:.2%}")
        accelerator.print(f"results written to {report_dir}")
    return result

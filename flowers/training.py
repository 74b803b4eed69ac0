"""The training run: data + model -> epochs of train/evaluate -> checkpoints and tracking."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn

from flowers import checkpoint, tracking
from flowers.config import TrainConfig, to_dict
from flowers.data import Splits, default_workers, load_splits, make_loader, resolve_data, with_transform
from flowers.engine import EpochStats, evaluate, train_one_epoch
from flowers.metrics import compute_metrics
from flowers.model import ARCH, build_model, initial_state
from flowers.optim import build_optimizer, build_scheduler
from flowers.runtime import environment, make_accelerator
from flowers.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_size, eval_transform, train_transform


def _run_name(accelerator: Accelerator, cfg: TrainConfig) -> str:
    """The same run name on every process (a timestamp from the main process by default)."""
    name = [cfg.run_name or dt.datetime.now().strftime("%Y%m%d-%H%M%S")]
    broadcast_object_list(name)
    return name[0]


def checkpoint_meta(cfg: TrainConfig, splits: Splits, run_name: str, epoch: int, step: int,
                    metrics: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to use a checkpoint on its own (see checkpoint.py)."""
    return {
        "format_version": 1,
        "arch": ARCH,
        "num_classes": len(splits.class_names),
        "class_names": splits.class_names,
        "image_size": cfg.image_size,
        "eval_resize": eval_size(cfg.image_size),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "data": {"source": splits.source, "split_seed": cfg.seed, "val_split": cfg.val_split,
                 "train_size": len(splits.train), "val_size": len(splits.val)},
        "run_name": run_name,
        "epoch": epoch,
        "global_step": step,
        "metrics": metrics,
        "config": to_dict(cfg),
        "environment": env,
        "saved_at": dt.datetime.now().isoformat(timespec="seconds"),
    }


def _summary_line(epoch: int, epochs: int, train: EpochStats, val: dict[str, Any], lr: float,
                  seconds: float, is_best: bool) -> str:
    return (f"epoch {epoch}/{epochs}  train_loss {train.loss:.4f}  train_acc {train.accuracy:.2%}  "
            f"val_loss {val['loss']:.4f}  val_acc {val['accuracy']:.2%}  lr {lr:.2e}  "
            f"{train.images_per_s:.1f} img/s  {seconds:.1f}s" + ("  *best*" if is_best else ""))


def fit(cfg: TrainConfig) -> Path:
    """Train as configured; returns the run folder holding best/ and last/."""
    switched_offline = tracking.prepare_wandb_mode(cfg.report_to)
    accelerator = make_accelerator(cfg.seed, cfg.grad_accum_steps, tracking.tracker_names(cfg.report_to))
    set_seed(cfg.seed)
    init_state = initial_state(cfg.weights)  # before the data: a missing download fails at once
    with accelerator.main_process_first():  # the main process downloads/caches, the others reuse
        splits = load_splits(resolve_data(cfg.data), cfg.val_split, cfg.seed, cfg.strict)
    run_name = _run_name(accelerator, cfg)
    run_dir = Path(cfg.output_dir) / run_name
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    accelerator.print(f"data: {splits.source}  classes: {', '.join(splits.class_names)}  "
                      f"train {len(splits.train)} / val {len(splits.val)} images  "
                      f"processes: {accelerator.num_processes}  device: {accelerator.device}  "
                      f"precision: {accelerator.mixed_precision}")

    model = build_model(len(splits.class_names), init_state)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model.parameters())
    on_gpu = accelerator.device.type == "cuda"
    workers = cfg.workers if cfg.workers >= 0 else default_workers(accelerator.num_processes, on_gpu)
    # drop_last: a last batch of one image would crash BatchNorm in training mode
    train_loader = make_loader(with_transform(splits.train, train_transform(cfg.image_size)), cfg.batch_size,
                               shuffle=True, workers=workers, pin_memory=on_gpu,
                               drop_last=len(splits.train) > cfg.batch_size * accelerator.num_processes)
    val_loader = make_loader(with_transform(splits.val, eval_transform(cfg.image_size)), cfg.batch_size,
                             shuffle=False, workers=workers, pin_memory=on_gpu)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    accelerator.register_for_checkpointing(scheduler)
    loss_fn = nn.CrossEntropyLoss()
    env = environment(accelerator, model)

    if switched_offline:
        accelerator.print("W&B: no API key configured, logging offline; upload later with "
                          f"`wandb sync {run_dir}/wandb/offline-run-*`")
    tracking.start(accelerator, cfg.report_to, cfg.wandb_project, run_name, run_dir, to_dict(cfg))

    best_accuracy = -1.0
    for epoch in range(1, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(accelerator, model, train_loader, optimizer, scheduler, loss_fn,
                                desc=f"epoch {epoch}/{cfg.epochs}", channels_last=cfg.channels_last)
        out = evaluate(accelerator, model, val_loader, desc="validate", channels_last=cfg.channels_last)
        val = compute_metrics(out.scores, out.labels, len(splits.class_names))
        val["loss"] = out.loss
        is_best = val["accuracy"] > best_accuracy
        best_accuracy = max(best_accuracy, val["accuracy"])
        epoch_metrics = {
            "train_loss": train.loss, "train_accuracy": train.accuracy, "val_loss": val["loss"],
            "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"], "lr": lr,
            "epoch_time_s": train.seconds + out.seconds, "images_per_s": train.images_per_s,
            "train_samples": train.samples,
        }
        if accelerator.is_main_process:
            state = accelerator.unwrap_model(model).state_dict()
            meta = checkpoint_meta(cfg, splits, run_name, epoch, epoch * steps_per_epoch,
                                   {**epoch_metrics, "val": val}, env)
            checkpoint.save_checkpoint(run_dir / "last", state, meta)
            if is_best:
                checkpoint.save_checkpoint(run_dir / "best", state, meta)
        accelerator.log({**epoch_metrics, "epoch": epoch}, step=epoch)
        accelerator.print(_summary_line(epoch, cfg.epochs, train, val, lr, epoch_metrics["epoch_time_s"], is_best))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"best val_acc {best_accuracy:.2%}; checkpoints in {run_dir}/ "
                      f"(evaluate: python eval.py --ckpt best --output-dir {cfg.output_dir})")
    if splits.skipped:
        accelerator.print(f"warning: {len(splits.skipped)} unusable image file(s) were skipped (listed at the start)")
    return run_dir

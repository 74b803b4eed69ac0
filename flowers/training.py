"""The training run: data + model -> epochs of train/evaluate -> checkpoints and tracking."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
import signal
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from flowers import checkpoint, tracking
from flowers.config import TrainConfig, to_dict
from flowers.data import AUTO, Splits, build_loaders, load_splits, resized_splits, resolve_data
from flowers.datacheck import warn_about_data
from flowers.errors import UserError
from flowers.engine import EpochStats, evaluate, train_one_epoch
from flowers.model import build_model, initial_state
from flowers.nonfinite import NonFiniteGuard, check_validation_loss
from flowers.optim import build_optimizer, build_scheduler
from flowers.recipe import EarlyStopping, WeightEMA, make_batch_transform, make_loss, parameter_groups
from flowers.resume import (Progress, StopOnSignal, append_history, epoch_loader, find_run, load_init_weights,
                            load_last, resolve_init, resumed_config, trim_history)
from flowers.resume import save_last as save_last_state
from flowers.runtime import environment, make_accelerator
from flowers.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_size


def _create_run_dir(accelerator: Accelerator, cfg: TrainConfig) -> Path:
    """The new run's folder, created on the main process and its name shared with every process.

    An explicit --run-name that exists is refused (nothing of that run is overwritten); a default
    timestamp name that exists (two runs started in the same second) gets a -2, -3, ... suffix.
    mkdir without exist_ok claims a name atomically, so two runs never share a folder."""
    result: list = [None]
    if accelerator.is_main_process:
        output_dir = Path(cfg.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        base = cfg.run_name or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        for attempt in range(1, 1000):
            name = base if attempt == 1 else f"{base}-{attempt}"
            try:
                (output_dir / name).mkdir()
                result[0] = name
                break
            except FileExistsError:
                if cfg.run_name:
                    result[0] = UserError(f"--run-name {cfg.run_name}: {output_dir / name} already exists; continue "
                                          f"that run with --resume {output_dir / name}, or choose another name")
                    break
    broadcast_object_list(result)  # an error too: every process raises it, none waits for the others
    if isinstance(result[0], Exception):
        raise result[0]
    return Path(cfg.output_dir) / result[0]


def checkpoint_meta(cfg: TrainConfig, splits: Splits, run_name: str, epoch: int, step: int,
                    metrics: dict[str, Any], env: dict[str, Any], shuffle_seed: int) -> dict[str, Any]:
    """Everything needed to use a checkpoint on its own (see checkpoint.py)."""
    return {
        "format_version": 1,
        "arch": cfg.arch,
        "num_classes": len(splits.class_names),
        "class_names": splits.class_names,
        "image_size": cfg.image_size,
        "eval_resize": eval_size(cfg.image_size),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "data": {"source": splits.source, "split_seed": cfg.seed, "val_split": cfg.val_split,
                 "train_size": len(splits.train), "val_size": len(splits.val), "shuffle_seed": shuffle_seed,
                 "val_from": splits.val_from},
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
    """Train as configured (or continue an interrupted run); returns the run folder holding
    best/ and last/ (and ema/ with --ema-decay)."""
    resume_dir = None
    if cfg.resume:
        resume_dir = find_run(cfg.resume, cfg.output_dir)
        cfg = resumed_config(cfg, resume_dir)
    init_path = resolve_init(cfg.init_from, cfg.output_dir) if cfg.init_from else None
    if init_path:
        cfg = dataclasses.replace(cfg, init_from=str(init_path))
    switched_offline = tracking.prepare_wandb_mode(cfg.report_to)
    saved_meta = checkpoint.load_meta(resume_dir / "last") if resume_dir else {}
    shuffle_seed = saved_meta.get("data", {}).get("shuffle_seed", cfg.seed) if resume_dir else data_order_seed(cfg.seed)
    accelerator = make_accelerator(shuffle_seed, cfg.grad_accum_steps, tracking.tracker_names(cfg.report_to),
                                   project_dir=cfg.output_dir, compile=cfg.compile)
    if resume_dir:
        check_same_process_count(saved_meta, accelerator.num_processes, resume_dir)
    set_seed(cfg.seed)
    # Per-node work (downloads, caches) is done by each node's local main process first; the
    # node's other processes then reuse it. Resuming restores the weights from last/, and
    # --init-from loads its own, so then the initial ones are not needed.
    with accelerator.local_main_process_first():
        init_state = initial_state("none" if resume_dir or init_path else cfg.weights, cfg.arch)
        # a resumed run keeps its validation split (runs saved before val_from was recorded split train)
        val_from = saved_meta.get("data", {}).get("val_from") if resume_dir else AUTO
        splits = load_splits(resolve_data(cfg.data), cfg.val_split, cfg.seed, cfg.strict, val_from)
        training_splits = resized_splits(splits, eval_size(cfg.image_size)) if cfg.cache_resized else splits
    warn_about_data(accelerator, [splits.train, splits.val], splits.class_names)  # the original files
    splits = training_splits
    run_dir = resume_dir or _create_run_dir(accelerator, cfg)
    run_name = run_dir.name
    if accelerator.is_main_process and not resume_dir:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    accelerator.print(f"data: {splits.source}  classes: {', '.join(splits.class_names)}  "
                      f"train {len(splits.train)} / val {len(splits.val)} images  "
                      f"processes: {accelerator.num_processes}  device: {accelerator.device}  "
                      f"precision: {accelerator.mixed_precision}")

    model = build_model(len(splits.class_names), init_state, dropout=cfg.dropout, arch=cfg.arch)
    if resume_dir:
        init_info = saved_meta.get("init_from")
    else:
        init_info = load_init_weights(model, init_path, splits.class_names) if init_path else None
    # Dropout masks and MixUp/CutMix draws come from the global RNG: each process needs its own
    # stream (the split, initial weights, data order and augmentation do not use it).
    seed_process_rng(cfg.seed, accelerator.process_index)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, parameter_groups(cfg, model))
    # the EMA copies the plain model, before it is wrapped for DDP or compiled
    ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    train_loader, val_loader, _ = build_loaders(cfg, splits, accelerator.num_processes, accelerator.device.type)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if ema is not None:
        ema.to(accelerator.device)

    def plain_model() -> torch.nn.Module:
        """The model without its DDP and torch.compile wrappers: the keys every checkpoint holds."""
        return accelerator.unwrap_model(model, keep_torch_compile=False)

    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    env = environment(accelerator, model)
    progress, stopper = Progress(), EarlyStopping(cfg.early_stopping_patience)
    accelerator.register_for_checkpointing(scheduler, progress, stopper, *([ema] if ema else []))
    totals = torch.zeros(3, device=accelerator.device, dtype=torch.float32)
    if resume_dir:
        load_last(accelerator, run_dir, progress, totals)
        if accelerator.is_main_process:
            trim_history(run_dir, progress.epoch)
        accelerator.print(f"resuming {run_dir} after epoch {progress.epoch}/{cfg.epochs}"
                          + (f" and {progress.batches_done} batches of the next" if progress.batches_done else ""))
        if progress.finished or progress.epoch >= cfg.epochs:
            accelerator.print(f"{run_dir} has already finished; nothing to do "
                              f"(train further with --init-from {run_dir / 'last'})")
            return run_dir

    resolved = {**to_dict(cfg), "data": splits.source, "run_name": run_name}
    info = tracking.run_info(resolved, splits.source, splits.class_names, len(splits.train), len(splits.val), env)
    tracking.start(accelerator, cfg.report_to, cfg.wandb_project, run_name, run_dir, info, tags=cfg.tags,
                   group=cfg.group, name_given=cfg.run_name is not None, switched_offline=switched_offline,
                   resume_run_id=tracking.stored_run_id(run_dir) if resume_dir else None)
    predictions: dict[str, Any] = {}  # validation outputs of the best (and the last) epoch, for tracking

    def meta(metrics: dict) -> dict:
        return {**checkpoint_meta(cfg, splits, run_name, progress.epoch, progress.global_step, metrics, env,
                                  shuffle_seed),
                "init_from": init_info}

    def save_last() -> None:
        save_last_state(accelerator, run_dir, progress, totals, lambda: plain_model().state_dict(),
                        meta(progress.last_metrics))

    loss_fn = make_loss(cfg)
    mix = make_batch_transform(cfg, len(splits.class_names))
    guard = NonFiniteGuard(accelerator, cfg.on_nan, run_dir)
    with StopOnSignal() as stop:
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            loader = epoch_loader(train_loader, epoch - 1, progress.batches_done)
            last_batch = progress.batches_done + len(loader) - 1
            guard.start_epoch(epoch, last_batch + 1)

            def on_step(step: int, stepped: bool) -> bool:
                """After each batch: count optimizer steps, update the EMA, save/stop when asked."""
                if not accelerator.sync_gradients:
                    return False
                progress.batches_done = step + 1
                if stepped:
                    progress.global_step += 1
                    if ema is not None:
                        ema.update(plain_model(), distributed=accelerator.num_processes > 1)
                if step == last_batch:  # the epoch's own save follows
                    return False
                stopping = stop.requested(accelerator, step)
                if stopping or (stepped and cfg.save_every_steps and progress.global_step % cfg.save_every_steps == 0):
                    guard.check()  # never save weights a NaN has reached
                    save_last()
                return stopping

            if progress.batches_done == 0:
                progress.epoch_lr = optimizer.param_groups[-1]["lr"]
                totals.zero_()  # this epoch's sums (an epoch resumed midway continues the saved ones)
            train = train_one_epoch(accelerator, model, loader, optimizer, scheduler, loss_fn,
                                    desc=f"epoch {epoch}/{cfg.epochs}", channels_last=cfg.channels_last,
                                    on_step=on_step, batch_transform=mix, totals=totals,
                                    start_step=progress.batches_done, guard=guard)
            if progress.batches_done <= last_batch:  # on_step stopped the epoch early: a signal
                _exit_interrupted(accelerator, stop.signum, run_dir, epoch, progress.batches_done, last_batch + 1)
            should_stop = _end_epoch(accelerator, cfg, splits, run_dir, model, val_loader, ema, progress, stopper,
                                     train, progress.epoch_lr, epoch, meta, save_last, predictions, plain_model)
            if guard.epoch_summary():
                accelerator.print(guard.epoch_summary())
            if stop.requested(accelerator) and not progress.finished:
                _exit_interrupted(accelerator, stop.signum, run_dir, epoch, 0, 0)
            if should_stop:
                accelerator.print(f"early stopping: no better val_acc for {cfg.early_stopping_patience} epochs")
                break
    # the best epoch's predictions; the last epoch's when the best one ran before a resume
    shown_epoch, shown = predictions.get("best") or predictions["last"]
    tracking.finish(accelerator, run_dir, splits.class_names, splits.val, shown.scores, shown.labels,
                    shown_epoch, progress.epoch)
    accelerator.print(f"best val_acc {progress.best_accuracy:.2%}; checkpoints in {run_dir}/ "
                      f"(evaluate: python eval.py --ckpt best --output-dir {cfg.output_dir})")
    if splits.skipped:
        accelerator.print(f"warning: {len(splits.skipped)} unusable image file(s) were skipped (listed at the start)")
    return run_dir


def data_order_seed(seed: int) -> int:
    """The seed of the shuffle order (Accelerate's seedable sampler draws epoch e's order from
    data_seed + e). Hashed, so that the orders of seeds s and s + 1 are not the same ones shifted by
    an epoch, as they were when the run seed was used directly (runs saved then keep theirs)."""
    return int.from_bytes(hashlib.sha256(f"flowers data order {seed}".encode()).digest()[:4], "little")


def seed_process_rng(seed: int, process_index: int) -> None:
    """The global RNG stream of this process: the run seed's own on the first process (a
    one-process run draws what it always drew), a seed derived from (seed, process) on the others."""
    if process_index > 0:
        set_seed(int.from_bytes(hashlib.sha256(f"flowers process {seed} {process_index}".encode()).digest()[:4],
                                "little"))


def check_same_process_count(saved_meta: dict, processes: int, run_dir: Path) -> None:
    """Resuming with another number of processes would change the batches each sees and the
    optimizer steps per epoch: refuse it."""
    saved = (saved_meta.get("environment") or {}).get("num_processes")
    if saved is not None and int(saved) != processes:
        raise UserError(f"--resume {run_dir}: the run was trained with {saved} process(es) and this launch has "
                        f"{processes}; resume it with {saved} (accelerate launch --num_processes {saved}), or start "
                        f"a new run from its weights with --init-from {run_dir / 'last'}")


def _end_epoch(accelerator, cfg, splits, run_dir, model, val_loader, ema, progress, stopper, train, lr, epoch,
               meta, save_last, predictions, plain_model) -> bool:
    """Validate (and the EMA), save best/ema/last, log; True when early stopping says stop."""
    from flowers.metrics import compute_metrics  # not at the top: importing evaluate (~2 s) would delay the first step
    num_classes = len(splits.class_names)
    out = evaluate(accelerator, model, val_loader, desc="validate", channels_last=cfg.channels_last)
    check_validation_loss(out.loss, epoch, run_dir)
    val = {**compute_metrics(out.scores, out.labels, num_classes), "loss": out.loss}
    epoch_metrics = {
        "train_loss": train.loss, "train_accuracy": train.accuracy, "val_loss": val["loss"],
        "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"], "lr": lr,
        "epoch_time_s": train.seconds + out.seconds, "images_per_s": train.images_per_s,
        "train_samples": train.samples,
    }
    ema_is_best = False
    if ema is not None:
        ema_out = evaluate(accelerator, ema.module, val_loader, desc="validate ema", channels_last=cfg.channels_last)
        ema_val = compute_metrics(ema_out.scores, ema_out.labels, num_classes)
        epoch_metrics.update(ema_val_accuracy=ema_val["accuracy"], ema_val_loss=ema_out.loss)
        ema_is_best = ema_val["accuracy"] > progress.best_ema_accuracy
        progress.best_ema_accuracy = max(progress.best_ema_accuracy, ema_val["accuracy"])
    is_best = val["accuracy"] > progress.best_accuracy
    predictions.update(last=(epoch, out), **({"best": (epoch, out)} if is_best else {}))
    progress.best_accuracy = max(progress.best_accuracy, val["accuracy"])
    should_stop = stopper.step(val["accuracy"])
    progress.epoch, progress.batches_done = epoch, 0
    progress.finished = should_stop or epoch == cfg.epochs
    progress.last_metrics = {**epoch_metrics, "val": val}
    if accelerator.is_main_process:
        append_history(run_dir, {"epoch": epoch, **epoch_metrics})
    accelerator.wait_for_everyone()
    save_last()
    if accelerator.is_main_process:
        if is_best:
            checkpoint.save_checkpoint(run_dir / "best", plain_model().state_dict(),
                                       meta(progress.last_metrics))
        if ema_is_best:
            checkpoint.save_checkpoint(run_dir / "ema", ema.module.state_dict(), meta(progress.last_metrics))
    tracking.log_epoch(accelerator, run_dir, epoch, epoch_metrics)
    line = _summary_line(epoch, cfg.epochs, train, val, lr, epoch_metrics["epoch_time_s"], is_best)
    if ema is not None:
        line += f"  ema_val_acc {epoch_metrics['ema_val_accuracy']:.2%}"
    accelerator.print(line)
    return should_stop


def _exit_interrupted(accelerator: Accelerator, signum: Optional[int], run_dir: Path, epoch: int,
                      batches_done: int, batches: int) -> None:
    signum = signum or signal.SIGTERM  # None on a process that learnt of the signal from another
    where = f"epoch {epoch}, batch {batches_done}/{batches}" if batches else f"the end of epoch {epoch}"
    accelerator.print(f"{signal.Signals(signum).name}: saved {run_dir / 'last'} at {where}. Resume with:\n"
                      f"  {'accelerate launch' if accelerator.num_processes > 1 else 'python'} train.py "
                      f"--resume {run_dir}")
    accelerator.end_training()
    raise SystemExit(128 + signum)

"""The training run: data + model -> epochs of train/evaluate -> checkpoints and tracking."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
import os
import shutil
import signal
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn

from flowers import balance, calibration, checkpoint, tracking
from flowers.config import TrainConfig, to_dict
from flowers.data import (AUTO, SplitOptions, Splits, build_loaders, load_splits, place_decoded_images, read_edits,
                          recorded_split, resized_splits, resolve_data, resolve_pipeline)
from flowers.datacheck import warn_about_data
from flowers.errors import UserError
from flowers.engine import EpochOptions, EpochStats, EvalOutput, evaluate, train_one_epoch
from flowers.loading import initial_state
from flowers.model import build_model
from flowers.nonfinite import NonFiniteGuard, check_validation_loss
from flowers.optim import build_optimizer, build_scheduler
from flowers.recipe import EarlyStopping, WeightEMA, make_batch_transform, make_loss, parameter_groups
from flowers.resume import (Progress, StopOnSignal, append_history, config_only_run, epoch_loader, find_run,
                            load_init_weights, load_last, resolve_init, resumed_config, trim_history)
from flowers.resume import save_last as save_last_state
from flowers.runtime import environment, make_accelerator
from flowers.transforms import AUGMENTATION_DRAWS, IMAGENET_MEAN, IMAGENET_STD, eval_size, training_sizes


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
                _HELD_RUN_DIRS.append(hold_run_dir(output_dir / name))
                result[0] = name
                break
            except FileExistsError:
                if cfg.run_name and reclaim_unsaved_run_dir(output_dir / name):
                    result[0] = name
                    break
                if cfg.run_name:
                    result[0] = UserError(f"--run-name {cfg.run_name}: {output_dir / name} already exists; continue "
                                          f"that run with --resume {output_dir / name}, or choose another name")
                    break
    broadcast_object_list(result)  # an error too: every process raises it, none waits for the others
    if isinstance(result[0], Exception):
        raise result[0]
    return Path(cfg.output_dir) / result[0]


# The run folders this process trains into, each locked (flock) while the process lives: a folder
# that no process holds and that holds no checkpoint is what a run left that stopped before its
# first save, and may be taken again by its name.
_HELD_RUN_DIRS: list = []


def hold_run_dir(folder: Path) -> Optional[int]:
    """Lock `folder` for this process's lifetime; its descriptor, or None when another process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): nothing to hold
        return -1
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def reclaim_unsaved_run_dir(folder: Path) -> bool:
    """Take back a run folder with nothing to resume (no last/: its run stopped before the end of
    its first epoch's save, which writes last/ after history.jsonl, best/ and ema/) when no live
    process holds it: its files are removed and the new run starts there, with a note. False for
    anything else."""
    if not folder.is_dir() or not config_only_run(folder):
        return False
    fd = hold_run_dir(folder)
    if fd is None:  # a run is training there and has not saved yet
        return False
    _HELD_RUN_DIRS.append(fd)
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    print(f"note: {folder} held nothing to resume (its run stopped before its first save); starting afresh there")
    return True


@dataclass
class RunStart:
    """Where a launch starts from: the resolved config, and the run it continues (--resume) or the
    weights it starts from (--init-from)."""
    cfg: TrainConfig
    resume_dir: Optional[Path]
    init_path: Optional[Path]
    saved_meta: dict[str, Any]  # last/'s metadata of the run it continues ({} for a new run)
    switched_offline: bool      # W&B logs offline because no API key is configured
    fold: Optional[tuple[int, int]] = None  # a new run: validate on this cross-validation fold (crossval.py)

    @classmethod
    def resolve(cls, cfg: TrainConfig, fold: Optional[tuple[int, int]] = None) -> RunStart:
        """Find the run --resume names (its saved config wins) and the weights --init-from names;
        switch W&B to offline mode when no API key is configured (before any Accelerator exists)."""
        resume_dir = None
        if cfg.resume:
            resume_dir = find_run(cfg.resume, cfg.output_dir)
            cfg = resumed_config(cfg, resume_dir)
        init_path = resolve_init(cfg.init_from, cfg.output_dir) if cfg.init_from else None
        if init_path:
            cfg = dataclasses.replace(cfg, init_from=str(init_path))
        switched_offline = tracking.prepare_wandb_mode(cfg.report_to)
        saved_meta = checkpoint.load_meta(resume_dir / "last") if resume_dir else {}
        return cls(cfg, resume_dir, init_path, saved_meta, switched_offline, fold)

    @property
    def shuffle_seed(self) -> int:
        """The seed of the data order: a resumed run keeps its own (see data_order_seed)."""
        if self.resume_dir:
            return self.saved_meta.get("data", {}).get("shuffle_seed", self.cfg.seed)
        return data_order_seed(self.cfg.seed)

    @property
    def val_from(self) -> Optional[str]:
        """Where the validation split comes from: a resumed run keeps its own (runs saved before
        val_from was recorded split train)."""
        return self.saved_meta.get("data", {}).get("val_from") if self.resume_dir else AUTO

    def split_options(self, data: str) -> SplitOptions:
        """What decides the split besides seed and fraction: a resumed run's record (runs saved
        before it was recorded: their plain split), else near-duplicate groups found now, the
        --exclude and --relabel lists, and the fold."""
        if self.resume_dir:
            return recorded_split(self.saved_meta.get("data", {}))
        exclude, relabel = read_edits(self.cfg.exclude, self.cfg.relabel, Path(data).expanduser().resolve())
        return SplitOptions(duplicate_distance=self.cfg.duplicate_distance, exclude=exclude, relabel=relabel,
                            fold=self.fold)


def _load_data(accelerator: Accelerator, start: RunStart) -> tuple[Optional[dict], Splits]:
    """The initial weights and the splits to train on.

    Per-node work (downloads, caches) is done by each node's local main process first; the
    node's other processes then reuse it. Resuming restores the weights from last/, and
    --init-from loads its own, so then the initial ones are not needed."""
    cfg = start.cfg
    with accelerator.local_main_process_first():
        init_state = initial_state("none" if start.resume_dir or start.init_path else cfg.weights, cfg.arch)
        data = resolve_data(cfg.data)
        splits = load_splits(data, cfg.val_split, cfg.seed, cfg.strict, start.val_from, start.split_options(data))
        # the device pipeline decodes the photos at evaluation's short side, from that cache
        decode_once = cfg.cache_resized or resolve_pipeline(cfg.pipeline, accelerator.device.type) == "device"
        training_splits = resized_splits(splits, eval_size(cfg.image_size)) if decode_once else splits
    warn_about_data(accelerator, [splits.train, splits.val], splits.class_names,  # the original files
                    near_duplicates=splits.group_paths())
    return init_state, training_splits


def _open_run_dir(accelerator: Accelerator, start: RunStart, splits: Splits) -> Path:
    """The run folder: the resumed one, or a new one holding config.yaml; says what the run trains on."""
    cfg = start.cfg
    run_dir = start.resume_dir or _create_run_dir(accelerator, cfg)
    if accelerator.is_main_process and not start.resume_dir:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    accelerator.print(f"data: {splits.source}  classes: {', '.join(splits.class_names)}  "
                      f"train {len(splits.train)} / val {len(splits.val)} images  "
                      f"processes: {accelerator.num_processes}  device: {accelerator.device}  "
                      f"precision: {accelerator.mixed_precision}")
    return run_dir


@dataclass
class EpochResult:
    """A trained and validated epoch: what saving and tracking it need."""
    epoch: int
    train: EpochStats
    outputs: EvalOutput         # the validation outputs (the end of the run plots the best epoch's)
    val: dict[str, Any]         # validation metrics and loss
    metrics: dict[str, Any]     # the epoch's row in history.jsonl, summary.csv and the trackers
    is_best: bool               # a better val_accuracy than any earlier epoch: saved as best/
    ema_is_best: bool           # the same for the EMA weights: saved as ema/
    ema_metrics: Optional[dict[str, Any]]  # ema/'s metrics: the epoch's, with the EMA weights' validation
    should_stop: bool           # early stopping says stop
    ema_outputs: Optional[EvalOutput] = None  # the EMA's validation outputs (with --ema-decay)


def _summary_line(result: EpochResult, epochs: int) -> str:
    train, val, lr = result.train, result.val, result.metrics["lr"]
    return (f"epoch {result.epoch}/{epochs}  train_loss {train.loss:.4f}  train_acc {train.accuracy:.2%}  "
            f"val_loss {val['loss']:.4f}  val_acc {val['accuracy']:.2%}  lr {lr:.2e}  "
            f"{train.images_per_s:.1f} img/s  data_wait {train.data_wait:.0%}  {result.metrics['epoch_time_s']:.1f}s"
            + ("  *best*" if result.is_best else ""))


@dataclass
class Run:
    """One training run's state, shared by the steps of fit(): the accelerator, the prepared model,
    optimizer, scheduler and loaders, the progress that last/ saves, the EMA, the NaN/Inf guard,
    the signal handler and the run folder."""
    cfg: TrainConfig
    start: RunStart
    accelerator: Accelerator
    splits: Splits
    run_dir: Path
    model: nn.Module            # as prepared: wrapped for DDP and/or compiled (see plain_model)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    val_loader: Any
    ema: Optional[WeightEMA]
    guard: NonFiniteGuard
    loss_fn: Callable
    mix: Optional[Callable]     # MixUp/CutMix
    stopper: EarlyStopping
    totals: torch.Tensor        # the current epoch's loss sum, correct, seen on this process
    env: dict[str, Any]         # runtime.environment(), saved in every checkpoint
    init_info: Optional[dict[str, Any]]  # where --init-from's weights came from, saved in every checkpoint
    progress: Progress = field(default_factory=Progress)
    stop: StopOnSignal = field(default_factory=StopOnSignal)
    last_batch: int = -1        # the index of the current epoch's last batch
    best_result: Optional[EpochResult] = None  # this launch's best epoch
    best_ema_result: Optional[EpochResult] = None  # this launch's best epoch of the EMA
    last_result: Optional[EpochResult] = None

    @property
    def sizes(self) -> tuple[int, ...]:
        """Each epoch's training crop size (0-based; --resize-from)."""
        return training_sizes(self.cfg.image_size, self.cfg.resize_from, self.cfg.epochs)

    @classmethod
    def create(cls, accelerator: Accelerator, start: RunStart, splits: Splits, init_state: Optional[dict],
               run_dir: Path) -> Run:
        """Build the model, optimizer, EMA, loaders and schedule, prepared for the accelerator."""
        cfg = start.cfg
        model = build_model(len(splits.class_names), init_state, dropout=cfg.dropout, arch=cfg.arch)
        if start.resume_dir:
            init_info = start.saved_meta.get("init_from")
        else:
            init_info = load_init_weights(model, start.init_path, splits.class_names) if start.init_path else None
        # Dropout masks and MixUp/CutMix draws come from the global RNG: each process needs its own
        # stream (the split, initial weights, data order and augmentation do not use it).
        seed_process_rng(cfg.seed, accelerator.process_index)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(cfg, parameter_groups(cfg, model))
        # the EMA copies the plain model, before it is wrapped for DDP or compiled
        ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        loaders = build_loaders(cfg, splits, accelerator, start.shuffle_seed)
        train_loader, val_loader = loaders.train, loaders.val
        model, optimizer = accelerator.prepare(model, optimizer)
        if ema is not None:
            ema.to(accelerator.device)
        place_decoded_images(loaders, cfg, accelerator, model)
        scheduler = build_scheduler(cfg, optimizer, math.ceil(len(train_loader) / cfg.grad_accum_steps))
        run = cls(cfg, start, accelerator, splits, run_dir, model, optimizer, scheduler, train_loader, val_loader, ema,
                  guard=NonFiniteGuard(accelerator, cfg.on_nan, run_dir),
                  loss_fn=make_loss(cfg, _class_weights(cfg, splits)).to(accelerator.device),
                  mix=make_batch_transform(cfg, len(splits.class_names)),
                  stopper=EarlyStopping(cfg.early_stopping_patience),
                  totals=torch.zeros(3, device=accelerator.device, dtype=torch.float32),
                  env={**environment(accelerator, model), "pipeline": loaders.pipeline}, init_info=init_info)
        accelerator.register_for_checkpointing(scheduler, run.progress, run.stopper, *([ema] if ema else []))
        return run

    def resume(self) -> bool:
        """Continue from last/ (weights, optimizer, schedule, progress, RNG states and the
        interrupted epoch's sums); False when the run has already finished."""
        progress, print_ = self.progress, self.accelerator.print
        load_last(self.accelerator, self.run_dir, progress, self.totals)
        if self.accelerator.is_main_process:
            trim_history(self.run_dir, progress.epoch)
        print_(f"resuming {self.run_dir} after epoch {progress.epoch}/{self.cfg.epochs}"
               + (f" and {progress.batches_done} batches of the next" if progress.batches_done else ""))
        if progress.finished or progress.epoch >= self.cfg.epochs:
            print_(f"{self.run_dir} has already finished; nothing to do "
                   f"(train further with --init-from {self.run_dir / 'last'})")
            return False
        return True

    def start_tracking(self) -> None:
        """Create (or, resuming, continue) the trackers' run, holding the config, data and environment."""
        cfg, splits, run_name = self.cfg, self.splits, self.run_dir.name
        resolved = {**to_dict(cfg), "data": splits.source, "run_name": run_name}
        info = tracking.run_info(resolved, splits.source, splits.class_names, len(splits.train), len(splits.val),
                                 self.env)
        tracking.start(self.accelerator, tracking.RunInfo(
            report_to=cfg.report_to, project=cfg.wandb_project, run_name=run_name, run_dir=self.run_dir,
            config=info, tags=cfg.tags, group=cfg.group, name_given=cfg.run_name is not None,
            switched_offline=self.start.switched_offline,
            resume_run_id=tracking.stored_run_id(self.run_dir) if self.start.resume_dir else None))

    def train_epoch(self, epoch: int) -> EpochStats:
        """One pass over the training data (what is left of it, in an epoch resumed midway). A
        signal stops it after saving last/, and ends the process here."""
        progress = self.progress
        loader = epoch_loader(self.train_loader, epoch - 1, progress.batches_done)
        self.last_batch = progress.batches_done + len(loader) - 1
        self.guard.start_epoch(epoch, self.last_batch + 1)
        if progress.batches_done == 0:
            progress.epoch_lr = self.optimizer.param_groups[-1]["lr"]
            self.totals.zero_()  # this epoch's sums (an epoch resumed midway continues the saved ones)
        options = EpochOptions(desc=f"epoch {epoch}/{self.cfg.epochs}", channels_last=self.cfg.channels_last,
                               on_step=self.after_step, batch_transform=self.mix, totals=self.totals,
                               start_step=progress.batches_done, guard=self.guard)
        train = train_one_epoch(self.accelerator, self.model, loader, self.optimizer, self.scheduler,
                                self.loss_fn, options)
        if progress.batches_done <= self.last_batch:  # after_step stopped the epoch early: a signal
            _exit_interrupted(self.accelerator, self.stop.signum, self.run_dir, epoch, progress.batches_done,
                              self.last_batch + 1)
        return train

    def after_step(self, step: int, stepped: bool) -> bool:
        """After each batch: count optimizer steps, update the EMA; save last/ on a signal or every
        --save-every-steps. True (a signal) stops the epoch."""
        accelerator, progress, every = self.accelerator, self.progress, self.cfg.save_every_steps
        if not accelerator.sync_gradients:
            return False
        progress.batches_done = step + 1
        if stepped:
            progress.global_step += 1
            if self.ema is not None:
                self.ema.update(self.plain_model(), distributed=accelerator.num_processes > 1)
        if step == self.last_batch:  # the epoch's own save follows
            return False
        stopping = self.stop.requested(accelerator, step)
        if stopping or (stepped and every and progress.global_step % every == 0):
            self.guard.check()  # never save weights a NaN has reached
            self.save_last()
        return stopping

    def validate(self, epoch: int, train: EpochStats) -> EpochResult:
        """Evaluate the model (and the EMA) on the validation set: the epoch's metrics, whether it
        is the best so far, and whether early stopping says stop."""
        # not at the top: importing `evaluate` takes seconds, which would delay the first step
        from flowers.metrics import compute_metrics
        cfg, progress, num_classes = self.cfg, self.progress, len(self.splits.class_names)
        out = evaluate(self.accelerator, self.model, self.val_loader, desc="validate", channels_last=cfg.channels_last,
                       tta=cfg.val_tta)
        check_validation_loss(out.loss, epoch, self.run_dir)
        val = {**compute_metrics(out.scores, out.labels, num_classes), "loss": out.loss}
        metrics = {
            "train_loss": train.loss, "train_accuracy": train.accuracy, "val_loss": val["loss"],
            "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"], "lr": progress.epoch_lr,
            "epoch_time_s": train.seconds + out.seconds, "images_per_s": train.images_per_s,
            "train_samples": train.samples, "image_size": self.sizes[epoch - 1], "data_wait": train.data_wait,
        }
        ema_is_best, ema_metrics, ema_out = False, None, None
        if self.ema is not None:
            ema_out = evaluate(self.accelerator, self.ema.module, self.val_loader, desc="validate ema",
                               channels_last=cfg.channels_last, tta=cfg.val_tta)
            ema_val = {**compute_metrics(ema_out.scores, ema_out.labels, num_classes), "loss": ema_out.loss}
            metrics.update(ema_val_accuracy=ema_val["accuracy"], ema_val_loss=ema_val["loss"])
            # what ema/ records: the accuracy of the weights it holds (eval.py checks it against that)
            ema_metrics = {**metrics, "val_accuracy": ema_val["accuracy"], "val_loss": ema_val["loss"],
                           "val_macro_f1": ema_val["macro_f1"], "val": ema_val, "weights": "ema"}
            ema_is_best = ema_val["accuracy"] > progress.best_ema_accuracy
            progress.best_ema_accuracy = max(progress.best_ema_accuracy, ema_val["accuracy"])
        is_best = val["accuracy"] > progress.best_accuracy
        progress.best_accuracy = max(progress.best_accuracy, val["accuracy"])
        return EpochResult(epoch, train, out, val, metrics, is_best, ema_is_best, ema_metrics,
                           should_stop=self.stopper.step(val["accuracy"]), ema_outputs=ema_out)

    def save_epoch(self, result: EpochResult) -> None:
        """Record the finished epoch: its row in history.jsonl and summary.csv, best/ and ema/ when
        they improved, then last/ (what a resume continues from).

        last/ comes last: it records the new best accuracies, so once it exists the epoch is never
        trained again and best/ and ema/ must already hold its weights. A kill anywhere before it
        leaves last/ at the previous epoch; the resumed run trains this epoch again, exactly, and
        saves the same best/ and ema/ (and the rows, which resume trims, see trim_history)."""
        accelerator, progress = self.accelerator, self.progress
        progress.epoch, progress.batches_done = result.epoch, 0
        progress.finished = result.should_stop or result.epoch == self.cfg.epochs
        progress.last_metrics = {**result.metrics, "val": result.val}
        if accelerator.is_main_process:
            append_history(self.run_dir, {"epoch": result.epoch, **result.metrics})
            tracking.write_summary_row(self.run_dir / tracking.SUMMARY_FILE, {"epoch": result.epoch, **result.metrics})
            if result.is_best:
                checkpoint.save_checkpoint(self.run_dir / "best", self.plain_model().state_dict(),
                                           self.checkpoint_meta(progress.last_metrics))
            if result.ema_is_best:
                checkpoint.save_checkpoint(self.run_dir / "ema", self.ema.module.state_dict(),
                                           self.checkpoint_meta(result.ema_metrics))
        accelerator.wait_for_everyone()
        self.save_last()

    def track(self, result: EpochResult) -> None:
        """Log the epoch to the trackers and print its line; keep its validation outputs for the
        end of the run."""
        self.last_result = result
        if result.is_best:
            self.best_result = result
        if result.ema_is_best:
            self.best_ema_result = result
        tracking.log_epoch(self.accelerator, result.epoch, result.metrics)
        line = _summary_line(result, self.cfg.epochs)
        if self.ema is not None:
            line += f"  ema_val_acc {result.metrics['ema_val_accuracy']:.2%}"
        self.accelerator.print(line)
        if self.guard.epoch_summary():
            self.accelerator.print(self.guard.epoch_summary())

    def stop_after(self, result: EpochResult) -> bool:
        """After an epoch: a signal ends the process here (last/ is saved); True when early
        stopping says stop."""
        if self.stop.requested(self.accelerator) and not self.progress.finished:
            _exit_interrupted(self.accelerator, self.stop.signum, self.run_dir, result.epoch, 0, 0)
        if result.should_stop:
            self.accelerator.print(f"early stopping: no better val_acc for {self.cfg.early_stopping_patience} epochs")
        return result.should_stop

    def finish(self) -> None:
        """Close the trackers' run (with the plots of the best epoch's predictions) and say where
        the checkpoints are."""
        # the best epoch's predictions; the last epoch's when the best one ran before a resume
        shown, splits = self.best_result or self.last_result, self.splits
        outputs = tracking.ValidationOutputs(shown.epoch, shown.outputs.scores, shown.outputs.labels,
                                             splits.class_names, splits.val)
        self.calibrate()
        tracking.finish(self.accelerator, self.run_dir, outputs, self.progress.epoch)
        self.accelerator.print(f"best val_acc {self.progress.best_accuracy:.2%}; checkpoints in {self.run_dir}/ "
                               f"(evaluate: python eval.py --ckpt best --output-dir {self.cfg.output_dir})")
        if splits.skipped:
            self.accelerator.print(f"warning: {len(splits.skipped)} unusable image file(s) were skipped "
                                   "(listed at the start)")

    def calibrate(self) -> None:
        """At the end: fit the temperature of best/ (and ema/) on the validation outputs of the epoch
        it was saved at, write it into its checkpoint.json, and log the ECE before and after (held
        out) and the reliability diagram. A checkpoint saved before a resume is left to eval.py --calibrate."""
        for name, result in (("best", self.best_result), ("ema", self.best_ema_result)):
            out = None if result is None else result.outputs if name == "best" else result.ema_outputs
            if out is None:
                if name == "best" or self.ema is not None:
                    self.accelerator.print(f"{name}/ was saved before this launch: fit its temperature with "
                                           f"python eval.py --ckpt {self.run_dir / name} --calibrate")
                continue
            if self.accelerator.is_main_process:
                meta = calibration.record_temperature(self.run_dir / name, out.scores, out.labels,
                                                      eval_size=self.cfg.image_size, tta=self.cfg.val_tta, split="val")
                fitted = meta["calibration"]
                self.accelerator.print(
                    f"{name}/: temperature {meta['temperature']:.3f} fitted on the validation split; ECE "
                    f"{fitted['ece_before_heldout']:.3f} -> {fitted['ece_after_heldout']:.3f} (held-out halves)"
                    + (f"; warning: {fitted['warning']}" if "warning" in fitted else ""))
                tracking.log_calibration(self.accelerator, name, result.epoch, out.scores, out.labels,
                                         meta["temperature"], self.progress.epoch)

    def plain_model(self) -> nn.Module:
        """The model without its DDP and torch.compile wrappers: the keys every checkpoint holds."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def save_last(self) -> None:
        """Write last/ (weights, metadata and the training state a resume continues from)."""
        save_last_state(self.accelerator, self.run_dir, self.progress, self.totals,
                        lambda: self.plain_model().state_dict(), self.checkpoint_meta(self.progress.last_metrics))

    def checkpoint_meta(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Everything needed to use a checkpoint on its own (see checkpoint.py)."""
        cfg, splits = self.cfg, self.splits
        return {
            "format_version": 1,
            "arch": cfg.arch,
            "num_classes": len(splits.class_names),
            "class_names": splits.class_names,
            "image_size": cfg.image_size,
            "eval_resize": eval_size(cfg.image_size),
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "data": {"source": splits.source, "split_seed": cfg.seed, "val_split": cfg.val_split,
                     "train_size": len(splits.train), "val_size": len(splits.val),
                     "shuffle_seed": self.start.shuffle_seed, "val_from": splits.val_from,
                     "sampler": cfg.sampler, "class_weights": _weights_list(self.loss_fn),
                     "groups": splits.groups, "exclude": splits.exclude, "relabel": splits.relabel,
                     "fold": list(splits.fold) if splits.fold else None,
                     "augmentation_draws": AUGMENTATION_DRAWS},
            "run_name": self.run_dir.name,
            "epoch": self.progress.epoch,
            "global_step": self.progress.global_step,
            "metrics": metrics,
            "config": to_dict(cfg),
            "environment": self.env,
            "saved_at": dt.datetime.now().isoformat(timespec="seconds"),
            "init_from": self.init_info,
        }


def _class_weights(cfg: TrainConfig, splits: Splits) -> Optional[torch.Tensor]:
    """--class-weights: from the training split's per-class counts (None for none)."""
    counts = balance.class_counts(balance.split_labels(splits.train), len(splits.class_names))
    return balance.loss_class_weights(cfg.class_weights, counts)


def _weights_list(loss_fn: Any) -> Optional[list[float]]:
    """The loss's class weights as checkpoint.json records them (None: unweighted)."""
    weight = getattr(loss_fn, "weight", None)
    return None if weight is None else [round(float(w), 6) for w in weight]


def open_run(cfg: TrainConfig, fold: Optional[tuple[int, int]] = None) -> Run:
    """Everything fit() trains with, set up from the config: where the run starts from, the
    accelerator, the data, the run folder and the prepared model, optimizer, schedule and loaders.
    `fold` (number, of K): validate on that fold of a K-fold split (crossval.py; a resumed run
    keeps its recorded fold)."""
    start = RunStart.resolve(cfg, fold)
    cfg = start.cfg
    accelerator = make_accelerator(start.shuffle_seed, cfg.grad_accum_steps, tracking.tracker_names(cfg.report_to),
                                   project_dir=cfg.output_dir, compile=cfg.compile)
    if start.resume_dir:
        check_same_process_count(start.saved_meta, accelerator.num_processes, start.resume_dir)
    set_seed(cfg.seed)
    init_state, splits = _load_data(accelerator, start)
    run_dir = _open_run_dir(accelerator, start, splits)
    return Run.create(accelerator, start, splits, init_state, run_dir)


def fit(cfg: TrainConfig, fold: Optional[tuple[int, int]] = None) -> Path:
    """Train as configured (or continue an interrupted run); returns the run folder holding
    best/ and last/ (and ema/ with --ema-decay). `fold`: see open_run.

    Set up (open_run; resuming, the saved state; the trackers), then each epoch: train,
    validate (noting a new best), save, track; then finish the trackers."""
    run = open_run(cfg, fold)
    if run.start.resume_dir and not run.resume():
        return run.run_dir  # it had already finished
    run.start_tracking()
    with run.stop:
        for epoch in range(run.progress.epoch + 1, run.cfg.epochs + 1):
            train = run.train_epoch(epoch)
            result = run.validate(epoch, train)
            run.save_epoch(result)
            run.track(result)
            if run.stop_after(result):
                break
    run.finish()
    return run.run_dir


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


def _exit_interrupted(accelerator: Accelerator, signum: Optional[int], run_dir: Path, epoch: int,
                      batches_done: int, batches: int) -> None:
    signum = signum or signal.SIGTERM  # None on a process that learnt of the signal from another
    where = f"epoch {epoch}, batch {batches_done}/{batches}" if batches else f"the end of epoch {epoch}"
    accelerator.print(f"{signal.Signals(signum).name}: saved {run_dir / 'last'} at {where}. Resume with:\n"
                      f"  {'accelerate launch' if accelerator.num_processes > 1 else 'python'} train.py "
                      f"--resume {run_dir}")
    accelerator.end_training()
    raise SystemExit(128 + signum)

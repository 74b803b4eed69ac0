"""Continuing from earlier runs: exact resume (--resume), new runs from old weights (--init-from),
and stopping cleanly on SIGINT/SIGTERM.

The resumable state lives in `<run>/last/training_state/` (Accelerate's save_state: model,
optimizer, scaler, RNG states of every process, plus our registered objects: the schedule, the
run's progress, early stopping and the EMA weights). The data needs no saved state: the shuffle
order is a function of (seed, epoch) (Accelerate's seedable sampler) and each image's
augmentation of (seed, epoch, index) (data.SeededAugmentation); a run resumed mid-epoch skips
the batches it has done.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from torch import nn

from flowers import checkpoint
from flowers.config import TrainConfig, from_dict, to_dict
from flowers.errors import UserError
from flowers.transforms import AUGMENTATION_DRAWS

STATE_DIR = "training_state"
STAGING_DIR = ".training_state.tmp"
HISTORY_FILE = "history.jsonl"
# Options a resumed run takes from the command line; everything else comes from the run itself.
RUNTIME_OPTIONS = ("report_to", "wandb_project", "save_every_steps")


@dataclass
class Progress:
    """Where the run is: completed epochs, batches done in the current epoch, and the best so far."""
    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    best_accuracy: float = -1.0
    best_ema_accuracy: float = -1.0
    epoch_lr: float = 0.0  # learning rate when the current epoch started (reported per epoch)
    last_metrics: dict = field(default_factory=dict)
    finished: bool = False
    # loss sum, correct, seen of the current epoch's finished batches, one row per process
    partial_totals: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# ---- --resume ---------------------------------------------------------------------------------

def find_run(resume: str, output_dir: str) -> Path:
    """The run folder to resume: 'latest' (newest last/ under output_dir), a run folder, or its last/."""
    if resume == "latest":
        try:
            last = checkpoint.resolve("last", output_dir).with_name("last")  # (it may have found last.old)
        except UserError:
            raise UserError(f"--resume: no run with a last/ checkpoint under {output_dir}/ "
                            "(pass --output-dir or the run folder: --resume DIR)") from None
    else:
        path = Path(resume).expanduser()
        last = path if (path / checkpoint.META_FILE).is_file() else path / "last"
    checkpoint._recover(last)  # resuming makes this process the run's writer: it may finish a killed save
    if not (last / checkpoint.META_FILE).is_file():
        stopped_early = (last.parent / "config.yaml").is_file() and config_only_run(last.parent)
        raise UserError(f"--resume {resume}: no run with a last/ checkpoint there" + (
            f" (its run stopped before its first save: start it again with --run-name {last.parent.name})"
            if stopped_early else ""))
    if not (last / STATE_DIR).is_dir():
        raise UserError(f"--resume: {last} holds weights but no {STATE_DIR}/ (saved by an older version?); "
                        f"start a new run from its weights with --init-from {last}")
    return last.parent


def config_only_run(run_dir: Path) -> bool:
    """A run folder that a run left before its first last/ was complete: nothing in it to resume."""
    last = run_dir / "last"
    return not any((folder / checkpoint.META_FILE).is_file() for folder in (last, last.with_name("last.old")))


def resumed_config(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """The run's own config (so the schedule, data and recipe are the same), with the runtime
    options of this command line. Says which other given options it ignores."""
    meta = checkpoint.load_meta(run_dir / "last")
    saved = meta["config"]
    draws = meta.get("data", {}).get("augmentation_draws", 1)
    if draws != AUGMENTATION_DRAWS:
        raise UserError(f"--resume {run_dir}: saved by a flowers whose training augmentation draws other random "
                        f"numbers (version {draws}, now {AUGMENTATION_DRAWS}), so it cannot continue exactly; start a "
                        f"new run from its weights with --init-from {run_dir / 'last'}")
    # the options this command line (and its --config) set, whatever their value (config.parse);
    # a config built otherwise: those that differ from the defaults
    given = getattr(cfg, "given", None)
    if given is None:
        defaults = to_dict(TrainConfig())
        given = {name for name, value in to_dict(cfg).items() if value != defaults[name]}
    ignored = [name for name, value in to_dict(cfg).items()
               if name in given and name not in RUNTIME_OPTIONS + ("resume", "output_dir", "run_name", "config")
               and value != saved.get(name)]
    if ignored:
        print(f"note: resuming uses the run's own settings; ignoring --{', --'.join(n.replace('_', '-') for n in ignored)}"
              " (to change them, start a new run with --init-from)")
    # init_from: None, as the weights come from last/ (where the run started stays in last/'s
    # metadata); its path may have moved since, and with --resume it would be refused
    values = {**saved, **{k: getattr(cfg, k) for k in RUNTIME_OPTIONS},
              "output_dir": str(run_dir.parent), "run_name": run_dir.name, "resume": str(run_dir),
              "init_from": None, "config": None}
    return from_dict(TrainConfig, values, source=f"{run_dir}/last/{checkpoint.META_FILE}")


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """history.jsonl's rows, one per finished epoch; a line cut short by a kill is left out."""
    path = Path(run_dir) / HISTORY_FILE
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "epoch" in row:
            rows.append(row)
    return rows


def trim_history(run_dir: Path, completed_epochs: int) -> None:
    """Keep the rows of the epochs the resumed state has finished: drop later ones (written after
    the state we resume from) and a line a kill cut short."""
    path = run_dir / HISTORY_FILE
    if path.is_file():
        rows = [row for row in read_history(run_dir) if row["epoch"] <= completed_epochs]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(tmp, path)


def append_history(run_dir: Path, row: dict) -> None:
    with open(run_dir / HISTORY_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


# ---- saving and loading the resumable state ------------------------------------------------------

def save_last(accelerator: Accelerator, run_dir: Path, progress: Progress, totals: torch.Tensor,
              weights: Callable[[], dict], meta: dict) -> None:
    """Write `last/` (weights + metadata + training_state) atomically; all processes call this."""
    staging = run_dir / STAGING_DIR
    # each process's own sums: float32 addition is not associative, so continuing from their total
    # would end the epoch a rounding step away from an uninterrupted run
    progress.partial_totals = accelerator.gather(totals.clone()[None]).tolist()
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        error = checkpoint.save_error(run_dir / "last", e)  # looks at the free space: before the cleanup
        shutil.rmtree(staging, ignore_errors=True)
        raise error from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.save_checkpoint(run_dir / "last", weights(), meta, move_in={STATE_DIR: staging})
    accelerator.wait_for_everyone()


def load_last(accelerator: Accelerator, run_dir: Path, progress: Progress, totals: torch.Tensor) -> None:
    checkpoint.check_pickles_hold_only_data(run_dir / "last" / STATE_DIR)
    accelerator.load_state(str(run_dir / "last" / STATE_DIR))
    saved = progress.partial_totals
    if saved and isinstance(saved[0], list):  # one row per process (the process count cannot change)
        own = saved[accelerator.process_index]
    else:  # saved by older versions: all processes' sums together, carried by the main process
        own = (saved or [0.0] * 3) if accelerator.is_main_process else [0.0] * 3
    totals.copy_(torch.tensor(own, dtype=totals.dtype))


def epoch_loader(train_loader, epoch_index: int, skip_batches: int):
    """The train loader for this epoch (0-based), without its first `skip_batches` batches.

    The shuffle order follows from Accelerate's seedable sampler (the device path: its own
    permutation) and the epoch; augmentation from the epoch and each example's index
    (transforms.draws_for_image). Nothing else is needed to see exactly the batches an
    uninterrupted run would see.
    """
    if hasattr(train_loader, "for_epoch"):  # the device path's loader (device_data.DeviceLoader)
        return train_loader.for_epoch(epoch_index, skip_batches)
    train_loader.set_epoch(epoch_index)
    if hasattr(train_loader.dataset, "epoch"):
        train_loader.dataset.epoch = epoch_index
    return skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader


# ---- --init-from ------------------------------------------------------------------------------

def resolve_init(init_from: str, output_dir: str) -> Path:
    """best / last (of the latest run under output_dir) or a checkpoint/run folder path."""
    path = checkpoint.resolve(init_from, output_dir)
    if not (path / checkpoint.WEIGHTS_FILE).is_file():
        raise UserError(f"--init-from {init_from}: {path} has no {checkpoint.WEIGHTS_FILE}")
    return path.resolve()


def load_init_weights(model: nn.Module, path: Path, class_names: list[str]) -> dict[str, Any]:
    """Load a checkpoint's weights into `model` (built for the same --arch); returns what the new
    run's metadata records."""
    from flowers.model import DEFAULT_ARCH, arch_of, head_name, in_head, load_model_weights, match_head_keys

    meta = checkpoint.load_meta(path)
    saved_arch, arch = meta.get("arch", DEFAULT_ARCH), arch_of(model)
    if saved_arch != arch:
        raise UserError(f"--init-from {path}: it holds a {saved_arch} model and this run builds {arch}; "
                        f"start from it with --arch {saved_arch}")
    state = match_head_keys(checkpoint.load_weights(path), model)
    same_classes = meta.get("class_names") == class_names
    if not same_classes:  # other classes: keep the backbone, train a new head
        head = head_name(model)
        fresh = {k: v for k, v in model.state_dict().items() if in_head(k, head)}
        state = {**{k: v for k, v in state.items() if not in_head(k, head)}, **fresh}
        print(f"note: {path} was trained on other classes ({meta.get('class_names')}); using its backbone "
              "with a new head")
    load_model_weights(model, state, source=str(path))
    return {"path": str(path), "run_name": meta.get("run_name"), "epoch": meta.get("epoch"),
            "val_accuracy": (meta.get("metrics") or {}).get("val_accuracy"), "head_loaded": same_classes}


# ---- SIGINT / SIGTERM -----------------------------------------------------------------------------

def _owner(handler: Any) -> Optional["StopOnSignal"]:
    """The StopOnSignal whose handler `handler` is (an enclosing one: crossval around fit), else None."""
    owner = getattr(handler, "__self__", None)
    return owner if isinstance(owner, StopOnSignal) else None


class StopOnSignal:
    """While active, the first SIGINT/SIGTERM only sets `signum` (training stops after the current
    optimizer step, or under DDP within CHECK_EVERY batches, and saves last/); a second SIGINT
    interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    CHECK_EVERY = 10  # batches between the processes' checks under DDP (see requested)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if os.environ.get("RANK", "0") == "0":
            print(f"\n{signal.Signals(signum).name}: stopping after the current step and saving last/ "
                  "(Ctrl-C again to abort without saving)", flush=True)

    def __enter__(self) -> "StopOnSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
            outer = _owner(self._previous[sig])
            if outer is not None and outer.signum is not None:  # (crossval) a signal before training began
                self.signum = outer.signum
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
            outer = _owner(handler)
            if outer is not None and self.signum is not None:  # the enclosing loop stops too
                outer.signum = outer.signum or self.signum

    def requested(self, accelerator: Accelerator, step: Optional[int] = None) -> bool:
        """True on every process when any process got a signal.

        One process: looked up every step, for free. Several: agreeing takes a collective and a
        read of its result, which makes the host wait until the GPU has finished its queued work;
        so mid-epoch (`step` given) they agree every CHECK_EVERY steps only (the same steps on
        every process), and at the end of an epoch (no `step`) always."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        if step is not None and (step + 1) % self.CHECK_EVERY:
            return False
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

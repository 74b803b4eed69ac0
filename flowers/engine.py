"""One training epoch and one evaluation pass, Accelerator-aware (CPU, one GPU, DDP)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from flowers.datawait import DataWait
from flowers.nonfinite import NonFiniteGuard
from flowers.runtime import release_freed_memory

LOG_EVERY = 10  # steps between progress-bar loss updates (each one is a host sync)


@dataclass
class EpochStats:
    loss: float  # cross-entropy with the true labels: no label smoothing or MixUp/CutMix, like val_loss
    accuracy: float
    samples: int
    seconds: float
    data_wait: float = 0.0  # the share of `seconds` spent waiting for the next batch (see datawait.py)

    @property
    def images_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EvalOutput:
    scores: np.ndarray   # (N, C) float32 logits
    labels: np.ndarray   # (N,) int64
    losses: np.ndarray   # (N,) per-example cross-entropy
    seconds: float

    @property
    def loss(self) -> float:
        return float(self.losses.mean()) if len(self.losses) else float("nan")


def _images(batch: dict, channels_last: bool) -> torch.Tensor:
    return batch["pixel_values"].contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def show_progress(accelerator: Accelerator) -> bool:
    """Progress bars on one process, and only on a terminal: a log file gets the epoch lines alone."""
    return accelerator.is_local_main_process and sys.stderr.isatty()


def _bar(accelerator: Accelerator, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not show_progress(accelerator))


@dataclass
class EpochOptions:
    """How train_one_epoch runs an epoch, beyond the model, data and optimizer it trains with.

    `on_step(step, stepped)` runs after every batch and stops the epoch early by returning True;
    `stepped` is True when the weights were updated (the last batch of an accumulation cycle, and
    neither --on-nan skip nor fp16's GradScaler skipped the update). A skipped update advances
    neither the schedule nor the optimizer-step count.
    `batch_transform(images, labels) -> (images, targets)` mixes batches (MixUp/CutMix; accuracy
    is still counted against the original labels). `totals` (float32 on the device: loss sum,
    correct, seen; updated in place) and `start_step` continue an epoch interrupted after
    `start_step` batches. `guard` (see nonfinite.py) stops on a NaN/Inf loss or skips the
    updates it would poison."""
    desc: str = "train"
    channels_last: bool = True
    on_step: Optional[Callable[[int, bool], bool]] = None
    batch_transform: Optional[Callable] = None
    totals: Optional[torch.Tensor] = None
    start_step: int = 0
    guard: Optional[NonFiniteGuard] = None


def train_one_epoch(accelerator: Accelerator, model: nn.Module, loader, optimizer, scheduler,
                    loss_fn: Callable, options: Optional[EpochOptions] = None) -> EpochStats:
    """Train for one pass over `loader` (see EpochOptions); returns loss/accuracy summed over all
    processes. Sums stay float32 (exact for counts below 2**24 images an epoch) because some
    devices (Apple's MPS) have no float64."""
    options = options or EpochOptions()
    model.train()
    guard = options.guard
    # this process's sums (updated in place, so the caller sees them from on_step), on the device
    running = options.totals
    if running is None:
        running = torch.zeros(3, device=accelerator.device, dtype=torch.float32)
    start, wait = time.perf_counter(), DataWait()
    tail_start, tail_scale = _accumulation_tail(options.start_step + len(loader), accelerator.gradient_accumulation_steps)
    with _bar(accelerator, len(loader), options.desc) as bar:
        for step, batch in enumerate(wait.batches(loader), start=options.start_step):
            loss, logits, valid, stepped = _train_step(accelerator, model, batch, optimizer, scheduler, loss_fn,
                                                       options, tail_scale if step >= tail_start else 1.0)
            labels = batch["labels"]
            with torch.no_grad():  # reported loss: plain cross-entropy with the true labels, as val_loss
                plain_loss = F.cross_entropy(logits.detach().float(), labels, reduction="none")
                running += torch.stack([(plain_loss * valid).sum().nan_to_num(0, 0, 0),
                                        ((logits.argmax(1) == labels).float() * valid).sum(), valid.sum()])
            bar.update()
            if step % LOG_EVERY == 0 and bar.disable is False:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if guard is not None:
                guard.observe(loss, step)
            if options.on_step is not None and options.on_step(step, stepped):
                break
    if guard is not None:
        guard.check()  # before the caller evaluates or saves anything
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = _sum_over_processes(accelerator, running)
    return EpochStats(loss=loss_sum / max(seen, 1), accuracy=correct / max(seen, 1), samples=int(seen),
                      seconds=seconds, data_wait=wait.share(seconds))


def _sum_over_processes(accelerator: Accelerator, running: torch.Tensor) -> list[float]:
    """The epoch's sums over all processes, on the host: a host sync, once an epoch."""
    return accelerator.reduce(running.clone(), reduction="sum").tolist()


def _accumulation_tail(batches: int, accumulate: int) -> tuple[int, float]:
    """The first batch of an epoch's last, short accumulation cycle and the factor its losses need.

    Accelerate divides every loss by --grad-accum-steps N and updates after each N batches and at
    the end of the epoch; k < N batches left over would apply k/N of their mean gradient. Scaled
    by N/k, that update gets their mean gradient, as a full cycle does."""
    left_over = batches % accumulate
    return (batches - left_over, accumulate / left_over) if left_over else (batches, 1.0)


def _stand_in_for_undecoded(images: torch.Tensor, labels: torch.Tensor,
                            valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images that did not decode hold another image's pixels (or zeros) under their own label:
    before MixUp/CutMix blends them into their neighbours, give each the first valid image's pixels
    and label, so that every mixed target names the pixels it holds. Device ops only (no host sync)."""
    first = valid.to(torch.uint8).argmax()
    keep = valid.bool()
    return (torch.where(keep[:, None, None, None], images, images[first]),
            torch.where(keep, labels, labels[first]))


def _train_step(accelerator: Accelerator, model: nn.Module, batch: dict, optimizer, scheduler, loss_fn: Callable,
                options: EpochOptions, loss_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Forward, backward and (at the end of an accumulation cycle) the update for one batch;
    returns the loss, the logits, which images decoded (as 0/1 floats) and whether the weights
    were updated. `loss_scale` weights the gradient (see _accumulation_tail), not the loss returned."""
    images, labels, valid = _images(batch, options.channels_last), batch["labels"], batch["valid"].float()
    targets = labels
    if options.batch_transform is not None:
        images, targets = options.batch_transform(*_stand_in_for_undecoded(images, labels, valid))
    guard = options.guard
    with accelerator.accumulate(model):
        if guard is not None:
            guard.protect(model)
        logits = model(images)
        # the mean over the images that decoded (see data.collate); 0 when none did
        loss = (loss_fn(logits, targets) * valid).sum() / valid.sum().clamp(min=1)
        accelerator.backward(loss * loss_scale if loss_scale != 1.0 else loss)
        skipped = guard is not None and guard.skip_update(model)
        if not skipped:
            optimizer.step()
        # fp16: the GradScaler skips steps whose gradients overflowed (a host sync it makes anyway)
        stepped = accelerator.sync_gradients and not skipped and not getattr(optimizer, "step_was_skipped", False)
        if stepped and scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, logits, valid, stepped


def predict_logits(model: nn.Module, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The model's class scores for a batch: its logits, or with tta="flip" the log of the mean
    of the softmax probabilities of each image and its horizontal mirror.

    Probabilities rather than logits are averaged so that each view gets one vote on the same
    0-1 scale (an over-confident view cannot outvote the other with a large logit), and the
    result is what we report: the mean probability. Its log is a valid logit vector
    (softmax(log p) = p), so softmax, argmax and cross-entropy downstream work unchanged.
    One place for eval.py and predict, so both average the same way."""
    if tta == "none":
        return model(images)
    if tta != "flip":
        raise ValueError(f"unknown test-time augmentation {tta!r}")
    views = torch.stack([F.log_softmax(model(images).float(), dim=1),
                         F.log_softmax(model(images.flip(-1)).float(), dim=1)])
    return torch.logsumexp(views, dim=0) - math.log(2)


@torch.inference_mode()
def evaluate(accelerator: Accelerator, model: nn.Module, loader, desc: str = "eval",
             channels_last: bool = True, tta: str = "none") -> EvalOutput:
    """Scores, labels and per-example losses for every example exactly once, on every process
    (scores: logits; with `tta`, see predict_logits)."""
    model.eval()
    release_freed_memory()  # before the loader's workers may be forked (see release_freed_memory)
    parts: list[tuple[torch.Tensor, ...]] = []  # per batch, gathered, on the device until the end
    start = time.perf_counter()
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                      disable=not show_progress(accelerator)):
        # the launch's mixed precision for any model: a prepared one has it already, the EMA's
        # module (never prepared) would otherwise run in fp32
        with accelerator.autocast():
            logits = predict_logits(model, _images(batch, channels_last), tta).float()
        per_example = F.cross_entropy(logits, batch["labels"], reduction="none")
        # every process gathers batches of equal size; images that did not decode are left out after
        parts.append(accelerator.gather_for_metrics((logits, batch["labels"], per_example, batch["valid"])))
    scores, labels, losses, valid = _to_host(parts)
    return EvalOutput(scores=scores[valid].numpy(), labels=labels[valid].numpy(), losses=losses[valid].numpy(),
                      seconds=time.perf_counter() - start)


def _to_host(parts: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """Each field of the batches' gathered outputs, concatenated on the device and copied to the
    host: the one host sync of an evaluation (a copy per batch would wait for every batch)."""
    if not parts:
        return [torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, dtype=torch.bool)]
    return [torch.cat(field).cpu() for field in zip(*parts)]

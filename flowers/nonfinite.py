"""NaN/Inf training losses: stop the run in one line (keeping the last good checkpoint), or skip
the updates they would poison (`--on-nan skip`).

Cost: the training loop never waits for the device per step in "stop" mode. Each step records,
on the device, the first step whose loss was not finite; that flag is read (one tiny gather
across processes) every CHECK_EVERY steps and at the end of the epoch, before anything is saved.
A NaN found there stops the run at most CHECK_EVERY steps later than a per-step check would, and
all processes stop at the same step. "skip" has to decide before optimizer.step(), so it reads
one flag per optimizer step (one host sync, as fp16's GradScaler does anyway); it checks the
gradients after they are averaged across processes, so every process skips the same steps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator

from flowers.errors import UserError

CHECK_EVERY = 25  # steps between checks in "stop" mode (each is one small gather + host sync)


class NonFiniteLoss(UserError):
    """The training loss became NaN or Inf."""


class NonFiniteGuard:
    def __init__(self, accelerator: Accelerator, policy: str = "stop", run_dir: Optional[Path] = None):
        self.accelerator, self.policy, self.run_dir = accelerator, policy, run_dir
        self.epoch, self.steps, self.skipped_in_epoch = 0, 0, 0
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)
        self._saved_buffers: Optional[list[torch.Tensor]] = None

    def start_epoch(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps, self.skipped_in_epoch = epoch, steps, 0
        self._first_bad_step.fill_(-1)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Record a non-finite loss without a host sync; check every CHECK_EVERY steps."""
        if self.policy != "stop":
            return
        bad = ~torch.isfinite(loss.detach()) & (self._first_bad_step < 0)
        self._first_bad_step = torch.where(bad, step, self._first_bad_step)
        if (step + 1) % CHECK_EVERY == 0:
            self.check()

    def check(self) -> None:
        """Raise NonFiniteLoss (on every process alike) when any process saw a non-finite loss."""
        if self.policy != "stop":
            return
        steps = self.accelerator.gather(self._first_bad_step.reshape(1))
        bad = steps[steps >= 0]
        if bad.numel():
            raise NonFiniteLoss(self._stop_message(int(bad.min()) + 1))

    def protect(self, model: torch.nn.Module) -> None:
        """--on-nan skip: before the forward pass of an optimizer step's first batch, keep a copy of
        the buffers (BatchNorm running statistics), which a poisoned forward pass already changes."""
        if self.policy == "skip" and self._saved_buffers is None:
            self._saved_buffers = [b.detach().clone() for b in model.buffers()]

    def skip_update(self, model: torch.nn.Module) -> bool:
        """--on-nan skip: True (skip optimizer.step) when the synced gradients are not all finite;
        the buffers are then put back as they were before this step's batches."""
        if self.policy != "skip" or not self.accelerator.sync_gradients:
            return False
        saved, self._saved_buffers = self._saved_buffers, None
        if self.accelerator.scaler is not None:
            return False  # fp16's GradScaler already skips overflowing steps and rescales
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            return False
        if saved:
            torch._foreach_copy_(list(model.buffers()), saved)
        self.skipped_in_epoch += 1
        return True

    def epoch_summary(self) -> Optional[str]:
        if not self.skipped_in_epoch:
            return None
        return (f"warning: epoch {self.epoch}: skipped {self.skipped_in_epoch} update(s) with a non-finite "
                "loss or gradient (--on-nan skip)")

    def _stop_message(self, step: int) -> str:
        return (f"non-finite training loss (NaN or Inf) at epoch {self.epoch}, step {step} of {self.steps}; "
                f"stopped without saving this epoch. {self._kept()} Try a lower --lr, or --on-nan skip "
                "to skip such batches")

    def _kept(self) -> str:
        return _kept(self.run_dir)


def check_validation_loss(loss: float, epoch: int, run_dir: Optional[Path]) -> None:
    """A last guard before saving: weights that give a NaN validation loss are not a checkpoint."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"validation loss is {loss} after epoch {epoch}: the weights are no longer "
                            f"finite; stopped without saving this epoch. {_kept(run_dir)}")


def _kept(run_dir: Optional[Path]) -> str:
    last = run_dir / "last" if run_dir is not None else None
    if last is not None and last.is_dir():
        return f"The last good checkpoint is kept: {last}."
    return "No checkpoint had been saved yet."

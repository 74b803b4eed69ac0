"""Optimizer and learning-rate schedule from the training config.

Every schedule is a factor of the peak --lr as a function of the optimizer step, stepped once per
optimizer step, so it resumes mid-epoch and works with gradient accumulation. The factor objects
are plain classes (not lambdas) so LambdaLR can save and restore them.
"""

from __future__ import annotations

import copy
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from flowers.config import TrainConfig

ONECYCLE_START = 1 / 25      # onecycle starts at lr/25 (as torch's OneCycleLR) ...
ONECYCLE_END = 1e-4          # ... and anneals to lr/1e4
ONECYCLE_DEFAULT_WARMUP = 0.3


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """`params`: parameters or parameter groups (see recipe.parameter_groups).

    The fused implementations update every parameter in one kernel instead of one loop per
    tensor: several times cheaper on a CPU, and one launch instead of one per parameter on a GPU
    (measurements: docs/performance.md)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True,
                           fused=True)


class Schedule:
    """lr factor = warmup(step) * shape(step); subclasses define the shape after warmup.

    `frozen_steps` > 0 gives factor 0 for the first steps (a frozen backbone's parameter group).
    """

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total_steps, self.warmup_steps = max(1, total_steps), min(warmup_steps, max(0, total_steps - 1))
        self.frozen_steps = 0

    def warmup(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0

    def progress(self, step: int) -> float:
        """0 at the end of warmup, 1 at the last step."""
        span = max(1, self.total_steps - self.warmup_steps)
        return min(1.0, max(0.0, (step - self.warmup_steps) / span))

    def shape(self, step: int) -> float:
        return 1.0

    def __call__(self, step: int) -> float:
        if step < self.frozen_steps:
            return 0.0
        return self.warmup(step) * self.shape(step)


class StepSchedule(Schedule):
    """gamma ** (epochs done // step_size)."""

    def __init__(self, total_steps: int, warmup_steps: int, steps_per_epoch: int, step_size: int, gamma: float):
        super().__init__(total_steps, warmup_steps)
        self.steps_per_epoch, self.step_size, self.gamma = steps_per_epoch, step_size, gamma

    def shape(self, step: int) -> float:
        return self.gamma ** (step // (self.steps_per_epoch * self.step_size))


class CosineSchedule(Schedule):
    """Half a cosine from 1 to 0 between the end of warmup and the last step."""

    def shape(self, step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * self.progress(step)))


class OneCycleSchedule(Schedule):
    """Linear rise from lr/25 to lr during warmup, then cosine down to lr/1e4 (learning rate only)."""

    def warmup(self, step: int) -> float:
        if not self.warmup_steps or step >= self.warmup_steps:
            return 1.0
        return ONECYCLE_START + (1 - ONECYCLE_START) * step / self.warmup_steps

    def shape(self, step: int) -> float:
        if step < self.warmup_steps:
            return 1.0
        return ONECYCLE_END + (1 - ONECYCLE_END) * 0.5 * (1 + math.cos(math.pi * self.progress(step)))


def build_schedule(cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    total = cfg.epochs * steps_per_epoch
    warmup_epochs = cfg.warmup_epochs
    if cfg.scheduler == "onecycle" and warmup_epochs == 0:
        warmup_epochs = ONECYCLE_DEFAULT_WARMUP * cfg.epochs
    warmup = round(warmup_epochs * steps_per_epoch)
    if cfg.scheduler == "step":
        return StepSchedule(total, warmup, steps_per_epoch, cfg.step_size, cfg.gamma)
    if cfg.scheduler == "cosine":
        return CosineSchedule(total, warmup)
    if cfg.scheduler == "onecycle":
        return OneCycleSchedule(total, warmup)
    return Schedule(total, warmup)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LambdaLR:
    """One schedule for every group; with --freeze-backbone N, the backbone groups' learning rate
    is 0 for the first N epochs (groups are named by recipe.parameter_groups)."""
    schedule = build_schedule(cfg, steps_per_epoch)
    backbone = copy.copy(schedule)
    backbone.frozen_steps = max(0, cfg.freeze_backbone) * steps_per_epoch
    return LambdaLR(optimizer, [backbone if group.get("name") == "backbone" else schedule
                                for group in optimizer.param_groups])

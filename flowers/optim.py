"""Optimizer and learning-rate schedule from the training config."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from flowers.config import TrainConfig


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


class StepSchedule:
    """lr factor gamma ** (epochs done // step_size), stepped once per optimizer step."""

    def __init__(self, steps_per_epoch: int, step_size: int, gamma: float):
        self.steps_per_epoch, self.step_size, self.gamma = steps_per_epoch, step_size, gamma

    def __call__(self, step: int) -> float:
        return self.gamma ** (step // (self.steps_per_epoch * self.step_size))


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LambdaLR:
    """A per-optimizer-step schedule (so it resumes mid-epoch and works with accumulation)."""
    if cfg.scheduler == "step":
        factor = StepSchedule(steps_per_epoch, cfg.step_size, cfg.gamma)
    else:
        factor = lambda step: 1.0  # noqa: E731
    return LambdaLR(optimizer, factor)

"""Training-recipe pieces around the plain loop: loss, MixUp/CutMix, EMA, backbone freezing and
early stopping. Stateful pieces have state_dict/load_state_dict so exact resume restores them."""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn
from torchvision.transforms import v2

from flowers.config import TrainConfig

BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_loss(cfg: TrainConfig) -> nn.Module:
    """Cross-entropy with label smoothing; also takes the soft targets MixUp/CutMix produce."""
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def make_batch_transform(cfg: TrainConfig, num_classes: int) -> Optional[BatchTransform]:
    """MixUp and/or CutMix on whole batches (one of the two, chosen per batch, when both are on)."""
    mixers = []
    if cfg.mixup > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def is_head(name: str) -> bool:
    return name.startswith("fc.")


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if not is_head(name)]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if is_head(name)]


def freeze_for_whole_run(cfg: TrainConfig) -> bool:
    return cfg.freeze_backbone == -1 or cfg.freeze_backbone >= cfg.epochs


def parameter_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """[backbone, head] groups (head only when the backbone stays frozen for the whole run).

    Freezing for the first N epochs is done by the schedule (backbone learning rate 0, see
    optim.build_scheduler), so it resumes exactly and needs no change to a DDP-wrapped model; freezing for
    the whole run turns the backbone's gradients off, which is also faster.
    """
    if freeze_for_whole_run(cfg):
        for p in backbone_parameters(model):
            p.requires_grad_(False)
        return [{"params": head_parameters(model)}]
    return [{"params": backbone_parameters(model)}, {"params": head_parameters(model)}]


class EarlyStopping:
    """Stop when the monitored value (higher is better) has not improved for `patience` epochs."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = float("-inf")
        self.bad_epochs = 0

    def step(self, value: float) -> bool:
        """Record one epoch's value; True when training should stop now."""
        if value > self.best:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])


class WeightEMA:
    """Exponential moving average of a model's weights: ema = decay * ema + (1 - decay) * weights.

    Floating-point parameters and buffers (BatchNorm running statistics) are averaged; integer
    buffers (num_batches_tracked) are copied. Updated after every optimizer step.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for name, average in self.module.state_dict().items():
            value = current[name].detach()
            if average.dtype.is_floating_point:
                average.lerp_(value.to(average.dtype), 1 - self.decay)
            else:
                average.copy_(value)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)

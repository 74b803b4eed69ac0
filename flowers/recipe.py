"""Training-recipe pieces around the plain loop: loss, MixUp/CutMix, EMA, backbone freezing and
early stopping. Stateful pieces have state_dict/load_state_dict so exact resume restores them."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torchvision.transforms import v2

from flowers.config import TrainConfig
from flowers.model import head_name, in_head

BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_loss(cfg: TrainConfig, class_weights: Optional[torch.Tensor] = None) -> nn.Module:
    """Per-example cross-entropy with label smoothing (the training loop averages it over the
    images that decoded); also takes the soft targets MixUp/CutMix produce. With `class_weights`
    (--class-weights auto, see balance.py) each example's loss is scaled by its class's weight
    (see ClassWeightedCrossEntropy)."""
    if class_weights is None:
        return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="none")
    return ClassWeightedCrossEntropy(class_weights, cfg.label_smoothing)


class ClassWeightedCrossEntropy(nn.Module):
    """Cross-entropy (with label smoothing) of each example times the weight of its class: w[y] for
    a label y, sum_c q_c w_c for a MixUp/CutMix target q (the weights of the classes it mixes).

    Not torch's `CrossEntropyLoss(weight=...)`: that weights each class's term of the smoothed
    target, so with large weights the smoothing mass alone (eps / C of every example, times the
    rare class's weight) pulls every prediction towards the rare class."""

    def __init__(self, weight: torch.Tensor, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.plain = nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        example_weight = self.weight[target] if target.dim() == 1 else target.to(self.weight.dtype) @ self.weight
        return self.plain(logits, target) * example_weight


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


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    head = head_name(model)
    return [p for name, p in model.named_parameters() if not in_head(name, head)]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classification head's parameters, wherever the architecture keeps it (see model.head_name)."""
    head = head_name(model)
    return [p for name, p in model.named_parameters() if in_head(name, head)]


def freeze_for_whole_run(cfg: TrainConfig) -> bool:
    return cfg.freeze_backbone == -1 or cfg.freeze_backbone >= cfg.epochs


def _decays(param: nn.Parameter) -> bool:
    """Weight decay for weight matrices and convolution kernels only: biases and normalisation
    weights are 1-dimensional, and shrinking them towards 0 only hurts (as timm and the Hugging
    Face scripts do)."""
    return param.ndim > 1


def parameter_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """Parameter groups named backbone/head, each split into weight-decayed and not-decayed
    parameters (head groups only when the backbone stays frozen for the whole run). The head's
    groups come last.

    Freezing for the first N epochs is done by the schedule (backbone learning rate 0, see
    optim.build_scheduler), so it resumes exactly and needs no change to a DDP-wrapped model; freezing for
    the whole run turns the backbone's gradients off, which is also faster.
    """
    parts = {"head": head_parameters(model)}
    if freeze_for_whole_run(cfg):
        for p in backbone_parameters(model):
            p.requires_grad_(False)
    else:
        parts = {"backbone": backbone_parameters(model), **parts}
    groups = []
    for name, params in parts.items():
        for decayed in (True, False):
            chosen = [p for p in params if _decays(p) == decayed]
            if chosen:
                groups.append({"params": chosen, "name": name, "weight_decay": cfg.weight_decay if decayed else 0.0})
    return groups


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
    """Exponential moving average of a model's weights and buffers (BatchNorm running statistics).

    The decay warms up: after t updates it is min(decay, (1 + t) / (10 + t)), so the average
    forgets the initial weights within the first few dozen steps instead of keeping decay**steps
    of them (17% after 1,775 steps at 0.999). The first update copies the weights; integer buffers
    (num_batches_tracked) are copied. Build it from the plain model (not DDP-wrapped, not
    compiled) and update it from `accelerator.unwrap_model(model, keep_torch_compile=False)`, so
    its keys are the model's own.

    torch's AveragedModel holds the copy and gives the saved state its layout ("module.*" and
    "n_averaged"), but its update_parameters reads its on-device counter twice per update (a host
    sync each). The update here is the same arithmetic (a foreach lerp, bit-identical) with the
    count kept on the host, so the host never waits for the device: runs saved either way resume
    exactly."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.averaged = AveragedModel(model, use_buffers=True).eval()
        self.module = self.averaged.module
        self.module.requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        """The decay applied by the update that follows `updates` earlier ones."""
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module, distributed: bool = False) -> None:
        """After an optimizer step; device ops only, the decay computed on the host.

        `distributed` (DDP): the parameters are the same on every process, but each process's
        BatchNorm statistics saw only its own batch. DDP gives every process the first one's at
        the start of the next forward pass (broadcast_buffers); doing that now, before averaging,
        keeps the average the same on every process, at the cost of one broadcast per step."""
        if distributed:
            _broadcast_buffers_from_main(model)
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        floating = [i for i, t in enumerate(averaged) if t.is_floating_point()]
        others = [i for i, t in enumerate(averaged) if not t.is_floating_point()]
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_([averaged[i] for i in floating], [current[i] for i in floating],
                                 1 - self.decay_at(self.updates))
            if others:
                torch._foreach_copy_([averaged[i] for i in others], [current[i] for i in others])
        self.updates += 1

    def to(self, device) -> "WeightEMA":
        self.averaged.to(device)
        return self

    def state_dict(self) -> dict:
        self.averaged.n_averaged.fill_(self.updates)  # AveragedModel's count, as its own update keeps it
        return {"averaged": self.averaged.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if "averaged" not in state:  # saved before AveragedModel (no warmup): the module's weights alone
            self.module.load_state_dict(state)
            self.updates = 10**9  # past any warmup: decay_at() is the configured decay
            self.averaged.n_averaged.fill_(self.updates)
            return
        self.averaged.load_state_dict(state["averaged"])
        self.updates = int(state["updates"])


def _broadcast_buffers_from_main(model: nn.Module) -> None:
    """The first process's floating-point buffers on every process, in one collective."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if buffers:
        flat = _flatten_dense_tensors(buffers)
        torch.distributed.broadcast(flat, src=0)
        torch._foreach_copy_(buffers, list(_unflatten_dense_tensors(flat, buffers)))

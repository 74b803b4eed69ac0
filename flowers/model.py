"""ResNet18 with its head replaced for our classes; initial weights from ImageNet, none, or a file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from flowers.checkpoint import WRAPPER_PREFIXES, without_wrapper_prefixes
from flowers.errors import UserError

ARCH = "resnet18"


def initial_state(weights: str) -> Optional[dict[str, torch.Tensor]]:
    """The state dict `--weights` names: imagenet, none (-> None), or a path. Fails fast, in one line."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return _imagenet_state_dict()
    return load_state_dict_file(weights)


def build_model(num_classes: int, weights: Union[str, dict, None] = None, dropout: float = 0.0) -> nn.Module:
    """ResNet18 with a `num_classes` head.

    `weights`: a `--weights` value (imagenet, none, a path) or a state dict from initial_state().
    The backbone always loads; a saved head loads only when it has our shape (our checkpoints).
    """
    state = initial_state(weights) if isinstance(weights, str) else weights
    model = resnet18(weights=None)
    if state is not None:
        _load_backbone(model, state)
    in_features = model.fc.in_features
    head = nn.Linear(in_features, num_classes)
    model.fc = nn.Sequential(nn.Dropout(dropout), head) if dropout > 0 else head
    if state is not None:
        _load_head_if_matching(model, state)
    return model


def imagenet_cache_path() -> Path:
    url = ResNet18_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _imagenet_state_dict() -> dict:
    """torchvision's ImageNet weights: from the torch cache, else downloaded (real users are online)."""
    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # offline (URLError), proxy, corrupt cache
        raise UserError(
            f"ImageNet weights unavailable ({type(e).__name__}): put resnet18-f37072fd.pth at "
            f"{imagenet_cache_path()} (or set $TORCH_HOME), pass --weights PATH, or use --weights none"
        ) from None


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, a checkpoint folder, or a .pth (never unpickling code)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise UserError(f"--weights {path}: no such file (expected imagenet, none, or a path)")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{p}: not a valid safetensors file ({e})") from None
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)  # never runs code from the file
        except pickle.UnpicklingError:
            raise UserError(f"{p}: refused: this pickle holds more than tensors (objects or code that would run "
                            "on loading); only plain weights are loaded (torch.load weights_only=True). Use a "
                            ".safetensors file or a checkpoint folder") from None
        except Exception as e:
            raise UserError(f"{p}: not a loadable weights file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserError(f"{p}: does not hold a state dict")
    return without_wrapper_prefixes(state)  # DDP's module., torch.compile's _orig_mod., in any combination


def _is_head(key: str) -> bool:
    return key.startswith("fc.")


def match_head_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A head saved with or without dropout (fc.1.* vs fc.*) fits a model built the other way."""
    with_dropout = "fc.1.weight" in model.state_dict()
    renamed = {}
    for key, value in state.items():
        if key.startswith("fc."):
            key = "fc." + key.removeprefix("fc.1.").removeprefix("fc.")
            key = key.replace("fc.", "fc.1.", 1) if with_dropout else key
        renamed[key] = value
    return renamed


def describe_mismatch(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> Optional[str]:
    """None when `theirs` loads strictly into a model whose state dict is `ours`; else one sentence:
    how many keys are missing, unexpected or of another shape, a few of them, and the likely cause."""
    # BatchNorm fills in a missing num_batches_tracked (state dicts older than torch 0.4.1 lack it)
    missing = [k for k in ours if k not in theirs and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in theirs if k not in ours]
    reshaped = [k for k in ours if k in theirs and tuple(theirs[k].shape) != tuple(ours[k].shape)]
    if not (missing or unexpected or reshaped):
        return None
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
             for keys, what in ((missing, "missing keys"), (unexpected, "unexpected keys")) if keys]
    if reshaped:
        shapes = ", ".join(f"{k} {list(theirs[k].shape)} instead of {list(ours[k].shape)}" for k in reshaped[:2])
        parts.append(f"{len(reshaped)} of another shape (e.g. {shapes})")
    return "; ".join(parts) + f"; likely cause: {_likely_cause(missing, unexpected, reshaped)}"


def _likely_cause(missing: list[str], unexpected: list[str], reshaped: list[str]) -> str:
    if unexpected and all(k.startswith(WRAPPER_PREFIXES) for k in unexpected):
        return "the keys carry a wrapper prefix (DDP's module. or torch.compile's _orig_mod.)"
    if all(_is_head(k) for k in missing + unexpected + reshaped):
        if reshaped:
            return "trained for another number of classes (only the classification head differs)"
        return "a head saved with --dropout loaded without it, or the reverse (fc.1.* vs fc.*)"
    if missing or unexpected:
        return f"weights of another architecture than {ARCH} (e.g. a deeper ResNet)"
    return f"a modified {ARCH} (layers of other sizes)"


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    backbone = {k: v for k, v in state.items() if not _is_head(k)}
    problem = describe_mismatch({k: v for k, v in model.state_dict().items() if not _is_head(k)}, backbone)
    if problem:
        raise UserError(f"weights do not fit {ARCH}: {problem}")
    model.load_state_dict(backbone, strict=False)


def _load_head_if_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Keep a saved head when it has our shape (our own checkpoints, with or without --dropout);
    else the fresh one stays."""
    ours = {k: v for k, v in model.state_dict().items() if _is_head(k)}
    theirs = {k: v for k, v in match_head_keys(state, model).items() if _is_head(k)}
    if set(ours) == set(theirs) and all(ours[k].shape == theirs[k].shape for k in ours):
        model.load_state_dict(theirs, strict=False)


def load_model_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Optional[str] = None) -> None:
    """Load a full state dict (ours) strictly; a mismatch is one sentence (see describe_mismatch)."""
    problem = describe_mismatch(model.state_dict(), state)
    if problem:
        raise UserError(f"{source or 'weights'} do not fit this model: {problem}")
    model.load_state_dict(state, strict=True)

"""ResNet18 with its head replaced for our classes; initial weights from ImageNet, none, or a file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

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
            return load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{p}: not a valid safetensors file ({e})") from None
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
    return {k.removeprefix("module."): v for k, v in state.items()}


def _is_head(key: str) -> bool:
    return key.startswith("fc.")


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    backbone = {k: v for k, v in state.items() if not _is_head(k)}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    missing = [k for k in missing if not _is_head(k)]
    if missing or unexpected:
        raise UserError(f"weights do not fit {ARCH}: {len(missing)} missing and "
                        f"{len(unexpected)} unexpected keys (e.g. {(missing + unexpected)[0]})")


def _load_head_if_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Keep a saved head when it has our shape (our own checkpoints); else the fresh one stays."""
    ours = {k: v for k, v in model.state_dict().items() if _is_head(k)}
    theirs = {k: v for k, v in state.items() if _is_head(k)}
    if set(ours) == set(theirs) and all(ours[k].shape == theirs[k].shape for k in ours):
        model.load_state_dict(theirs, strict=False)


def load_model_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Optional[str] = None) -> None:
    """Load a full state dict (ours) strictly, with one line on a mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{source or 'weights'} do not fit this model: {str(e).splitlines()[1].strip()}") from None

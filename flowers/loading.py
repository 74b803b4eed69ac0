"""Models from files: `--weights imagenet|none|PATH` as a state dict, and a checkpoint folder rebuilt
as the model it describes.

The one place where files meet modules: checkpoint.py reads and writes folders (and imports no
model code), model.py builds modules (and opens no files); this module joins the two.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from flowers import checkpoint
from flowers.errors import UserError
from flowers.model import DEFAULT_ARCH, build_model, imagenet_or_none, load_model_weights, without_wrapper_prefixes


def initial_state(weights: str, arch: str = DEFAULT_ARCH) -> Optional[dict[str, torch.Tensor]]:
    """The state dict `--weights` names: imagenet (that of `arch`), none (-> None), or a path. Fails
    fast, in one line."""
    if weights in ("imagenet", "none"):
        return imagenet_or_none(weights, arch)
    return load_state_dict_file(weights)


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


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint folder describes (its recorded architecture: resnet18 for
    checkpoints older than --arch) and load its weights."""
    meta = checkpoint.load_meta(path)
    state = without_wrapper_prefixes(checkpoint.load_weights(path))  # --compile runs' _orig_mod. keys
    try:
        model = build_model(int(meta["num_classes"]), "none", dropout=float(meta["config"].get("dropout", 0.0)),
                            arch=str(meta.get("arch") or DEFAULT_ARCH))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}/{checkpoint.META_FILE} lacks a valid {e}") from None
    load_model_weights(model, state, source=str(path))
    return model, meta

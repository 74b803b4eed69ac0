"""A torchvision classifier (`--arch`, default resnet18) with its head replaced for our classes;
initial weights from ImageNet, none, or a file.

Any model of `torchvision.models.list_models(module=torchvision.models)` whose classifier ends in
an nn.Linear is built through torchvision's registry; its head is that last nn.Linear wherever the
model keeps it (fc, classifier.1, heads.head, head ...), so nothing here is written per model.
"""

from __future__ import annotations

import difflib
import functools
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torchvision.models
from torch import nn
from torchvision.models import get_model, get_model_weights

from flowers.errors import UserError

DEFAULT_ARCH = "resnet18"


def imagenet_or_none(weights: str, arch: str = DEFAULT_ARCH) -> Optional[dict[str, torch.Tensor]]:
    """`--weights imagenet` (the state dict of `arch`) or none (-> None); files are loading's."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return _imagenet_state_dict(arch)
    raise ValueError(f"weights {weights!r}: read a file with flowers.loading.initial_state")


# Key prefixes that wrappers add: DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`), in
# any order (`module._orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def without_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def plain(key: str) -> str:
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        return key
    return {plain(key): value for key, value in state.items()}


def build_model(num_classes: int, weights: Union[str, dict, None] = None, dropout: float = 0.0,
                arch: str = DEFAULT_ARCH) -> nn.Module:
    """The `arch` classifier with a `num_classes` head (behind a Dropout when `dropout` > 0).

    `weights`: imagenet, none, or a state dict (loading.initial_state reads a `--weights` PATH).
    The backbone always loads; a saved head loads only when it has our shape (our checkpoints).
    The model's `arch` attribute names its architecture (for messages and checks).
    """
    check_arch(arch)
    state = imagenet_or_none(weights, arch) if isinstance(weights, str) else weights
    state = without_wrapper_prefixes(state) if state is not None else None
    model = get_model(arch, weights=None)
    model.arch = arch
    if state is not None:
        _load_backbone(model, state)
    _replace_head(model, num_classes, dropout)
    if state is not None:
        _load_head_if_matching(model, state)
    return model


# ---- which architectures, and which image sizes ------------------------------------------------------

def classifier_names() -> list[str]:
    """torchvision's image classifiers (not its detection, segmentation, video or quantized models)."""
    return torchvision.models.list_models(module=torchvision.models)


def check_arch(arch: str, image_size: Optional[int] = None) -> None:
    """One line when `--arch` names no classifier we can fine-tune, or `--image-size` does not fit
    it (ViT takes one size only; small inputs vanish in some networks). Checked on a model without
    memory (meta device), so it costs a fraction of a second and no download."""
    skeleton(arch)
    if image_size is not None:
        _check_image_size(arch, image_size)


def _unknown_arch(arch: str) -> str:
    if arch.startswith("quantized_"):
        return (f"--arch {arch}: quantized models are int8 models for inference and cannot be fine-tuned; "
                f"use --arch {arch.removeprefix('quantized_')}")
    if arch in torchvision.models.list_models():
        return f"--arch {arch}: a torchvision model, but not an image classifier (detection, segmentation or video)"
    close = difflib.get_close_matches(arch.lower(), classifier_names(), n=4, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "e.g. resnet18, mobilenet_v3_small, efficientnet_b0"
    return (f"--arch {arch}: not a torchvision classification model ({hint}; all of them: "
            "torchvision.models.list_models(module=torchvision.models))")


@functools.lru_cache(maxsize=None)
def skeleton(arch: str) -> nn.Module:
    """`arch` on the meta device (shapes, no data), after checking that we can replace its head.
    Cached and shared: read it, never change it."""
    if arch not in classifier_names():
        raise UserError(_unknown_arch(arch))
    from accelerate import init_empty_weights

    # Parameters go to the meta device as they are made (their initialisation draws no random numbers
    # of the run); other tensors stay real, as RegNet reads its block widths back while building.
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Inception's and GoogLeNet's initialisation notice
        model = get_model(arch, weights=None)
    model.to("meta")
    if getattr(model, "aux_logits", False):
        raise UserError(f"--arch {arch} is not supported: it returns auxiliary classifier outputs while training "
                        "(Inception/GoogLeNet), which this training loop does not combine")
    if _last_linear(model) is None:
        raise UserError(f"--arch {arch} is not supported: its classifier is not an nn.Linear (e.g. SqueezeNet's "
                        "convolutional head), so there is no head to replace")
    return model.eval()


def check_eval_size(arch: str, eval_size: Optional[int]) -> None:
    """eval.py's and predict's --eval-size on a checkpoint of `arch`: one line when the model cannot
    take images of that size (ViT: its position embeddings are one per patch of its own size)."""
    if eval_size is None:
        return
    fixed = getattr(skeleton(arch), "image_size", None)  # VisionTransformer's only input size
    if isinstance(fixed, int) and eval_size != fixed:
        raise UserError(f"--eval-size {eval_size}: this checkpoint's {arch} takes {fixed} px images only "
                        "(torchvision's VisionTransformer has a position embedding per patch of that size); "
                        "leave --eval-size out")
    try:
        _check_image_size(arch, eval_size)
    except UserError as e:
        raise UserError(f"--eval-size {eval_size} does not fit this checkpoint's {arch} ({e})") from None


@functools.lru_cache(maxsize=None)
def _check_image_size(arch: str, image_size: int) -> None:
    """A forward pass of a meta-device image: shape errors without any arithmetic."""
    model = skeleton(arch)
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, image_size, image_size, device="meta"))
    except Exception as e:  # an assertion (ViT) or a shape error deep inside the network
        fixed = getattr(model, "image_size", None)  # VisionTransformer's only input size
        if isinstance(fixed, int):
            raise UserError(f"--arch {arch} takes {fixed} px images only (torchvision's VisionTransformer); "
                            f"use --image-size {fixed}, not {image_size}") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        minimum = get_model_weights(arch).DEFAULT.meta.get("min_size", ("?",))[0]
        raise UserError(f"--image-size {image_size} does not fit --arch {arch} ({reason[:160]}); its ImageNet "
                        f"weights were made for {minimum} px and up") from None


# ---- the head ----------------------------------------------------------------------------------

class DropoutHead(nn.Sequential):
    """`--dropout`'s head: Dropout, then the new Linear (keys `<head>.1.*`), in the place of the
    model's own last Linear. A class of its own so that head_name() tells it from a model's own
    Sequential (EfficientNet's classifier is a Dropout and a Linear too)."""

    def __init__(self, p: float, linear: nn.Linear):
        super().__init__(nn.Dropout(p), linear)


def _last_linear(model: nn.Module) -> Optional[str]:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def head_name(model: nn.Module) -> str:
    """Where the classification head sits (fc, classifier.1, heads.head, head ...): the model's last
    nn.Linear, or the DropoutHead holding ours. Its parameters are `<head_name>.*`."""
    name = _last_linear(model)
    if name is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    parent = name.rpartition(".")[0]
    return parent if parent and isinstance(model.get_submodule(parent), DropoutHead) else name


def in_head(key: str, head: str) -> bool:
    """Whether a parameter/state-dict key belongs to the head named `head` (see head_name)."""
    return key.startswith(head + ".")


def _replace_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    name = head_name(model)
    parent, _, attribute = name.rpartition(".")
    linear = nn.Linear(model.get_submodule(name).in_features, num_classes)
    setattr(model.get_submodule(parent) if parent else model, attribute,
            DropoutHead(dropout, linear) if dropout > 0 else linear)


def arch_of(model: nn.Module) -> str:
    """The architecture build_model() built (see its `arch` attribute)."""
    return getattr(model, "arch", type(model).__name__)


# ---- initial weights ---------------------------------------------------------------------------

def imagenet_cache_path(arch: str = DEFAULT_ARCH) -> Path:
    """Where torch keeps `arch`'s default ImageNet weights (under $TORCH_HOME)."""
    url = get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _imagenet_state_dict(arch: str) -> dict:
    """torchvision's default ImageNet weights of `arch`: from the torch cache, else downloaded (real
    users are online). Loaded by torchvision's own builder, which also renames the keys of old
    weight files (DenseNet's)."""
    try:
        return get_model(arch, weights=get_model_weights(arch).DEFAULT).state_dict()
    except Exception as e:  # offline (URLError), proxy, corrupt cache
        cached = imagenet_cache_path(arch)
        raise UserError(
            f"ImageNet weights unavailable ({type(e).__name__}): put {cached.name} at "
            f"{cached} (or set $TORCH_HOME), pass --weights PATH, or use --weights none"
        ) from None


def match_head_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A head saved with or without dropout (e.g. fc.1.* vs fc.*) fits a model built the other way."""
    state = without_wrapper_prefixes(state)
    head = head_name(model)
    prefix = head + (".1." if isinstance(model.get_submodule(head), DropoutHead) else ".")
    renamed = {}
    for key, value in state.items():
        if in_head(key, head):  # the Linear's own keys are weight and bias: a leading "1." is the Dropout's slot
            key = prefix + key.removeprefix(head + ".").removeprefix("1.")
        renamed[key] = value
    return renamed


def describe_mismatch(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], head: str,
                      arch: str) -> Optional[str]:
    """None when `theirs` loads strictly into an `arch` model whose state dict is `ours` (its head
    named `head`); else one sentence: how many keys are missing, unexpected or of another shape, a
    few of them, and the likely cause."""
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
    cause = _likely_cause(missing, unexpected, reshaped, head, arch)
    return "; ".join(parts) + f"; likely cause: {cause}"


def _likely_cause(missing: list[str], unexpected: list[str], reshaped: list[str], head: str, arch: str) -> str:
    if unexpected and all(k.startswith(WRAPPER_PREFIXES) for k in unexpected):
        return "the keys carry a wrapper prefix (DDP's module. or torch.compile's _orig_mod.)"
    if all(in_head(k, head) for k in missing + unexpected + reshaped):
        if reshaped:
            return "trained for another number of classes (only the classification head differs)"
        return f"a head saved with --dropout loaded without it, or the reverse ({head}.1.* vs {head}.*)"
    if missing or unexpected:
        return f"weights of another architecture than {arch} (e.g. a deeper variant, or another --arch)"
    return f"a modified {arch} (layers of other sizes)"


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    head, arch = head_name(model), arch_of(model)
    backbone = {k: v for k, v in state.items() if not in_head(k, head)}
    ours = {k: v for k, v in model.state_dict().items() if not in_head(k, head)}
    problem = describe_mismatch(ours, backbone, head, arch)
    if problem:
        raise UserError(f"weights do not fit {arch}: {problem}")
    model.load_state_dict(backbone, strict=False)


def _load_head_if_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Keep a saved head when it has our shape (our own checkpoints, with or without --dropout);
    else the fresh one stays."""
    head = head_name(model)
    ours = {k: v for k, v in model.state_dict().items() if in_head(k, head)}
    theirs = {k: v for k, v in match_head_keys(state, model).items() if in_head(k, head)}
    if set(ours) == set(theirs) and all(ours[k].shape == theirs[k].shape for k in ours):
        model.load_state_dict(theirs, strict=False)


def load_model_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Optional[str] = None) -> None:
    """Load a full state dict (ours) strictly; a mismatch is one sentence (see describe_mismatch)."""
    problem = describe_mismatch(model.state_dict(), state, head_name(model), arch_of(model))
    if problem:
        raise UserError(f"{source or 'weights'} do not fit this model: {problem}")
    model.load_state_dict(state, strict=True)

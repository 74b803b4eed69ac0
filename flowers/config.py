"""Command configuration: one dataclass per command, the single source of flags and defaults.

Each dataclass field becomes a `--flag-name`; `--config FILE` loads a YAML with the same keys
(dashes or underscores). Precedence: dataclass defaults < YAML file < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from flowers.errors import UserError


def arg(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with a help text (and optional argparse extras such as choices)."""
    return field(default=default, metadata={"help": help, **extra})


# ---- valid values: the one table every option's check reads ---------------------------------------
# Each field's `valid=` says which values the option takes: span("[1, inf)") for a number (floats must
# also be finite), a Text for free text (a path, a name), its argparse `choices` for a word, true/false
# for a switch. `valid_values(field)` finds it; check_values() applies it first in every __post_init__,
# so a refusal is one line naming the option and its range, before anything is written. A new option
# without an entry fails tests/test_option_ranges.py.

@dataclass(frozen=True)
class Span:
    """A closed, open or half-open interval; an infinite end is unbounded."""
    low: float
    high: float
    low_open: bool
    high_open: bool

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if math.isinf(self.high):
            return f"{'greater than' if self.low_open else 'at least'} {_number(self.low)}"
        return (f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}")

    def examples(self, kind: type) -> tuple[list, list]:
        """(values just inside, values just outside), for tests."""
        step = 1 if kind is int else 1e-3
        inside, outside = [], []
        for end, open_, sign in ((self.low, self.low_open, 1), (self.high, self.high_open, -1)):
            if math.isinf(end):
                continue
            inside.append(kind(end + sign * step) if open_ else kind(end))
            outside.append(kind(end) if open_ else kind(end - sign * step))
        if kind is float:
            outside += [math.inf, -math.inf, math.nan]
        return inside, outside


def span(interval: str) -> Span:
    """span("[0, 1)"), span("(0, inf)"), span("[0, 2**32)"): an interval as written in maths."""
    low, high = (part.strip() for part in interval[1:-1].split(","))
    bound = {"inf": math.inf, "-inf": -math.inf, "2**32": 2.0**32}
    return Span(bound.get(low) or float(low), bound.get(high) or float(high),
                interval[0] == "(", interval[-1] == ")")


def _number(x: float) -> str:
    return "2**32" if x == 2**32 else f"{x:g}"


@dataclass(frozen=True)
class Text:
    """Free text (a path, a name, a list); `test` says whether a value is one."""
    what: str
    test: typing.Callable[[Any], bool] = bool
    inside: tuple = ("x",)
    outside: tuple = ("",)

    def contains(self, value: Any) -> bool:
        return isinstance(value, (str, list)) and self.test(value)

    def describe(self) -> str:
        return self.what

    def examples(self, kind: type) -> tuple[list, list]:
        return list(self.inside), list(self.outside)


@dataclass(frozen=True)
class Choice:
    words: tuple

    def contains(self, value: Any) -> bool:
        return value in self.words

    def describe(self) -> str:
        return "one of " + ", ".join(self.words)

    def examples(self, kind: type) -> tuple[list, list]:
        return list(self.words), ["unknown-word"]


SWITCH = Choice((True, False))
PATH = Text("a path (not empty)")
CKPT = Text("best, last or a path", inside=("best", "last", "x"))


def valid_values(f: dataclasses.Field) -> Optional[Any]:
    """The field's entry in the table: its `valid=`, its choices, or true/false for a switch."""
    if "valid" in f.metadata:
        return f.metadata["valid"]
    if "choices" in f.metadata:
        return Choice(tuple(f.metadata["choices"]))
    return SWITCH if f.type in ("bool", bool) else None


def valid_values_table(cls: type) -> list[tuple[str, str]]:
    """(option, its valid values) for each option of a command: the table docs/reference.md shows."""
    rows = []
    for f in dataclasses.fields(cls):
        valid = valid_values(f)
        name = f.metadata["metavar"] if f.metadata.get("positional") else _flag(f.name)
        rows.append((name, "true or false (`--no-...`)" if valid is SWITCH else valid.describe() if valid else "?"))
    return rows


def check_values(cfg: Any) -> None:
    """Every option against its entry in the table (None stands for 'not given' where that is the default)."""
    for f in dataclasses.fields(cfg):
        value, valid = getattr(cfg, f.name), valid_values(f)
        if valid is None or (value is None and f.default is None):
            continue
        if not valid.contains(value):
            name = f.metadata["metavar"] if f.metadata.get("positional") else _flag(f.name)
            shown = repr(value) if isinstance(value, str) else json.dumps(value) if value is None or \
                isinstance(value, bool) else value
            raise UserError(f"{name} must be {valid.describe()}, got {shown}")


def _plain_name(value: Any) -> bool:
    return isinstance(value, str) and is_plain_name(value)


RUN_NAME = Text("a plain folder name (no '/', not starting with '.')", _plain_name,
                outside=("", "../elsewhere", ".hidden"))
NAME = Text("a name (not empty)", lambda v: bool(v.strip()), outside=("", "  "))
TAGS = Text("comma-separated tags of at most 64 characters each",
            lambda v: all(len(tag.strip()) <= 64 for tag in v.split(",")), inside=("a,b", "t" * 64),
            outside=("t" * 65,))
TABLE_FILE = Text("a file name ending in .csv or .json", lambda v: v.lower().endswith((".csv", ".json")),
                  inside=("out.csv", "out.json"), outside=("", "out.txt"))
IMAGES = Text("one or more image files or folders", lambda v: bool(v) and all(v), inside=(["x.jpg"],),
              outside=([], [""]))

@dataclass
class TrainConfig:
    data: Optional[str] = arg(
        None, "image folder (one sub-folder per class) or Hugging Face Hub dataset id; "
        "default: $FLOWERS_DATA, else data/flower_dataset", valid=PATH)
    output_dir: str = arg("outputs", "where run folders (checkpoints, config, logs) are written", valid=PATH)
    run_name: Optional[str] = arg(None, "name of the run folder; default: a timestamp", valid=RUN_NAME)
    epochs: int = arg(25, "number of training epochs", valid=span("[1, inf)"))
    lr: float = arg(2e-3, "peak learning rate", valid=span("(0, 10]"))
    batch_size: int = arg(32, "images per step per process", valid=span("[1, inf)"))
    grad_accum_steps: int = arg(1, "gradient accumulation steps per optimizer step", valid=span("[1, inf)"))
    arch: str = arg("resnet18", "torchvision classifier to fine-tune, e.g. resnet50, mobilenet_v3_small, "
                    "efficientnet_b0, convnext_tiny, regnet_y_400mf, vit_b_16 (224 px only), swin_t; any of "
                    "torchvision.models.list_models(module=torchvision.models) whose classifier ends in a Linear",
                    valid=Text("a torchvision classifier", inside=("resnet18", "vit_b_16"),
                                                 outside=("", "resnet-unknown")))
    image_size: int = arg(224, "training/evaluation crop size in pixels", valid=span("[32, 4096]"))
    val_tta: str = arg("none", "test-time augmentation of the validation during training (flip: each image and its "
                        "mirror, softmax averaged); best/ is chosen by it, and eval.py --tta flip reproduces it",
                        choices=["none", "flip"])
    resize_from: int = arg(0, "progressive resizing: train at this size (px) in the first epoch, growing in steps of "
                           "16 px to --image-size by three quarters of the run (shrinking when larger); validation and "
                           "checkpoints at --image-size (0: off)", valid=span("[0, 4096]"))
    crop_scale: float = arg(0.08, "training augmentation: the smallest share of the photo's area the random "
                            "resized crop keeps (0.08: the report's; larger: a milder zoom)", valid=span("(0, 1]"))
    affine: bool = arg(True, "training augmentation: the report's random rotation (15 degrees), shift and zoom")
    colour_jitter: bool = arg(True, "training augmentation: the report's random brightness, contrast, saturation "
                                    "and hue")
    weights: str = arg("imagenet", "initial weights: imagenet, none, or a PATH to a state dict / checkpoint",
                       valid=Text("imagenet, none or a path", inside=("imagenet", "none"),
                                 outside=("", "no-such-weights-file")))
    seed: int = arg(42, "seed for the split, initialisation and data order", valid=span("[0, 2**32)"))
    val_split: float = arg(0.2, "fraction of the images held out for validation (stratified)", valid=span("(0, 1)"))
    recipe: str = arg("default", "preset for the recipe options below (report: the report's Adam + step "
                      "schedule, no regularisation; scratch: from random weights, 21 epochs growing from 32 to 128 "
                      "px with a milder augmentation); options given explicitly win",
                      choices=["default", "report", "scratch"])
    optimizer: str = arg("adamw", "optimizer", choices=["adam", "adamw", "sgd"])
    weight_decay: float = arg(0.05, "weight decay (decoupled for adamw)", valid=span("[0, 1]"))
    momentum: float = arg(0.9, "momentum (sgd only; must be above 0 there)", valid=span("[0, 1)"))
    scheduler: str = arg("cosine", "learning-rate schedule, stepped every optimizer step",
                         choices=["step", "cosine", "onecycle", "none"])
    warmup_epochs: float = arg(2.0, "epochs of linear learning-rate warmup (onecycle: 0 means 30%% of the run)",
                               valid=span("[0, 100000]"))
    step_size: int = arg(7, "step schedule: epochs between learning-rate drops", valid=span("[1, inf)"))
    gamma: float = arg(0.1, "step schedule: factor applied at each drop", valid=span("(0, 1]"))
    label_smoothing: float = arg(0.1, "label smoothing of the training loss", valid=span("[0, 1)"))
    class_weights: str = arg("none", "weight each class's loss by its inverse frequency in the training split, "
                             "normalised to mean 1 (auto), or not (none); also with label smoothing and MixUp/CutMix",
                             choices=["none", "auto"])
    sampler: str = arg("random", "training data order: random (each image once an epoch, shuffled) or balanced "
                       "(as many draws an epoch, with replacement, every class equally likely); seeded by "
                       "(--seed, epoch) on both pipelines", choices=["random", "balanced"])
    dropout: float = arg(0.0, "dropout probability before the classification head", valid=span("[0, 1)"))
    freeze_backbone: int = arg(0, "train only the head for the first N epochs (flag alone: all epochs; 0: off)",
                               const=-1, valid=span("[-1, inf)"))
    mixup: float = arg(0.0, "MixUp alpha (0: off); with --cutmix, one of the two per batch", valid=span("[0, 100]"))
    cutmix: float = arg(0.0, "CutMix alpha (0: off)", valid=span("[0, 100]"))
    ema_decay: float = arg(0.0, "keep an exponential moving average of the weights with this decay per "
                           "optimizer step (e.g. 0.999; 0: off); evaluated and saved as ema/", valid=span("[0, 1)"))
    early_stopping_patience: int = arg(0, "stop after N epochs without a better val accuracy (0: off)",
                                           valid=span("[0, inf)"))
    resume: Optional[str] = arg(None, "continue an interrupted run exactly: the latest run under --output-dir "
                                "(flag alone) or a run folder / its last/ checkpoint", const="latest",
                                valid=Text("a run folder or its last/ (flag alone: the latest run)"))
    init_from: Optional[str] = arg(None, "start a NEW run from these weights (best, last or a PATH) with a "
                                   "fresh optimizer and schedule", valid=CKPT)
    save_every_steps: int = arg(0, "also save the resumable last/ every N optimizer steps (0: every epoch only)",
                                    valid=span("[0, inf)"))
    pipeline: str = arg("auto", "data pipeline: device (photos decoded once into memory on the training device, "
                        "batches augmented there, no workers), workers (DataLoader workers decode and augment "
                        "each photo with PIL), auto (device on a GPU, workers on a CPU)",
                        choices=["auto", "device", "workers"])
    device_cache: str = arg("auto", "--pipeline device: where the decoded photos live: device (the training "
                            "device's memory), host (host memory; each batch is gathered there and copied), auto "
                            "(the device when they take at most a quarter of its memory left free by the model, "
                            "its optimizer state and the EMA)", choices=["auto", "device", "host"])
    workers: int = arg(-1, "DataLoader worker processes per process (--pipeline workers); -1 picks from the core count",
                       valid=span("[-1, 1024]"))
    channels_last: bool = arg(True, "use the channels_last memory format (faster on CPU and GPU)")
    cache_resized: bool = arg(False, "decode each photo once and store it uncompressed at a short side slightly above "
                                     "--image-size (cached by `datasets`), so epochs skip "
                                     "JPEG decoding and resizing")
    compile: bool = arg(False, "torch.compile the model (compiling takes a while at the start; for GPUs)")
    report_to: str = arg("wandb", "experiment tracker", choices=["wandb", "tensorboard", "all", "none"])
    wandb_project: Optional[str] = arg(None, "W&B project; default: $WANDB_PROJECT, else flowers", valid=NAME)
    tags: Optional[str] = arg(None, "comma-separated tags for the tracked run, e.g. baseline,lr1e-3", valid=TAGS)
    group: Optional[str] = arg(None, "W&B group: runs of one experiment (e.g. the two stages of a schedule)",
                               valid=NAME)
    strict: bool = arg(False, "fail on unusable image files (default: skip them, one warning each)")
    duplicate_distance: int = arg(5, "near-duplicate photos (resized or re-encoded copies: 64-bit difference hashes "
                                  "at most this many bits apart, see docs/design.md) stay on one side of the split; "
                                  "-1: off (the plain stratified split)", valid=span("[-1, 64]"))
    exclude: Optional[str] = arg(None, "CSV file of images to leave out: a path (relative to --data) per row; "
                                 "label_issues.csv works as it is", valid=PATH)
    relabel: Optional[str] = arg(None, "CSV file of images to give another class: path,class per row; "
                                 "label_issues.csv works as it is (its suggested_label)", valid=PATH)
    on_nan: str = arg("stop", "a NaN/Inf training loss: stop the run (last good checkpoint kept) or skip that "
                      "batch's update (costs one host sync per step)", choices=["stop", "skip"])
    config: Optional[str] = arg(None, "YAML file with any of these keys; flags given on the command line win",
                                valid=PATH)

    def __post_init__(self) -> None:
        check_values(self)
        from flowers.model import check_arch  # not at the top: torchvision, for train configs only
        check_arch(self.arch, self.image_size)
        check(self.resize_from == 0 or self.resize_from >= 32,
              f"--resize-from must be 0 (off) or at least 32, got {self.resize_from}")
        check(self.scheduler != "onecycle" or self.warmup_epochs < self.epochs,
              "--warmup-epochs must be shorter than --epochs for the onecycle schedule")
        check(not (self.resume and self.init_from),
              "--resume continues a run; --init-from starts a new one: give only one of them")
        # a resumed run restores its weights from last/ and never reads --weights (moved since: fine)
        check(self.resume is not None or self.weights in ("imagenet", "none")
              or Path(self.weights).expanduser().exists(),
              f"--weights {self.weights}: not imagenet or none, and no such file or folder")
        check(self.optimizer != "sgd" or self.momentum > 0,
              f"--momentum must be in (0, 1) for sgd (Nesterov momentum), got {self.momentum}")
        check_output_dir(self.output_dir)

@dataclass
class CrossvalConfig(TrainConfig):
    """python -m flowers.crossval: train.py's options (--resume: a cross-validation folder), and --folds."""
    folds: int = arg(5, "number of folds: one model per fold, validated on that fold's images (stratified, "
                     "seeded by --seed, near-duplicates in one fold); --val-split is not used", valid=span("[2, 100]"))


# `--recipe report`: the reference report's recipe (ResNet18, Adam, lr 1e-3, StepLR every 7 epochs
# x0.1, batch 32, its augmentations, no other regularisation). Values given explicitly win.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "report": {
        "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "scheduler": "step", "step_size": 7,
        "gamma": 0.1, "warmup_epochs": 0.0, "batch_size": 32, "label_smoothing": 0.0, "dropout": 0.0,
        "mixup": 0.0, "cutmix": 0.0, "ema_decay": 0.0, "freeze_backbone": 0,
    },
    # `--recipe scratch`: from random weights in half the compute of 25 epochs at 128 px (issue 28,
    # docs/performance.md "Time to accuracy"): the default optimizer and schedule, 21 epochs growing
    # from 32 to 128 px, and a milder augmentation (a short run from scratch underfits the report's).
    "scratch": {
        "weights": "none", "image_size": 128, "resize_from": 32, "epochs": 21, "crop_scale": 0.35,
        "affine": False,
    },
}


# test-time augmentation of eval.py and predict (engine.predict_logits)
TTA_CHOICES = ["none", "flip"]


def tta_arg() -> Any:
    """eval.py's and predict's --tta."""
    return arg("none", "test-time augmentation: flip averages the softmax probabilities of each image and its "
               "horizontal mirror", choices=TTA_CHOICES)


def eval_size_arg() -> Any:
    """eval.py's and predict's --eval-size."""
    return arg(None, "centre crop in pixels (the resize before it keeps the 256/224 ratio); default: the "
               "checkpoint's image size", valid=span("[32, 4096]"))


@dataclass
class EvalConfig:
    ckpt: str = arg("best", "checkpoint: best or last (latest run under --output-dir) or a PATH", valid=CKPT)
    output_dir: str = arg("outputs", "where training wrote its run folders", valid=PATH)
    data: Optional[str] = arg(
        None, "evaluate on this folder instead of the checkpoint's validation split (same classes)", valid=PATH)
    split: Optional[str] = arg(
        None, "which images: val or train (the checkpoint's split, or the same split of --data) or all; "
        "default: val, or all with --data", choices=["val", "train", "all"])
    batch_size: Optional[int] = arg(None, "default: the training batch size recorded in the checkpoint",
                                     valid=span("[1, inf)"))
    top_k: int = arg(2, "also report top-k accuracy for this k", valid=span("[1, inf)"))
    mistakes: int = arg(16, "how many of the most confidently wrong images to show in mistakes.png",
                        valid=span("[0, 1000]"))
    workers: int = arg(-1, "DataLoader worker processes; -1 picks from the core count", valid=span("[-1, 1024]"))
    strict: bool = arg(False, "fail on unusable image files (default: skip them, one warning each)")
    mixed_precision: Optional[str] = arg(
        None, "precision of the forward pass; default: the one `accelerate launch --mixed_precision` sets, else "
        "the precision the checkpoint was trained in when this machine has the same kind of device (GPU or "
        "CPU), else no (fp32)", choices=["no", "fp16", "bf16"])
    tta: str = tta_arg()
    eval_size: Optional[int] = eval_size_arg()
    calibrate: bool = arg(False, "fit a temperature on these images (the validation split) for this --tta and "
                          "--eval-size and write it into the checkpoint's checkpoint.json; eval and predict use it")
    config: Optional[str] = arg(None, "YAML file with any of these keys; flags given on the command line win",
                                valid=PATH)

    def __post_init__(self) -> None:
        check_values(self)
        check(not (self.calibrate and self.split == "train"),
              "--calibrate fits the temperature on held-out images: use --split val (the default), not train")
        check_output_dir(self.output_dir)


def is_plain_name(name: str) -> bool:
    """A single path component that cannot climb out of its parent or hide from listings."""
    return bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name and "\0" not in name


def check_output_dir(path: str) -> None:
    check(not Path(path).expanduser().exists() or Path(path).expanduser().is_dir(),
          f"--output-dir {path} exists and is not a folder")


@dataclass
class PredictConfig:
    inputs: list[str] = field(default_factory=list, metadata={
        "help": "image files and/or folders (searched recursively for images)", "positional": True,
        "metavar": "IMAGE_OR_FOLDER", "valid": IMAGES})
    ckpt: str = arg("best", "checkpoint: best or last (latest run under --output-dir) or a PATH", valid=CKPT)
    output_dir: str = arg("outputs", "where training wrote its run folders", valid=PATH)
    top_k: int = arg(2, "classes to show per image, most probable first", valid=span("[1, inf)"))
    output: Optional[str] = arg(None, "also write the predictions to this .csv or .json file", valid=TABLE_FILE)
    batch_size: int = arg(32, "images per forward pass", valid=span("[1, inf)"))
    tta: str = tta_arg()
    eval_size: Optional[int] = eval_size_arg()
    reject_below: Optional[float] = arg(None, "answer 'unknown' when the top probability (calibrated by the "
                                        "checkpoint's temperature, if it has one) is below P, e.g. 0.8",
                                        valid=span("[0, 1]"))
    config: Optional[str] = arg(None, "YAML file with any of these keys; flags given on the command line win",
                                valid=PATH)

    def __post_init__(self) -> None:
        check_values(self)


@dataclass
class ExportConfig:
    ckpt: str = arg("best", "checkpoint: best or last (latest run under --output-dir) or a PATH", valid=CKPT)
    output_dir: str = arg("outputs", "where training wrote its run folders", valid=PATH)
    format: str = arg("onnx", "onnx (needs the onnx extra: pip install 'flowers[onnx]') or torchscript",
                      choices=["onnx", "torchscript"])
    out: Optional[str] = arg(None, "folder to write to; default: <run>/export-<ckpt name>", valid=PATH)
    config: Optional[str] = arg(None, "YAML file with any of these keys; flags given on the command line win",
                                valid=PATH)

    def __post_init__(self) -> None:
        check_values(self)


@dataclass
class CompareConfig:
    group: Optional[str] = arg(None, "the group to report on: runs trained with --group NAME", valid=NAME)
    output_dir: str = arg("outputs", "where training wrote its run folders", valid=PATH)
    out: Optional[str] = arg(None, "folder for report.md and its PNGs; default: <output-dir>/compare-<group>",
                             valid=PATH)
    wandb_entity: Optional[str] = arg(None, "W&B entity of the online report; default: $WANDB_ENTITY, else your "
                                      "key's default entity", valid=NAME)
    wandb_project: Optional[str] = arg(None, "W&B project of the runs; default: the one the runs recorded, else "
                                       "$WANDB_PROJECT, else flowers", valid=NAME)
    config: Optional[str] = arg(None, "YAML file with any of these keys; flags given on the command line win",
                                valid=PATH)

    def __post_init__(self) -> None:
        check_values(self)
        check(self.group is not None,
              "give --group NAME: the group the runs were trained with (train.py --group NAME)")
        check_output_dir(self.output_dir)


@dataclass
class LabelIssuesConfig:
    folder: str = field(default="", metadata={
        "help": "a cross-validation folder (flowers.crossval: every image judged) or a run folder (its held-out "
        "images only)", "positional": True, "metavar": "FOLDER", "valid": PATH})
    filter_by: str = arg("prune_by_noise_rate", "cleanlab's filter.find_label_issues method",
                         choices=["prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                                  "predicted_neq_given"])
    show: int = arg(24, "how many of the likely errors to show in label_issues.png", valid=span("[0, 1000]"))
    workers: int = arg(-1, "DataLoader worker processes (a run folder only); -1 picks from the core count",
                       valid=span("[-1, 1024]"))
    config: Optional[str] = arg(None, "YAML file with any of these keys; flags given on the command line win",
                                valid=PATH)

    def __post_init__(self) -> None:
        check_values(self)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(hint: Any) -> type:
    """int for Optional[int], etc."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line instead of usage + message
        raise UserError(f"{message} (see --help)")


def _number_type(kind: type, valid: Any) -> Any:
    """argparse's type for a number option: a word is refused naming the option's range."""
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what} {valid.describe()}, got {text!r}") from None
    return convert


def build_parser(cls: type, description: str = "") -> argparse.ArgumentParser:
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        valid = meta.pop("valid", None)
        bounds = f"; {valid.describe()}" if isinstance(valid, Span) else ""
        if kind in (int, float) and isinstance(valid, Span):
            kind = _number_type(kind, valid)
        if meta.pop("positional", False):  # e.g. predict's IMAGE_OR_FOLDER...
            many = typing.get_origin(hints[f.name]) is list
            parser.add_argument(f.name, nargs="+" if many else None, type=kind, help=help_text, **meta)
        elif kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                help=f"{help_text} (default: {f.default})")
        elif "const" in f.metadata:  # flag with an optional value, e.g. --resume [DIR]
            parser.add_argument(_flag(f.name), nargs="?", type=kind, help=f"{help_text} (default: {f.default}{bounds})",
                                **meta)
        else:
            parser.add_argument(_flag(f.name), type=kind, help=f"{help_text} (default: {f.default}{bounds})", **meta)
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def from_dict(cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """Build a config from a mapping, rejecting unknown keys with one line."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{source}: unknown option(s) {', '.join(unknown)}")
    if issubclass(cls, TrainConfig):
        values = {**RECIPES.get(values.get("recipe") or "default", {}), **values}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    converted = {}
    for key, value in values.items():
        kind = _base_type(hints[key])
        if isinstance(value, bool) and kind is not bool:
            # a YAML true/false for a flag with an optional value means what the bare flag and its
            # absence mean (freeze_backbone: true -> -1, resume: true -> latest); elsewhere the range
            # check refuses it
            if "const" in fields[key].metadata:
                value = fields[key].metadata["const"] if value else fields[key].default
            converted[key] = value
            continue
        if typing.get_origin(hints[key]) is list:  # a list of strings, e.g. predict's inputs
            value = [str(v) for v in (value if isinstance(value, list) else [value])]
        elif value is not None and kind in (int, float, str) and not isinstance(value, bool):
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise UserError(f"{source}: {key} must be a whole number{_in_range(fields[key])}, got {value!r}")
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise UserError(f"{source}: {key} must be {kind.__name__}{_in_range(fields[key])}, "
                                f"got {value!r}") from None
        elif kind is bool and value is not None and not isinstance(value, bool):
            raise UserError(f"{source}: {key} must be true or false, got {value!r}")
        converted[key] = value
    return cls(**converted)


def _in_range(f: dataclasses.Field) -> str:
    valid = valid_values(f)
    return f" {valid.describe()}" if isinstance(valid, Span) else ""


def parse(cls: type, argv: Optional[list[str]] = None, description: str = "") -> Any:
    """Parse the command line (and an optional --config YAML) into a config dataclass."""
    given = vars(build_parser(cls, description).parse_args(sys.argv[1:] if argv is None else argv))
    values: dict[str, Any] = {}
    if given.get("config"):
        values.update(load_yaml(given["config"]))
        values.pop("config", None)
    values.update(given)
    cfg = from_dict(cls, values, source=f"--config {given['config']}" if given.get("config") else "arguments")
    cfg.given = frozenset(values) - {"config"}  # the options this command line (or its --config) set
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)

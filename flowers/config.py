"""Command configuration: one dataclass per command, the single source of flags and defaults.

Each dataclass field becomes a `--flag-name`; `--config FILE` loads a YAML with the same keys
(dashes or underscores). Precedence: dataclass defaults < YAML file < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
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


@dataclass
class TrainConfig:
    data: Optional[str] = arg(
        None, "image folder (one sub-folder per class) or Hugging Face Hub dataset id; "
        "default: $FLOWERS_DATA, else data/flower_dataset")
    output_dir: str = arg("outputs", "where run folders (checkpoints, config, logs) are written")
    run_name: Optional[str] = arg(None, "name of the run folder; default: a timestamp")
    epochs: int = arg(25, "number of training epochs")
    lr: float = arg(2e-3, "peak learning rate")
    batch_size: int = arg(32, "images per step per process")
    grad_accum_steps: int = arg(1, "gradient accumulation steps per optimizer step")
    arch: str = arg("resnet18", "torchvision classifier to fine-tune, e.g. resnet50, mobilenet_v3_small, "
                    "efficientnet_b0, convnext_tiny, regnet_y_400mf, vit_b_16 (224 px only), swin_t; any of "
                    "torchvision.models.list_models(module=torchvision.models) whose classifier ends in a Linear")
    image_size: int = arg(224, "training/evaluation crop size in pixels")
    weights: str = arg("imagenet", "initial weights: imagenet, none, or a PATH to a state dict / checkpoint")
    seed: int = arg(42, "seed for the split, initialisation and data order")
    val_split: float = arg(0.2, "fraction of the images held out for validation (stratified)")
    recipe: str = arg("default", "preset for the recipe options below (report: the report's Adam + step "
                      "schedule, no regularisation); options given explicitly win", choices=["default", "report"])
    optimizer: str = arg("adamw", "optimizer", choices=["adam", "adamw", "sgd"])
    weight_decay: float = arg(0.05, "weight decay (decoupled for adamw)")
    momentum: float = arg(0.9, "momentum (sgd only)")
    scheduler: str = arg("cosine", "learning-rate schedule, stepped every optimizer step",
                         choices=["step", "cosine", "onecycle", "none"])
    warmup_epochs: float = arg(2.0, "epochs of linear learning-rate warmup (onecycle: 0 means 30%% of the run)")
    step_size: int = arg(7, "step schedule: epochs between learning-rate drops")
    gamma: float = arg(0.1, "step schedule: factor applied at each drop")
    label_smoothing: float = arg(0.1, "label smoothing of the training loss")
    dropout: float = arg(0.0, "dropout probability before the classification head")
    freeze_backbone: int = arg(0, "train only the head for the first N epochs (flag alone: all epochs; 0: off)",
                               const=-1)
    mixup: float = arg(0.0, "MixUp alpha (0: off); with --cutmix, one of the two per batch")
    cutmix: float = arg(0.0, "CutMix alpha (0: off)")
    ema_decay: float = arg(0.0, "keep an exponential moving average of the weights with this decay per "
                           "optimizer step (e.g. 0.999; 0: off); evaluated and saved as ema/")
    early_stopping_patience: int = arg(0, "stop after N epochs without a better val accuracy (0: off)")
    resume: Optional[str] = arg(None, "continue an interrupted run exactly: the latest run under --output-dir "
                                "(flag alone) or a run folder / its last/ checkpoint", const="latest")
    init_from: Optional[str] = arg(None, "start a NEW run from these weights (best, last or a PATH) with a "
                                   "fresh optimizer and schedule")
    save_every_steps: int = arg(0, "also save the resumable last/ every N optimizer steps (0: every epoch only)")
    pipeline: str = arg("auto", "data pipeline: device (photos decoded once into memory on the training device, "
                        "batches augmented there, no workers), workers (DataLoader workers decode and augment "
                        "each photo with PIL), auto (device on a GPU, workers on a CPU)",
                        choices=["auto", "device", "workers"])
    workers: int = arg(-1, "DataLoader worker processes per process (--pipeline workers); -1 picks from the core count")
    channels_last: bool = arg(True, "use the channels_last memory format (faster on CPU and GPU)")
    cache_resized: bool = arg(False, "decode each photo once and store it uncompressed at a short side slightly above "
                                     "--image-size (cached by `datasets`), so epochs skip "
                                     "JPEG decoding and resizing")
    compile: bool = arg(False, "torch.compile the model (compiling takes a while at the start; for GPUs)")
    report_to: str = arg("wandb", "experiment tracker", choices=["wandb", "tensorboard", "all", "none"])
    wandb_project: Optional[str] = arg(None, "W&B project; default: $WANDB_PROJECT, else flowers")
    tags: Optional[str] = arg(None, "comma-separated tags for the tracked run, e.g. baseline,lr1e-3")
    group: Optional[str] = arg(None, "W&B group: runs of one experiment (e.g. the two stages of a schedule)")
    strict: bool = arg(False, "fail on unusable image files (default: skip them, one warning each)")
    on_nan: str = arg("stop", "a NaN/Inf training loss: stop the run (last good checkpoint kept) or skip that "
                      "batch's update (costs one host sync per step)", choices=["stop", "skip"])
    config: Optional[str] = arg(None, "YAML file with any of these keys; flags given on the command line win")

    def __post_init__(self) -> None:
        check(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        check(math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}")
        check(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        check(self.grad_accum_steps >= 1, f"--grad-accum-steps must be at least 1, got {self.grad_accum_steps}")
        check(self.image_size >= 32, f"--image-size must be at least 32, got {self.image_size}")
        from flowers.model import check_arch  # not at the top: torchvision, for train configs only
        check_arch(self.arch, self.image_size)
        check(0 < self.val_split < 1, f"--val-split must be between 0 and 1 (exclusive), got {self.val_split}")
        check(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        check(self.step_size >= 1, f"--step-size must be at least 1, got {self.step_size}")
        check(0 < self.gamma <= 1, f"--gamma must be in (0, 1], got {self.gamma}")
        check(self.workers >= -1, f"--workers must be -1 (auto) or >= 0, got {self.workers}")
        check(bool(self.weights), "--weights must be imagenet, none or a path")
        check(self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe}")
        check(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        check(self.scheduler != "onecycle" or self.warmup_epochs < self.epochs,
              "--warmup-epochs must be shorter than --epochs for the onecycle schedule")
        check(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        check(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        check(self.freeze_backbone >= -1, f"--freeze-backbone must be a number of epochs, got {self.freeze_backbone}")
        check(self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix are alphas >= 0")
        check(0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        check(self.early_stopping_patience >= 0, "--early-stopping-patience must be >= 0")
        check(self.save_every_steps >= 0, "--save-every-steps must be >= 0")
        check(not (self.resume and self.init_from),
              "--resume continues a run; --init-from starts a new one: give only one of them")
        # a resumed run restores its weights from last/ and never reads --weights (moved since: fine)
        check(self.resume is not None or self.weights in ("imagenet", "none")
              or Path(self.weights).expanduser().exists(),
              f"--weights {self.weights}: not imagenet or none, and no such file or folder")
        check(self.optimizer != "sgd" or 0 < self.momentum < 1,
              f"--momentum must be in (0, 1) for sgd (Nesterov momentum), got {self.momentum}")
        check(0 <= self.seed < 2**32, f"--seed must be in [0, 2**32), got {self.seed}")
        check(self.wandb_project is None or bool(self.wandb_project.strip()), "--wandb-project must not be empty")
        check_output_dir(self.output_dir)
        check(self.run_name is None or is_plain_name(self.run_name),
              f"--run-name must be a plain folder name (no '/', not starting with '.'), got {self.run_name!r}")
        for tag in (self.tags or "").split(","):
            check(len(tag.strip()) <= 64, f"--tags: each tag must be at most 64 characters, got {tag.strip()!r}")


# `--recipe report`: the reference report's recipe (ResNet18, Adam, lr 1e-3, StepLR every 7 epochs
# x0.1, batch 32, its augmentations, no other regularisation). Values given explicitly win.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "report": {
        "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "scheduler": "step", "step_size": 7,
        "gamma": 0.1, "warmup_epochs": 0.0, "batch_size": 32, "label_smoothing": 0.0, "dropout": 0.0,
        "mixup": 0.0, "cutmix": 0.0, "ema_decay": 0.0, "freeze_backbone": 0,
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
               "checkpoint's image size")


@dataclass
class EvalConfig:
    ckpt: str = arg("best", "checkpoint: best or last (latest run under --output-dir) or a PATH")
    output_dir: str = arg("outputs", "where training wrote its run folders")
    data: Optional[str] = arg(
        None, "evaluate on this folder instead of the checkpoint's validation split (same classes)")
    split: Optional[str] = arg(
        None, "which images: val or train (the checkpoint's split, or the same split of --data) or all; "
        "default: val, or all with --data", choices=["val", "train", "all"])
    batch_size: Optional[int] = arg(None, "default: the training batch size recorded in the checkpoint")
    top_k: int = arg(2, "also report top-k accuracy for this k")
    mistakes: int = arg(16, "how many of the most confidently wrong images to show in mistakes.png")
    workers: int = arg(-1, "DataLoader worker processes; -1 picks from the core count")
    strict: bool = arg(False, "fail on unusable image files (default: skip them, one warning each)")
    mixed_precision: Optional[str] = arg(
        None, "precision of the forward pass; default: the one `accelerate launch --mixed_precision` sets, else "
        "the precision the checkpoint was trained in when this machine has the same kind of device (GPU or "
        "CPU), else no (fp32)", choices=["no", "fp16", "bf16"])
    tta: str = tta_arg()
    eval_size: Optional[int] = eval_size_arg()
    calibrate: bool = arg(False, "fit a temperature on these images (the validation split) for this --tta and "
                          "--eval-size and write it into the checkpoint's checkpoint.json; eval and predict use it")
    config: Optional[str] = arg(None, "YAML file with any of these keys; flags given on the command line win")

    def __post_init__(self) -> None:
        check(not (self.calibrate and self.split == "train"),
              "--calibrate fits the temperature on held-out images: use --split val (the default), not train")
        check(self.mixed_precision in (None, "no", "fp16", "bf16"),
              f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision}")
        check(self.batch_size is None or self.batch_size >= 1,
              f"--batch-size must be at least 1, got {self.batch_size}")
        check(self.split in (None, "val", "train", "all"), f"split must be val, train or all, got {self.split}")
        check(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        check(self.mistakes >= 0, f"--mistakes must be >= 0, got {self.mistakes}")
        check(self.workers >= -1, f"--workers must be -1 (auto) or >= 0, got {self.workers}")
        check(bool(self.ckpt), "--ckpt must be best, last or a path")
        check_output_dir(self.output_dir)
        check_tta(self.tta, self.eval_size)


def check_tta(tta: str, eval_size: Optional[int]) -> None:
    """--tta and --eval-size, shared by eval.py and predict."""
    check(tta in TTA_CHOICES, f"--tta must be one of {', '.join(TTA_CHOICES)}, got {tta}")
    check(eval_size is None or eval_size >= 32, f"--eval-size must be at least 32, got {eval_size}")


def is_plain_name(name: str) -> bool:
    """A single path component that cannot climb out of its parent or hide from listings."""
    return bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name and "\0" not in name


def check_output_dir(path: str) -> None:
    check(bool(path), "--output-dir must not be empty")
    check(not Path(path).expanduser().exists() or Path(path).expanduser().is_dir(),
          f"--output-dir {path} exists and is not a folder")


@dataclass
class PredictConfig:
    inputs: list[str] = field(default_factory=list, metadata={
        "help": "image files and/or folders (searched recursively for images)", "positional": True,
        "metavar": "IMAGE_OR_FOLDER"})
    ckpt: str = arg("best", "checkpoint: best or last (latest run under --output-dir) or a PATH")
    output_dir: str = arg("outputs", "where training wrote its run folders")
    top_k: int = arg(2, "classes to show per image, most probable first")
    output: Optional[str] = arg(None, "also write the predictions to this .csv or .json file")
    batch_size: int = arg(32, "images per forward pass")
    tta: str = tta_arg()
    eval_size: Optional[int] = eval_size_arg()
    reject_below: Optional[float] = arg(None, "answer 'unknown' when the top probability (calibrated by the "
                                        "checkpoint's temperature, if it has one) is below P, e.g. 0.8")
    config: Optional[str] = arg(None, "YAML file with any of these keys; flags given on the command line win")

    def __post_init__(self) -> None:
        check(bool(self.inputs), "give at least one image file or folder")
        check(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        check(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        check(self.output is None or self.output.lower().endswith((".csv", ".json")),
              f"--output {self.output}: the file name must end in .csv or .json")
        check(self.reject_below is None or 0 <= self.reject_below <= 1,
              f"--reject-below must be a probability in [0, 1], got {self.reject_below}")
        check_tta(self.tta, self.eval_size)


@dataclass
class ExportConfig:
    ckpt: str = arg("best", "checkpoint: best or last (latest run under --output-dir) or a PATH")
    output_dir: str = arg("outputs", "where training wrote its run folders")
    format: str = arg("onnx", "onnx (needs the onnx extra: pip install 'flowers[onnx]') or torchscript",
                      choices=["onnx", "torchscript"])
    out: Optional[str] = arg(None, "folder to write to; default: <run>/export-<ckpt name>")
    config: Optional[str] = arg(None, "YAML file with any of these keys; flags given on the command line win")

    def __post_init__(self) -> None:
        check(self.format in ("onnx", "torchscript"), f"format must be onnx or torchscript, got {self.format}")



@dataclass
class CompareConfig:
    group: Optional[str] = arg(None, "the group to report on: runs trained with --group NAME")
    output_dir: str = arg("outputs", "where training wrote its run folders")
    out: Optional[str] = arg(None, "folder for report.md and its PNGs; default: <output-dir>/compare-<group>")
    wandb_entity: Optional[str] = arg(None, "W&B entity of the online report; default: $WANDB_ENTITY, else your "
                                      "key's default entity")
    wandb_project: Optional[str] = arg(None, "W&B project of the runs; default: the one the runs recorded, else "
                                       "$WANDB_PROJECT, else flowers")
    config: Optional[str] = arg(None, "YAML file with any of these keys; flags given on the command line win")

    def __post_init__(self) -> None:
        check(bool(self.group and self.group.strip()),
              "give --group NAME: the group the runs were trained with (train.py --group NAME)")
        check_output_dir(self.output_dir)

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


def build_parser(cls: type, description: str = "") -> argparse.ArgumentParser:
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        if meta.pop("positional", False):  # e.g. predict's IMAGE_OR_FOLDER...
            parser.add_argument(f.name, nargs="+", type=kind, help=help_text, **meta)
        elif kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                help=f"{help_text} (default: {f.default})")
        elif "const" in f.metadata:  # flag with an optional value, e.g. --resume [DIR]
            parser.add_argument(_flag(f.name), nargs="?", type=kind, help=f"{help_text} (default: {f.default})",
                                **meta)
        else:
            parser.add_argument(_flag(f.name), type=kind, help=f"{help_text} (default: {f.default})", **meta)
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
    if cls is TrainConfig:
        values = {**RECIPES.get(values.get("recipe") or "default", {}), **values}
    hints = typing.get_type_hints(cls)
    converted = {}
    for key, value in values.items():
        kind = _base_type(hints[key])
        if typing.get_origin(hints[key]) is list:  # a list of strings, e.g. predict's inputs
            value = [str(v) for v in (value if isinstance(value, list) else [value])]
        elif value is not None and kind in (int, float, str) and not isinstance(value, bool):
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise UserError(f"{source}: {key} must be a whole number, got {value!r}")
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise UserError(f"{source}: {key} must be {kind.__name__}, got {value!r}") from None
        elif kind is bool and value is not None and not isinstance(value, bool):
            raise UserError(f"{source}: {key} must be true or false, got {value!r}")
        converted[key] = value
    return cls(**converted)


def parse(cls: type, argv: Optional[list[str]] = None, description: str = "") -> Any:
    """Parse the command line (and an optional --config YAML) into a config dataclass."""
    given = vars(build_parser(cls, description).parse_args(sys.argv[1:] if argv is None else argv))
    values: dict[str, Any] = {}
    if given.get("config"):
        values.update(load_yaml(given["config"]))
        values.pop("config", None)
    values.update(given)
    return from_dict(cls, values, source=f"--config {given['config']}" if given.get("config") else "arguments")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)

"""Checkpoint folders: `model.safetensors` + `checkpoint.json`, written atomically.

A checkpoint folder is usable on its own: the JSON holds the class names, architecture, image
size, normalisation, the data split (source, seed, fraction), the epoch, its metrics and the
full training config. Saving writes a temporary sibling folder and renames it into place, so a
kill at any moment leaves either the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from flowers.errors import UserError

WEIGHTS_FILE = "model.safetensors"
META_FILE = "checkpoint.json"
ALIASES = ("best", "last")
_OLD_SUFFIX = ".old"


def save_checkpoint(target: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
                    move_in: Optional[dict[str, Path]] = None) -> Path:
    """Write weights + metadata to `target` atomically (temp dir, fsync, rename).

    `move_in` maps sub-folder names to folders that are moved into the checkpoint before it
    appears (e.g. the resumable training state, written by every process beforehand).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        for name in (WEIGHTS_FILE, META_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        for name, folder in (move_in or {}).items():
            os.rename(folder, tmp / name)
        old = target.with_name(target.name + _OLD_SUFFIX)
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.rename(target, old)  # a kill between these two renames is repaired by _recover()
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _recover(target: Path) -> None:
    """Finish an interrupted swap: if only `<name>.old` is left, it is the last complete save."""
    old = target.with_name(target.name + _OLD_SUFFIX)
    if not target.exists() and old.is_dir():
        os.rename(old, target)


def _run_dirs(output_dir: Path) -> list[Path]:
    return [p for p in output_dir.iterdir() if p.is_dir() and not p.name.startswith(".")] if output_dir.is_dir() else []


def resolve(ckpt: str, output_dir: str = "outputs") -> Path:
    """'best' / 'last' -> that checkpoint of the latest run under output_dir; else a path."""
    if ckpt not in ALIASES:
        path = Path(ckpt).expanduser()
        if path.is_dir() and not (path / META_FILE).exists() and (path / "best" / META_FILE).exists():
            path = path / "best"  # a run folder: use its best checkpoint
        if not path.exists():
            raise UserError(f"--ckpt {ckpt}: no such checkpoint folder")
        return path
    candidates = []
    for run in _run_dirs(Path(output_dir)):
        _recover(run / ckpt)
        meta = run / ckpt / META_FILE
        if meta.is_file():
            candidates.append((meta.stat().st_mtime, run / ckpt))
    if not candidates:
        raise UserError(f"--ckpt {ckpt}: no runs with a '{ckpt}' checkpoint under {output_dir}/ "
                        "(train first, or pass --output-dir or a checkpoint path)")
    return max(candidates)[1]


def latest_run(output_dir: str) -> Optional[Path]:
    runs = _run_dirs(Path(output_dir))
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def load_meta(path: Path) -> dict[str, Any]:
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise UserError(f"checkpoint {path} is missing {META_FILE}")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_file}: not valid JSON ({e})") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"checkpoint {path} is missing {WEIGHTS_FILE}")
    return load_file(str(weights))


def load_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint folder describes and load its weights."""
    from flowers.model import build_model, load_model_weights

    meta = load_meta(path)
    state = load_weights(path)
    try:
        model = build_model(int(meta["num_classes"]), "none", dropout=float(meta["config"].get("dropout", 0.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}/{META_FILE} lacks a valid {e}") from None
    load_model_weights(model, state, source=str(path))
    return model, meta

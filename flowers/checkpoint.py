"""Checkpoint folders: `model.safetensors` + `checkpoint.json`, written atomically.

A checkpoint folder is usable on its own: the JSON holds the class names, architecture, image
size, normalisation, the data split (source, seed, fraction), the epoch, its metrics and the
full training config. Saving writes a temporary sibling folder and renames it into place, so a
kill at any moment leaves either the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

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
    A kill -9 at any moment leaves the previous complete checkpoint or the new one (tests kill
    it at every line); a full disk raises one UserError and leaves the previous one in place.
    """
    target = Path(target)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _recover(target)  # finish a swap an earlier kill interrupted before touching anything
        _remove_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            _write_synced(tmp / WEIGHTS_FILE, save(tensors))
            _write_synced(tmp / META_FILE, json.dumps(meta, indent=2, default=str).encode())
            for name, folder in (move_in or {}).items():
                os.rename(folder, tmp / name)
            _swap_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        raise save_error(target, e) from None
    return target


def write_file_atomic(target: Path, data: bytes) -> Path:
    """Write one file atomically (a synced temp sibling renamed over it): a kill leaves the old file
    or the new one, never a part (crossval's oof.csv and fold predictions). A full disk: one UserError."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise save_error(target, e) from None
    return target


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _swap_into_place(tmp: Path, target: Path) -> None:
    """target -> target.old, tmp -> target, drop target.old; _recover() repairs a kill in between."""
    old = target.with_name(target.name + _OLD_SUFFIX)
    if old.exists():  # target exists too (see _recover), so this is a leftover copy
        shutil.rmtree(old)
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_dir(target.parent)  # the renames survive a power cut, not only a killed process
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(target: Path) -> None:
    """Half-written folders of saves that were killed (only the main process saves, so none is live)."""
    for stale in target.parent.glob(_tmp_prefix(target) + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_error(target: Path, e: Exception) -> UserError:
    """One line for a failed save; the previous checkpoint at `target` is untouched by then."""
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or _disk_is_full(target.parent):
        return UserError(f"disk full while saving the checkpoint {target}: the previous one there (if any) is "
                         "kept intact; free some space (or use another --output-dir) and resume")
    reason = getattr(e, "strerror", None) or _first_line(e)
    return UserError(f"cannot save the checkpoint {target} ({reason}); the previous one there (if any) is kept")


def _disk_is_full(folder: Path, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _recover(target: Path) -> None:
    """Finish an interrupted swap: if only `<name>.old` is left, it is the last complete save.
    Only for the process that writes the run (its next save, a resume): a reader renaming it
    could do so between a live trainer's two renames and make that save fail; see _readable."""
    old = target.with_name(target.name + _OLD_SUFFIX)
    if not target.exists() and old.is_dir():
        try:
            os.rename(old, target)
        except OSError:  # read-only location: leave it; the caller reports the missing checkpoint
            pass


def _readable(target: Path) -> Path:
    """`target`, or `<name>.old` while a save is between its two renames (or was killed there):
    the same complete checkpoint, read in place. Reading never changes a run folder."""
    old = target.with_name(target.name + _OLD_SUFFIX)
    return old if not target.exists() and (old / META_FILE).is_file() else target


def _run_dirs(output_dir: Path) -> list[Path]:
    return [p for p in output_dir.iterdir() if p.is_dir() and not p.name.startswith(".")] if output_dir.is_dir() else []


def resolve(ckpt: str, output_dir: str = "outputs") -> Path:
    """'best' / 'last' -> that checkpoint of the latest run under output_dir; else a path.
    Read-only: a trainer may be saving into the run at this moment (see _readable)."""
    if ckpt not in ALIASES:
        path = _readable(Path(ckpt).expanduser())
        if path.is_dir() and not (path / META_FILE).exists():
            best = _readable(path / "best")
            if (best / META_FILE).exists():
                path = best  # a run folder: use its best checkpoint
        if not path.exists():
            raise UserError(f"--ckpt {ckpt}: no such checkpoint folder")
        return path
    candidates = []
    for run in _run_dirs(Path(output_dir)):
        meta = _readable(run / ckpt) / META_FILE
        if meta.is_file():
            candidates.append((meta.stat().st_mtime, meta.parent))
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
    """A checkpoint's weights, keyed as saved (loading.load_model takes off wrapper prefixes)."""
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"checkpoint {path} is missing {WEIGHTS_FILE}")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: not a valid safetensors file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_pickles_hold_only_data(folder: Path) -> None:
    """Refuse a resumable training state whose pickles would run code when loaded.

    Accelerate's load_state unpickles custom_checkpoint_*.pkl with weights_only=False, which runs
    whatever code a crafted file carries; so every pickle there must first load as plain data.
    """
    from accelerate.utils.other import load as weights_only_load  # weights_only=True, numpy allowed

    for path in sorted(Path(folder).iterdir()):
        if path.suffix not in (".pkl", ".bin", ".pt", ".pth"):
            continue
        try:
            weights_only_load(str(path), map_location="cpu")
        except pickle.UnpicklingError:
            raise UserError(f"{path}: refused: this pickle holds more than data (objects or code that would "
                            "run on loading); resume only from training states you trust") from None
        except Exception as e:
            raise UserError(f"{path}: not a loadable training state ({type(e).__name__}: {_first_line(e)})") from None


def update_meta(path: Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Merge `changes` into a checkpoint's checkpoint.json atomically (a synced temporary file
    renamed over it: a kill leaves the old JSON or the new one), e.g. a fitted temperature.
    Returns the new metadata; a failed write raises one UserError and leaves the old file."""
    path = Path(path)
    meta = {**load_meta(path), **changes}
    target = path / META_FILE
    tmp = path / f".{META_FILE}.tmp-{os.getpid()}"
    try:
        _write_synced(tmp, json.dumps(meta, indent=2, default=str).encode())
        os.chmod(tmp, target.stat().st_mode & 0o777)
        os.replace(tmp, target)
        _fsync_dir(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or _first_line(e)
        raise UserError(f"cannot update {target} ({reason}); the previous one is kept") from None
    return meta

"""Find the images of a class-per-folder dataset, vet them up front, and decode them to RGB.

Real photo folders hold junk: truncated or empty files, documents with an image extension,
.DS_Store, 16-bit or CMYK images. `scan_folder` finds every file once, before training starts,
and keeps only files that decode; the rest are reported one line each (or, with --strict, fail
the run). `load_rgb` is the one decoder used by training and evaluation: EXIF orientation
applied, transparency flattened onto white, 16-bit scaled, every mode converted to RGB.

We walk the folder ourselves instead of relying on `datasets`' imagefolder discovery: imagefolder
keeps any file with an image extension (so empty, truncated and fake .jpg files crash a worker
mid-epoch), silently drops other files, and drops the labels altogether when images sit at
different depths (nested folders).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from flowers.errors import UserError

try:  # the extensions `datasets` imagefolder accepts, so both agree on what an image file is
    from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS as _EXTS
    IMAGE_EXTENSIONS = frozenset(e.lower() for e in _EXTS)
except ImportError:  # pragma: no cover - older/newer datasets layouts
    IMAGE_EXTENSIONS = frozenset(e for e, f in Image.registered_extensions().items() if f in Image.OPEN)

LARGE_PIXELS = 4096 * 4096  # above this, JPEGs are decoded at a reduced scale (libjpeg draft mode)
DRAFT_SIDE = 2048           # ... keeping at least this many pixels on each side


@dataclass
class FolderScan:
    """What `scan_folder` found under one root."""
    root: Path
    class_names: list[str]
    files: list[tuple[str, int]]                                   # (path, class index), sorted
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    notes: list[str] = field(default_factory=list)                 # warnings about folders

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)


class UnusableImage(UserError):
    """An image that decoded at the start of the run but not later (changed on disk?)."""


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def warn(message: str) -> None:
    if is_main_process():
        print(f"warning: {message}", flush=True)


def check_image(path: str) -> Optional[str]:
    """None when `path` is a usable image, else a short reason.

    Fast: the header identifies the format and size; a JPEG is decoded only when it does not end
    with the end-of-image marker (truncated, or trailing bytes), a PNG is verified chunk by chunk
    (checksums, no decompression); other formats are small and decoded in full.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # reads the header; raises if no format fits
                if img.format == "JPEG":
                    if not _ends_with_jpeg_eoi(path):
                        img.load()
                elif img.format == "PNG" or img.width * img.height > LARGE_PIXELS:
                    img.verify()
                else:
                    img.load()
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({str(e).split('exceeds')[0].strip()})"
    except Image.UnidentifiedImageError:
        return "not an image (unknown format)"
    except Exception as e:  # truncated data, broken chunks, decoder errors of every kind
        return f"cannot decode ({type(e).__name__}: {_first_line(e)})"
    return None


def _ends_with_jpeg_eoi(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read(2) == b"\xff\xd9"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"


def _has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _class_files(class_dir: Path) -> tuple[list[str], list[tuple[str, str]], bool]:
    """Files under a class folder (any depth): candidates, skipped non-images, nested?"""
    candidates, skipped, nested = [], [], False
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        nested = nested or Path(dirpath) != class_dir and bool(filenames)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith("."):
                skipped.append((path, "hidden file"))
            elif not _has_image_extension(name):
                skipped.append((path, f"not an image file extension ({os.path.splitext(name)[1] or 'none'})"))
            else:
                candidates.append(path)
    return candidates, skipped, nested


def _hint_for_wrapper_folder(root: Path, class_dirs: list[Path]) -> str:
    if len(class_dirs) == 1 and any(p.is_dir() for p in class_dirs[0].iterdir()):
        return f" ({class_dirs[0]} holds sub-folders: did you mean --data {class_dirs[0]}?)"
    return ""


def scan_folder(root: Path, workers: Optional[int] = None, cache_dir: Optional[Path] = None) -> FolderScan:
    """Every usable image under `root`/<class>/..., labelled by its top-level class folder.

    With `cache_dir`, each file's verdict is kept there with its size and modification time, and a
    later scan checks again only the files that changed, so a large folder's start-up is slow once."""
    root = Path(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    for p in sorted(root.iterdir()):
        if p.is_file():
            skipped.append((str(p), "not inside a class folder"))
    per_class: dict[str, list[str]] = {}
    for class_dir in class_dirs:
        candidates, junk, nested = _class_files(class_dir)
        skipped += junk
        if nested:
            notes.append(f"{class_dir.name}/ has images in sub-folders; they count as class '{class_dir.name}'")
        per_class[class_dir.name] = candidates
    all_candidates = [p for paths in per_class.values() for p in paths]
    reasons = _check_all(all_candidates, workers, cache_file_for(root, cache_dir) if cache_dir else None)
    skipped += [(p, r) for p, r in reasons.items() if r is not None]
    kept = {name: [p for p in paths if reasons[p] is None] for name, paths in per_class.items()}
    class_names = [name for name, paths in kept.items() if paths]
    for name in kept:
        if not kept[name]:
            notes.append(f"class folder {name}/ has no usable images; ignored")
    if len(class_names) < 2:
        raise UserError(f"--data {root} has {len(class_names)} class folder(s) with usable images; need at "
                        f"least 2 (one sub-folder of images per class){_hint_for_wrapper_folder(root, class_dirs)}")
    files = [(p, index) for index, name in enumerate(class_names) for p in kept[name]]
    return FolderScan(root, class_names, files, sorted(skipped), notes)


def cache_file_for(root: Path, cache_dir: Path) -> Path:
    """The file in `cache_dir` that holds per-file results for the folder `root`."""
    return cache_dir / (hashlib.sha256(str(Path(root).absolute()).encode()).hexdigest()[:16] + ".json")


def _check_all(paths: list[str], workers: Optional[int], cache_file: Optional[Path]) -> dict[str, Optional[str]]:
    """check_image for every path (see per_file_cached)."""
    return per_file_cached(paths, check_image, cache_file, workers)


def per_file_cached(paths: list[str], compute, cache_file: Optional[Path] = None,
                    workers: Optional[int] = None) -> dict:
    """compute(path) for every path, on several threads (PIL decodes without the GIL); with
    `cache_file`, each result is kept there with the file's size and modification time, and only new
    or changed files are computed again. Results must be JSON values."""
    cached: dict = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
    stamps = {}
    for path in paths:
        try:
            st = os.stat(path)
            stamps[path] = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamps[path] = None
    results = {p: cached[p][2] for p in paths if stamps[p] and cached.get(p, [None, None])[:2] == stamps[p]}
    todo = [p for p in paths if p not in results]
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1))) as pool:
        results.update(zip(todo, pool.map(compute, todo)))
    if cache_file is not None and todo and is_main_process():
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({p: [*stamps[p], results[p]] for p in paths if stamps[p]}))
            os.replace(tmp, cache_file)  # atomic: another process reads the old file or the new one
        except OSError:
            pass  # a read-only cache only costs time
    return results


def report(scan: FolderScan, strict: bool) -> None:
    """One line per skipped file and per folder note, then a count; --strict turns them into an error."""
    for note in scan.notes:
        warn(note)
    if not scan.skipped:
        return
    kind = "error" if strict else "warning"
    if is_main_process():
        for path, reason in scan.skipped:
            print(f"{kind}: {'unusable' if strict else 'skipped'} {scan.relative(path)}: {reason}", flush=True)
    total = len(scan.files) + len(scan.skipped)
    if strict:
        raise UserError(f"--strict: {len(scan.skipped)} of {total} files in {scan.root} are not usable images "
                        "(listed above); remove them, or drop --strict to skip them")
    warn(f"skipped {len(scan.skipped)} of {total} files in {scan.root} (listed above); "
         f"using {len(scan.files)} images. --strict makes this an error")


def load_rgb(entry: dict) -> Image.Image:
    """Decode a `datasets` image entry ({'path', 'bytes'}) to an upright RGB image."""
    source = entry.get("path") or "<in-memory image>"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            data = entry.get("bytes")
            img = Image.open(io.BytesIO(data) if data is not None else entry["path"])
            if img.width * img.height > LARGE_PIXELS:
                img.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))  # JPEG only: a 10000x10000 photo decodes in 1/16 the work
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:
        raise UnusableImage(f"{source}: cannot decode ({type(e).__name__}: {_first_line(e)}); it was readable "
                            "when the run started: did the file change?") from None


def load_rgb_or_none(entry: dict) -> Optional[Image.Image]:
    """load_rgb, or None after a one-line warning when the image no longer decodes (a run keeps
    going without it: see data.collate and device_data)."""
    try:
        return load_rgb(entry)
    except UnusableImage as e:
        print(f"warning: skipped {e}", flush=True)
        return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit scaled to 8-bit, transparency composited onto white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(img).astype(np.int64)
        if img.mode.startswith("I;16") or pixels.max(initial=0) > 255:  # keep the top 8 bits, don't clip
            pixels = pixels >> 8
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")

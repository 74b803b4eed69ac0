"""Near-duplicate photos: a 64-bit difference hash per file, and groups of files whose hashes are
within a Hamming distance of each other.

The split keeps each group on one side (data.stratified_split), and the data check names the
groups that cross classes (one label is wrong). This decides the split, so it uses PIL and numpy
only, never an optional package.

The difference hash (dHash): the upright greyscale image shrunk to 9x8 pixels; bit i is set when a
pixel is brighter than its right neighbour. Resizing and re-encoding a photo (JPEG quality, a
thumbnail) changes few bits; byte-identical files have identical hashes. docs/design.md has the
distances measured on the flower set and why the default is what it is.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from flowers import imagefiles

# Hamming distance (of 64 bits) at or below which two photos are the same photo: see docs/design.md
DEFAULT_DISTANCE = 5  # config.TrainConfig.duplicate_distance's default too
HASH_SIDE = 8
# a 9x8 thumbnail whose neighbours differ by less than this (of 255) everywhere has no gradient to
# hash (a flat colour): its bits say nothing, and all such images would be "near-duplicates"
FLAT_CONTRAST = 2


def difference_hash(img: Image.Image) -> Optional[int]:
    """The 64-bit dHash of an (upright) image; None for a flat one (see FLAT_CONTRAST)."""
    grey = img.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.int16)
    steps = pixels[:, 1:] - pixels[:, :-1]
    if np.abs(steps).max() < FLAT_CONTRAST:
        return None
    return int(np.packbits((steps > 0).flatten()).view(">u8")[0])


def file_hash(path: str) -> Optional[int]:
    """dHash of an image file, EXIF orientation applied (None when it does not decode or is flat). A
    large JPEG is decoded at a reduced scale: the hash looks at 72 pixels."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))  # JPEG only: decode at 1/2 to 1/8 scale, still >= 64 px a side
            return difference_hash(ImageOps.exif_transpose(img))
    except Exception:  # unusable files are reported by imagefiles.scan_folder
        return None


def hash_files(paths: list[str], cache_file: Optional[Path] = None,
               workers: Optional[int] = None) -> dict[str, Optional[int]]:
    """file_hash of every path; with `cache_file`, only new or changed files are decoded again
    (imagefiles.per_file_cached, as imagefiles caches its verdicts)."""
    return imagefiles.per_file_cached(paths, file_hash, cache_file, workers)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distances between uint64 hashes (broadcast)."""
    x = np.bitwise_xor(a, b)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)  # pragma: no cover
    return table[x.view(np.uint8).reshape(*x.shape, 8)].sum(-1)  # pragma: no cover


def close_pairs(hashes: np.ndarray, *, max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every pair i < j of `hashes` (uint64, shape (n,)) within `max_distance`."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    pairs = []
    height = max(1, 4_000_000 // max(1, len(hashes)))  # a block of height x n distances: at most ~32 MB
    for start in range(0, len(hashes), height):
        block = hamming(hashes[start:start + height, None], hashes[None, :])
        rows, cols = np.nonzero(block <= max_distance)
        for i, j in zip(rows + start, cols):
            if i < j:
                pairs.append((int(i), int(j), int(block[i - start, j])))
    return pairs


def groups_of(hashes: np.ndarray, *, max_distance: int) -> list[list[int]]:
    """Indices of `hashes` linked by chains of pairs within `max_distance` (connected components),
    each group sorted, groups ordered by their first index; singletons left out."""
    return components(len(hashes), [(i, j) for i, j, _ in close_pairs(hashes, max_distance=max_distance)])


def components(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """The groups of 0..n-1 that `pairs` link (union-find), as groups_of orders them."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(root(i), []).append(i)
    return sorted((g for g in members.values() if len(g) > 1), key=lambda g: g[0])


def identical_pairs(paths: list[str]) -> list[tuple[int, int]]:
    """(i, j) for files with the same bytes (only files of equal size are read)."""
    by_size: dict[int, list[int]] = {}
    for i, path in enumerate(paths):
        try:
            by_size.setdefault(os.path.getsize(path), []).append(i)
        except OSError:
            continue
    pairs = []
    for same_size in (ids for ids in by_size.values() if len(ids) > 1):
        first_of: dict[str, int] = {}
        for i in same_size:
            digest = hashlib.sha256(Path(paths[i]).read_bytes()).hexdigest()
            if digest in first_of:
                pairs.append((first_of[digest], i))
            first_of.setdefault(digest, i)
    return pairs


def path_groups(paths: list[str], *, max_distance: int, cache_file: Optional[Path] = None) -> list[list[str]]:
    """Groups of byte-identical or near-duplicate files among `paths` (a file that does not decode,
    or a flat one, is grouped only with its byte-identical copies)."""
    hashes = hash_files(paths, cache_file)
    hashed = [i for i, p in enumerate(paths) if hashes[p] is not None]
    values = np.array([hashes[paths[i]] for i in hashed], dtype=np.uint64)
    pairs = [(hashed[i], hashed[j]) for i, j, _ in close_pairs(values, max_distance=max_distance)]
    return [[paths[i] for i in group] for group in components(len(paths), pairs + identical_pairs(paths))]

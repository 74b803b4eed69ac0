"""Data checks that warn, never fail: byte-identical images (in two classes, or twice in one)
and class imbalance. Run at training start and by eval.py."""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from typing import Iterable

from datasets import Dataset, Image

IMBALANCE_RATIO = 1.5  # warn when the largest class has this many times the images of the smallest
MAX_LISTED = 5         # duplicate groups named one per line; the rest are counted


def _size(entry: dict) -> int:
    return len(entry["bytes"]) if entry.get("bytes") is not None else os.path.getsize(entry["path"])


def _digest(entry: dict) -> str:
    if entry.get("bytes") is not None:
        return hashlib.sha256(entry["bytes"]).hexdigest()
    digest = hashlib.sha256()
    with open(entry["path"], "rb") as f:  # chunked: hashlib.file_digest is Python 3.11+
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _name(entry: dict) -> str:
    return os.path.basename(entry["path"]) if entry.get("path") else "<in-memory image>"


def duplicate_groups(parts: Iterable[Dataset]) -> list[list[tuple[str, int]]]:
    """Groups of images with identical bytes, each as [(file name, label id), ...]."""
    by_size: dict[int, list[tuple[dict, int]]] = defaultdict(list)
    for part in parts:
        columns = part.cast_column("image", Image(decode=False))[:]  # one query, not row by row
        for entry, label in zip(columns["image"], columns["label"]):
            by_size[_size(entry)].append((entry, label))
    by_digest: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for same_size in by_size.values():
        if len(same_size) > 1:  # only files of equal size can be identical: hash just those
            for entry, label in same_size:
                by_digest[_digest(entry)].append((_name(entry), label))
    return [group for group in by_digest.values() if len(group) > 1]


def find_problems(parts: list[Dataset], class_names: list[str]) -> list[str]:
    """One warning line per problem found in the union of `parts` (e.g. the train and val splits)."""
    warnings = []
    groups = duplicate_groups(parts)
    across = [g for g in groups if len({label for _, label in g}) > 1]
    within = [g for g in groups if len({label for _, label in g}) == 1]
    if across:
        warnings.append(f"{len(across)} image(s) have byte-identical copies in different classes "
                        "(at least one label is wrong):")
        for group in across[:MAX_LISTED]:
            warnings.append("  " + ", ".join(f"{class_names[label]}/{name}" for name, label in group))
        if len(across) > MAX_LISTED:
            warnings.append(f"  ... and {len(across) - MAX_LISTED} more")
    if within:
        examples = "; ".join(" = ".join(f"{class_names[label]}/{name}" for name, label in group)
                             for group in within[:MAX_LISTED])
        more = f" and {len(within) - MAX_LISTED} more" if len(within) > MAX_LISTED else ""
        warnings.append(f"{len(within)} image(s) are duplicated within their class (a copy may sit in both "
                        f"train and validation): {examples}{more}")
    counts = Counter(label for part in parts for label in part.select_columns("label")[:]["label"])
    sizes = [counts.get(i, 0) for i in range(len(class_names))]
    if min(sizes) == 0 or max(sizes) / min(sizes) > IMBALANCE_RATIO:
        listed = ", ".join(f"{name} {size}" for name, size in zip(class_names, sizes))
        warnings.append(f"class imbalance: {listed} images (accuracy alone can mislead; "
                        "look at per-class recall; training can compensate with --class-weights auto "
                        "or --sampler balanced)")
    return warnings


def warn_about_data(accelerator, parts: list[Dataset], class_names: list[str]) -> list[str]:
    """Print the data warnings once (main process); returns them."""
    if not accelerator.is_main_process:
        return []
    problems = find_problems(parts, class_names)
    for line in problems:
        print(line if line.startswith("  ") else f"data warning: {line}")
    return problems

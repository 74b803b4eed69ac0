"""Data checks that warn, never fail: byte-identical images (in two classes, or twice in one),
near-duplicate photos (resized or re-encoded copies, see duplicates.py: across classes a label is
likely wrong) and class imbalance. Run at training start and by eval.py."""

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


def _labelled(parts: Iterable[Dataset], groups: list[list[str]]) -> list[list[tuple[str, int]]]:
    """Each group of paths as [(class/file name, label id), ...], with the labels `parts` give them."""
    label_of = {}
    for part in parts:
        columns = part.cast_column("image", Image(decode=False))[:]
        label_of.update((entry.get("path"), label) for entry, label in zip(columns["image"], columns["label"]))
    return [[(os.path.basename(p), label_of[p]) for p in group if p in label_of] for group in groups]


def near_duplicate_lines(parts: list[Dataset], class_names: list[str], near_duplicates: list[list[str]],
                         byte_identical: list[list[tuple[str, int]]]) -> list[str]:
    """Warnings naming the near-duplicate groups (paths) that are not just byte-identical copies
    (those are named above): across classes first (a label is likely wrong), then within one."""
    seen = [sorted(g) for g in byte_identical]
    groups = [g for g in _labelled(parts, near_duplicates) if len(g) > 1 and sorted(g) not in seen]
    across = [g for g in groups if len({label for _, label in g}) > 1]
    within = [g for g in groups if len({label for _, label in g}) == 1]
    show = lambda group: " ~ ".join(f"{class_names[label]}/{name}" for name, label in group)
    lines = []
    if across:
        lines.append(f"{len(across)} group(s) of near-duplicate photos (resized or re-encoded copies) are in "
                     "different classes (a label is likely wrong):")
        lines += ["  " + show(g) for g in across[:MAX_LISTED]]
        if len(across) > MAX_LISTED:
            lines.append(f"  ... and {len(across) - MAX_LISTED} more")
    if within:
        more = f" and {len(within) - MAX_LISTED} more" if len(within) > MAX_LISTED else ""
        lines.append(f"{len(within)} group(s) of near-duplicate photos within a class (each kept on one side of "
                     f"the split): {'; '.join(show(g) for g in within[:MAX_LISTED])}{more}")
    return lines


def find_problems(parts: list[Dataset], class_names: list[str],
                  near_duplicates: list[list[str]] = ()) -> list[str]:
    """One warning line per problem found in the union of `parts` (e.g. the train and val splits);
    `near_duplicates`: the split's groups of near-duplicate files (absolute paths)."""
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
                        f"train and validation unless near-duplicates are kept together): {examples}{more}")
    if near_duplicates:
        warnings += near_duplicate_lines(parts, class_names, list(near_duplicates), groups)
    counts = Counter(label for part in parts for label in part.select_columns("label")[:]["label"])
    sizes = [counts.get(i, 0) for i in range(len(class_names))]
    if min(sizes) == 0 or max(sizes) / min(sizes) > IMBALANCE_RATIO:
        listed = ", ".join(f"{name} {size}" for name, size in zip(class_names, sizes))
        warnings.append(f"class imbalance: {listed} images (accuracy alone can mislead; "
                        "look at per-class recall; training can compensate with --class-weights auto "
                        "or --sampler balanced)")
    return warnings


def warn_about_data(accelerator, parts: list[Dataset], class_names: list[str],
                    near_duplicates: list[list[str]] = ()) -> list[str]:
    """Print the data warnings once (main process); returns them."""
    if not accelerator.is_main_process:
        return []
    problems = find_problems(parts, class_names, near_duplicates)
    for line in problems:
        print(line if line.startswith("  ") else f"data warning: {line}")
    return problems

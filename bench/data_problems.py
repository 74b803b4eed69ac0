"""Measurements of issue 27 (docs/performance.md, "Finding what is wrong with the data").

    python bench/data_problems.py groups DATA                 # near-duplicate groups the plain split puts on both sides
    python bench/data_problems.py flip DATA COPY [--seed 0]   # COPY/flower_dataset: symlinks, 5% of labels flipped; COPY/flips.csv
    python bench/data_problems.py score DIR FLIPS_CSV         # label_issues.csv in DIR against the planted flips

`flip` moves a seeded 5% of the images into another class folder (never onto a file name that
class already has) and records path, true_label, given_label. `score` prints precision and recall,
how often the suggested label is the true one, and the flagged images that were not planted (those
judge the original labels).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def groups(data: str) -> None:
    from flowers.data import SplitOptions, image_paths, load_splits
    for seed in (42, 0, 1):
        plain = load_splits(data, 0.2, seed, options=SplitOptions(duplicate_distance=-1))
        old_val = set(image_paths(plain.val))
        for distance in ((0, 5, 6) if seed == 42 else (5,)):
            grouped = load_splits(data, 0.2, seed, options=SplitOptions(duplicate_distance=distance))
            new_val, found = set(image_paths(grouped.val)), grouped.group_paths()
            across = sum(len({Path(p).parent.name for p in g}) > 1 for g in found)
            print(f"seed {seed} distance {distance}: {len(found)} groups ({sum(map(len, found))} images, {across} across "
                  f"classes); on both sides: plain split {sum(len({p in old_val for p in g}) > 1 for g in found)}, "
                  f"group-aware {sum(len({p in new_val for p in g}) > 1 for g in found)}; "
                  f"validation {len(plain.val)} -> {len(grouped.val)} images")


def flip(data: str, copy: str, seed: int, fraction: float = 0.05) -> None:
    src, dst = Path(data).resolve(), Path(copy) / "flower_dataset"
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    files = sorted((c, p.name) for c in classes for p in (src / c).iterdir() if p.is_file())
    names = {c: {name for k, name in files if k == c} for c in classes}
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(len(files), round(fraction * len(files)), replace=False).tolist())
    flips = []
    for i, (c, name) in enumerate(files):
        target = c
        if i in chosen:
            others = [k for k in classes if k != c and name not in names[k]]
            target = others[rng.integers(len(others))]
            flips.append((f"{target}/{name}", c, target))
        (dst / target).mkdir(parents=True, exist_ok=True)
        (dst / target / name).symlink_to(src / c / name)
    with open(Path(copy) / "flips.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "true_label", "given_label"])
        writer.writerows(flips)
    print(f"{len(files)} images, {len(flips)} flipped (seed {seed}): {dst}, {Path(copy) / 'flips.csv'}")


def score(folder: str, flips_csv: str) -> None:
    flips = {r["path"]: r for r in csv.DictReader(open(flips_csv))}
    issues = list(csv.DictReader(open(Path(folder) / "label_issues.csv")))
    if (Path(folder) / "oof.csv").is_file():
        judged = {r["path"] for r in csv.DictReader(open(Path(folder) / "oof.csv"))}
    else:  # a plain run: label_issues judged its held-out images, its checkpoint's split rebuilt
        from flowers.data import image_paths, load_splits, recorded_split
        data = json.loads((Path(folder) / "last" / "checkpoint.json").read_text())["data"]
        val = load_splits(data["source"], data["val_split"], data["split_seed"], options=recorded_split(data)).val
        judged = {str(Path(p).relative_to(data["source"])) for p in image_paths(val)}
    planted = {p for p in flips if p in judged}
    found = {r["path"] for r in issues}
    hits = found & planted
    print(f"judged {len(judged)} images holding {len(planted)} planted flips; flagged {len(found)}; "
          f"precision {len(hits) / max(1, len(found)):.1%}, recall {len(hits) / max(1, len(planted)):.1%}")
    right = sum(r["suggested_label"] == flips[r["path"]]["true_label"] for r in issues if r["path"] in flips)
    print(f"suggested label = the true one for {right} of the {len(hits)} flips found")
    for k in (20, 50):
        print(f"first {k} flagged: {sum(r['path'] in planted for r in issues[:k])} planted")
    others = [r for r in issues if r["path"] not in flips]
    print(f"{len(others)} flagged that were not planted (judging the original labels); the first 20:")
    for r in others[:20]:
        print(f"  {r['path']}: given {r['given_label']}, suggested {r['suggested_label']} (score {r['score']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("groups").add_argument("data")
    f = sub.add_parser("flip")
    f.add_argument("data")
    f.add_argument("copy")
    f.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score")
    s.add_argument("folder")
    s.add_argument("flips_csv")
    args = parser.parse_args()
    if args.command == "groups":
        groups(args.data)
    elif args.command == "flip":
        flip(args.data, args.copy, args.seed)
    else:
        score(args.folder, args.flips_csv)


if __name__ == "__main__":
    main()

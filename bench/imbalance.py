"""The imbalance measurement of docs/performance.md: one class cut to a small share of its training
photos (validation untouched), trained the same way with --class-weights none, --class-weights auto
and --sampler balanced, several seeds each. Prints one JSON line per run and a Markdown table.

    python bench/imbalance.py --data /path/to/flower_dataset --out /tmp/imbalance \\
        --cut tulip --keep 0.05 --seeds 1 2 3 -- --image-size 48 --epochs 6 --weights none

The validation split is the full set's stratified split (seed 42, 20%), written once as val/;
train/ holds the rest with the cut class reduced to `--keep` of its photos (the first ones of a
seeded shuffle). Each run is training.fit() (the flags after `--` go to train.py); the numbers
are those of the last epoch's validation, read from the run's own outputs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {"none": ["--class-weights", "none"], "auto": ["--class-weights", "auto"],
            "balanced": ["--sampler", "balanced"]}


def make_cut_folder(data: Path, out: Path, cut: str, keep: float) -> Path:
    """out/train (the cut class reduced) and out/val (untouched), as symlinks to the photos."""
    from flowers.data import image_paths, load_splits
    root = out / "data"
    if root.is_dir():
        return root
    splits = load_splits(str(data), 0.2, 42)
    for part, ds in (("train", splits.train), ("val", splits.val)):
        by_class: dict[str, list[str]] = {}
        for path, label in zip(image_paths(ds), ds["label"]):
            by_class.setdefault(splits.class_names[label], []).append(path)
        for name, paths in by_class.items():
            if part == "train" and name == cut:
                paths = sorted(paths)
                random.Random(0).shuffle(paths)
                paths = paths[:max(1, round(keep * len(paths)))]
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for path in paths:
                (folder / Path(path).name).symlink_to(path)
    return root


def run_one(data: Path, out: Path, setting: str, seed: int, flags: list[str], cut: str) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from flowers import training
    from flowers.config import TrainConfig, parse
    from flowers.metrics import compute_metrics

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    last = {}
    validate = training.Run.validate

    def keep_outputs(self, epoch, train):  # the last epoch's validation outputs
        result = validate(self, epoch, train)
        last.update(scores=result.outputs.scores, labels=result.outputs.labels, names=self.splits.class_names,
                    data_wait=train.data_wait)
        return result

    training.Run.validate = keep_outputs
    try:
        cfg = parse(TrainConfig, ["--data", str(data), "--output-dir", str(out / "runs"), "--run-name",
                                  f"{setting}-seed{seed}", "--seed", str(seed), "--report-to", "none",
                                  *SETTINGS[setting], *flags])
        training.fit(cfg)
    finally:
        training.Run.validate = validate
    scores, labels, names = last["scores"], last["labels"], last["names"]
    metrics = compute_metrics(scores, labels, len(names))
    predicted = scores.argmax(1)
    small = names.index(cut)
    recall = float((predicted[labels == small] == small).mean())
    return {"setting": setting, "seed": seed, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            f"recall_{cut}": recall, "data_wait": last["data_wait"]}


def table(rows: list[dict], cut: str) -> str:
    keys = ["accuracy", "macro_f1", f"recall_{cut}"]
    lines = ["| setting | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        if not mine:
            continue
        cells = []
        for k in keys:
            values = [r[k] for r in mine]
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{np.mean(values):.3f} ± {spread:.3f} ({', '.join(f'{v:.3f}' for v in values)})")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cut", default="tulip")
    parser.add_argument("--keep", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    data = make_cut_folder(Path(args.data), out, args.cut, args.keep)
    rows = []
    for seed in args.seeds:
        for setting in args.settings:
            row = run_one(data, out, setting, seed, flags, args.cut)
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    print(table(rows, args.cut))


if __name__ == "__main__":
    main()

"""Load + split of a large image folder: first (empty caches) and cached, with peak memory.

    python bench/scale_load.py [--images 100000] [--root /tmp/flowers-scale]

Generates ROOT/photos-N/<class>/*.jpg (tiny JPEGs, 5 classes; kept for later runs) and runs
flowers.data.load_splits in a fresh process twice with ROOT/hf as HF_HOME: first with an empty
cache, so every file's header is checked, then again, when the scan's verdicts cached under
HF_HOME are reused for the unchanged files. Each load reports its wall time and its peak resident
memory; the images are never all in memory (datasets stores the paths; the split is an index
mapping).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("daisy", "dandelion", "rose", "sunflower", "tulip")


def generate(folder: Path, count: int) -> None:
    """`count` 32x24 JPEGs, ~1 KB each, spread over the classes; skipped if already there."""
    from PIL import Image

    marker = folder / f".complete-{count}"
    if marker.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
    started = time.perf_counter()
    for i in range(count):
        label = i % len(CLASSES)
        Image.new("RGB", (32, 24), (i % 256, (i // 256) % 256, 40 * label)).save(
            folder / CLASSES[label] / f"{i:06d}.jpg", quality=80)
    marker.touch()
    print(f"generated {count} JPEGs in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def measure_in_child(folder: str) -> None:
    """Run in a fresh process: load + split once, print seconds and peak RSS as JSON."""
    import resource

    sys.path.insert(0, str(REPO))
    from flowers.data import load_splits

    started = time.perf_counter()
    splits = load_splits(folder, 0.2, seed=42)
    seconds = time.perf_counter() - started
    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_kib / 1024,
                      "train": len(splits.train), "val": len(splits.val)}))


def load_in_fresh_process(folder: Path, hf_home: Path) -> dict:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, __file__, "--child", str(folder)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--root", default="/tmp/flowers-scale")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure_in_child(args.child)

    root = Path(args.root)
    folder = root / f"photos-{args.images}"
    generate(folder, args.images)
    hf_home = root / "hf"
    shutil.rmtree(hf_home, ignore_errors=True)
    print(f"load + split of {args.images} images (load average {os.getloadavg()[0]:.2f}):")
    for label in ("first (empty cache)", "cached"):
        r = load_in_fresh_process(folder, hf_home)
        print(f"  {label:20s} {r['seconds']:6.1f} s   peak RSS {r['peak_rss_mib']:6.0f} MiB   "
              f"train {r['train']} / val {r['val']}")


if __name__ == "__main__":
    main()

"""bench/time_to_accuracy.py: when a run reached each accuracy, in epochs, wall time and compute
(training images weighted by (size / 224)^2), on hand-made run folders whose numbers are known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _run(folder: Path, image_size: int, rows: list[tuple[float, float, int | None]]) -> Path:
    """A run folder: config.yaml and one history row per (val_accuracy, epoch_time_s, image_size or None)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"image_size: {image_size}\n")
    with open(folder / "history.jsonl", "w") as f:
        for epoch, (accuracy, seconds, size) in enumerate(rows, start=1):
            row = {"epoch": epoch, "val_accuracy": accuracy, "epoch_time_s": seconds, "train_samples": 1000}
            if size is not None:
                row["image_size"] = size
            f.write(json.dumps(row) + "\n")
    return folder


def test_first_epoch_wall_time_and_compute_per_target_and_the_mean(tmp_path):
    # 112 px: a quarter of a 224-px image each; the ramp's rows name their own size
    old = _run(tmp_path / "old", 112, [(0.80, 60, None), (0.86, 60, None), (0.91, 60, None)])
    ramp = _run(tmp_path / "ramp", 224, [(0.70, 30, 112), (0.89, 30, 224), (0.90, 30, 224)])
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "time_to_accuracy.py"), str(old), str(ramp),
                           "--targets", "85,90", "--budget", "1500"], capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert "| old | 91.00% | 3 | 750 | 2, 2.0, 500 | 3, 3.0, 750 |" in lines
    assert "| ramp | 90.00% | 3 | 2,250 | 2, 1.0, 1,250 | 3, 1.5, 2,250 |" in lines
    assert "| mean of 2 | 90.50% | | | 2.0, 1.5, 875 | 3.0, 2.2, 1,500 |" in lines
    assert lines[-1] == ("best val_accuracy within 1,500 224-px images: old 91.00%, ramp 89.00%; mean 90.00%")

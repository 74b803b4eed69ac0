"""--sampler balanced in real training runs: a SIGTERM mid-epoch resumes bit-exactly, and two DDP
ranks take disjoint parts of the one seeded balanced order (slow: real runs and launches)."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (ACCELERATE, CLASSES, TINY_TRAIN, free_port, interrupt_mid_epoch, make_dataset,
                      patched_entry_script, read_history, run_cli)
from flowers import balance
from flowers.data import load_splits

pytestmark = pytest.mark.slow

OPTIONS = ("--sampler", "balanced", "--class-weights", "auto", "--epochs", "2", "--batch-size", "4", "--seed", "3",
           "--dropout", "0.2")
TIMEOUT = 1200


def _lopsided(root: Path) -> Path:
    """40 photos: 20 of the first class, 5 of each other (32 train in 8 batches of 4)."""
    make_dataset(root, per_class=20, classes=CLASSES[:1])
    return make_dataset(root, per_class=5, classes=CLASSES[1:])


def _history(run: Path) -> list[dict]:
    rows = read_history(run)
    for row in rows:
        for key in ("epoch_time_s", "images_per_s", "data_wait"):
            row.pop(key)
    return rows


def test_balanced_run_stopped_mid_epoch_resumes_bit_exactly(tmp_path):
    data, out = _lopsided(tmp_path / "flowers"), tmp_path / "out"
    train = [sys.executable, "train.py", "--data", str(data), "--output-dir", str(out), *TINY_TRAIN, *OPTIONS]
    run_cli(*train, "--run-name", "whole", timeout=TIMEOUT)
    stopped = interrupt_mid_epoch([*train, "--run-name", "cut", "--save-every-steps", "2"], out / "cut",
                                  global_step=10, timeout=TIMEOUT)  # epoch 2's batch 2 (of 8) or later
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-2000:]
    k = int(re.findall(r"at epoch 2, batch (\d+)/8\.", stopped.stdout)[0])
    assert 0 < k < 8
    resumed = run_cli("python", "train.py", "--resume", str(out / "cut"), timeout=TIMEOUT)  # options from the run
    assert f"after epoch 1/2 and {k} batches of the next" in resumed.stdout
    for name in ("last", "best"):
        ours, theirs = (load_file(str(out / run / name / "model.safetensors")) for run in ("cut", "whole"))
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), f"{name}/ weights differ"
    assert _history(out / "cut") == _history(out / "whole")
    meta = json.loads((out / "cut" / "last" / "checkpoint.json").read_text())
    assert meta["data"]["sampler"] == "balanced" and meta["config"]["class_weights"] == "auto"


RECORD_INDICES = """
import json
from flowers import data
_get = data.SeededAugmentation.__getitems__
def _recording(self, indices):
    with open(os.environ["ROWS"] + os.environ.get("RANK", "0"), "a") as f:
        f.write(json.dumps([self.epoch, list(indices)]) + "\\n")
    return _get(self, indices)
data.SeededAugmentation.__getitems__ = _recording
"""


def test_two_ranks_take_alternate_batches_of_the_one_balanced_order(tmp_path):
    """Two real CPU ranks (gloo): each epoch's balanced order is drawn once from (seed, epoch);
    rank r trains on its global batches r, r + 2, ...: disjoint positions that together cover it."""
    data = _lopsided(tmp_path / "flowers")
    script = patched_entry_script(tmp_path / "train_rows.py", RECORD_INDICES)
    out = tmp_path / "out"
    proc = run_cli(ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_ddp.yaml", "--main_process_port",
                   str(free_port()), script, "--data", str(data), "--output-dir", str(out), "--run-name", "ddp",
                   *TINY_TRAIN, *OPTIONS, env={"ACCELERATE_USE_CPU": "true", "ROWS": str(tmp_path / "rows-")},
                   timeout=TIMEOUT)
    assert "processes: 2" in proc.stdout
    meta = json.loads((out / "ddp" / "last" / "checkpoint.json").read_text())
    labels = torch.tensor(balance.split_labels(load_splits(str(data), 0.2, 3).train))
    seen = {rank: [json.loads(line) for line in (tmp_path / f"rows-{rank}").read_text().splitlines()]
            for rank in "01"}
    for epoch in (0, 1):
        order = balance.balanced_order(labels, len(labels), meta["data"]["shuffle_seed"], epoch).tolist()
        batches = [order[i:i + 4] for i in range(0, len(order), 4)]
        for rank in (0, 1):
            assert [rows for e, rows in seen[str(rank)] if e == epoch] == batches[rank::2]
    assert [row["train_samples"] for row in read_history(out / "ddp")] == [32, 32]

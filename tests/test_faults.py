"""Numerical and distributed faults, injected into real training runs through small wrapper
scripts (train.py with one hook added): a NaN loss stops the run in one line keeping the last good
checkpoint, or is skipped with --on-nan skip; a failing rank ends a two-process run quickly."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY_TRAIN, make_dataset, patched_entry_script, run_cli

pytestmark = pytest.mark.slow  # real training runs with injected faults, one with two DDP ranks

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

# a patch of train.py: a forward hook that turns the model's output into NaN on the N-th training batch.
NAN_AT_BATCH = '''
    from flowers import training

    NAN_AT = int(os.environ["NAN_AT_BATCH"])
    batches = 0
    build_model = training.build_model

    def poison(module, inputs, output):
        global batches
        if module.training:
            batches += 1
            if batches == NAN_AT:
                return output * float("nan")

    def build_model_with_nan(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.register_forward_hook(poison)
        return model

    training.build_model = build_model_with_nan
'''

# a patch of train.py where rank 1 finds bad data in its second batch (a one-line UserError) and stops;
# it prints the time it failed, so the test measures how long the other rank takes to stop.
RANK1_FAILS = '''
    import time
    from flowers import data, training
    from flowers.errors import UserError

    collate = data.collate
    batches = 0

    def collate_failing_on_rank1(examples, **options):
        global batches
        batches += 1
        if os.environ.get("RANK") == "1" and batches == 2:
            print(f"FAILED_AT {time.time()}", flush=True)
            raise UserError("bad data on rank 1: injected failure")
        return collate(examples, **options)

    data.collate = collate_failing_on_rank1
'''


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("faults") / "flowers", per_class=8, classes=["daisy", "rose"])


def _all_finite(checkpoint_dir: Path) -> bool:
    return all(bool(t.isfinite().all()) for t in load_file(str(checkpoint_dir / "model.safetensors")).values())


# 16 images: 12 train -> 3 batches of 4 per epoch. Batch 5 is epoch 2, step 2.
NAN_RUN = ("--epochs", "3", "--run-name", "r", *TINY_TRAIN, "--batch-size", "4", "--lr", "1e-4")


def test_nan_loss_stops_in_one_line_naming_epoch_and_step_and_keeps_last_good(small_data, tmp_path):
    script = patched_entry_script(tmp_path / "train_nan.py", NAN_AT_BATCH)
    out = tmp_path / "out"
    proc = run_cli("python", script, "--data", str(small_data), "--output-dir", str(out), *NAN_RUN,
                   env={"NAN_AT_BATCH": "5"}, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: non-finite training loss (NaN or Inf) at epoch 2, step 2 of 3"), last_line
    assert f"The last good checkpoint is kept: {out / 'r' / 'last'}" in last_line
    assert "Traceback" not in proc.stderr
    for name in ("last", "best"):
        assert json.loads((out / "r" / name / "checkpoint.json").read_text())["epoch"] == 1
        assert _all_finite(out / "r" / name)


def test_on_nan_skip_skips_the_poisoned_update_and_finishes(small_data, tmp_path):
    script = patched_entry_script(tmp_path / "train_nan.py", NAN_AT_BATCH)
    out = tmp_path / "out"
    proc = run_cli("python", script, "--data", str(small_data), "--output-dir", str(out), *NAN_RUN,
                   "--on-nan", "skip", env={"NAN_AT_BATCH": "5"})
    assert "warning: epoch 2: skipped 1 update(s) with a non-finite loss" in proc.stdout
    meta = json.loads((out / "r" / "last" / "checkpoint.json").read_text())
    assert meta["epoch"] == 3
    assert all(v == v for v in (meta["metrics"]["train_loss"], meta["metrics"]["val_loss"]))  # not NaN
    assert _all_finite(out / "r" / "last")


def test_one_failing_rank_stops_both_ranks_quickly_with_its_error(small_data, tmp_path):
    script = patched_entry_script(tmp_path / "train_rank1_fails.py", RANK1_FAILS)
    started = time.time()
    proc = run_cli(ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_ddp.yaml",
                   "--main_process_port", "29547", script, "--data", str(small_data), "--epochs", "2",
                   "--output-dir", str(tmp_path / "out"), *TINY_TRAIN, "--batch-size", "2",
                   check=False, timeout=600)
    ended = time.time()
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "error (rank 1): bad data on rank 1: injected failure" in proc.stderr, text[-3000:]
    failed_at = float(proc.stdout.split("FAILED_AT ")[1].split()[0])
    assert ended - failed_at < 60, f"the other rank took {ended - failed_at:.0f} s to stop"
    print(f"failure -> all processes ended: {ended - failed_at:.1f} s (whole run {ended - started:.0f} s)")

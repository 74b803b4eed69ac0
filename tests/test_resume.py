"""Exact resume after SIGTERM, and --init-from starting a new run (real training runs, tiny data)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ACCELERATE, TINY_TRAIN, free_port, interrupt_mid_epoch, make_dataset, run_cli

pytestmark = pytest.mark.slow

# dropout, MixUp and EMA make the comparison cover the RNG and every piece of saved state; a milder
# augmentation (--recipe scratch's) draws the same numbers, so it resumes exactly too
RECIPE = ("--epochs", "2", "--batch-size", "4", "--dropout", "0.2", "--mixup", "0.2", "--ema-decay", "0.9",
          "--seed", "3", "--crop-scale", "0.35", "--no-affine")
TIMEOUT = 1200  # seconds; each run takes ~15 s on an idle 2-core machine


def _train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("python", "train.py", "--data", str(data), "--output-dir", str(out), *TINY_TRAIN, *RECIPE, *extra,
                   timeout=TIMEOUT)


def _history(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    for row in rows:  # wall-clock numbers legitimately differ
        for key in ("epoch_time_s", "images_per_s", "data_wait"):
            row.pop(key)
    return rows


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, run folder) of a 2-epoch run that nobody interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = make_dataset(root / "flowers", per_class=5)
    _train(data, root / "out", "--run-name", "whole")
    return data, root / "out" / "whole"


def _start_and_sigterm_in_epoch_2(data: Path, out: Path) -> subprocess.CompletedProcess:
    """Start the same run, saving every 2 steps (a runtime option: it changes no result), and send
    SIGTERM once step 6 is saved: epoch 2's first (of 5); wait."""
    cmd = [sys.executable, "train.py", "--data", str(data), "--output-dir", str(out), *TINY_TRAIN, *RECIPE,
           "--run-name", "cut", "--save-every-steps", "2"]
    return interrupt_mid_epoch(cmd, out / "cut", global_step=6, timeout=TIMEOUT)


def _stopped_at_batch(stdout: str, epoch: int, batches: int) -> int:
    """k from the stop message 'saved ... at epoch E, batch k/N'; asserts the stop was mid-epoch."""
    found = re.findall(rf"saved \S+ at epoch {epoch}, batch (\d+)/{batches}\.", stdout)
    assert len(found) == 1, stdout[-2000:]
    k = int(found[0])
    assert 0 < k < batches, f"stopped at batch {k}/{batches}: not mid-epoch"
    return k


def test_sigterm_saves_last_and_resume_ends_exactly_like_an_uninterrupted_run(uninterrupted, tmp_path):
    """Stopped mid-epoch (batch k of 5 of epoch 2), resumed: the weights, best/, ema/ and the
    history are exactly those of the run nobody interrupted."""
    data, whole = uninterrupted
    out = tmp_path / "out"
    stopped = _start_and_sigterm_in_epoch_2(data, out)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-2000:]
    assert f"Resume with:\n  python train.py --resume {out / 'cut'}" in stopped.stdout
    k = _stopped_at_batch(stopped.stdout, epoch=2, batches=5)  # 20 training images in batches of 4
    cut = out / "cut"
    meta = json.loads((cut / "last" / "checkpoint.json").read_text())
    assert meta["epoch"] == 1 and (cut / "last" / "training_state").is_dir()
    assert meta["global_step"] == 5 + k  # epoch 1's 5 steps and k of epoch 2

    resumed = _train(data, out, "--resume")  # no DIR: the latest run under --output-dir
    assert f"resuming {cut} after epoch 1/2 and {k} batches of the next" in resumed.stdout
    for name in ("last", "best", "ema"):
        ours, theirs = load_file(str(cut / name / "model.safetensors")), load_file(str(whole / name / "model.safetensors"))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), f"{name}/ weights differ"
    assert _history(cut) == _history(whole)

    again = _train(data, out, "--resume", str(cut))
    assert "has already finished" in again.stdout


def test_init_from_starts_a_new_run_from_those_weights_with_a_fresh_optimizer(uninterrupted):
    data, whole = uninterrupted
    out = whole.parent
    # frozen backbone: its parameters must stay exactly the source's, proving where the run started
    run_cli("python", "train.py", "--data", str(data), "--output-dir", str(out), *TINY_TRAIN, "--epochs", "1",
            "--batch-size", "4", "--init-from", "best", "--lr", "1e-4", "--freeze-backbone", "--run-name", "stage2",
            timeout=TIMEOUT)
    stage2 = out / "stage2"
    meta = json.loads((stage2 / "last" / "checkpoint.json").read_text())
    assert meta["init_from"]["path"] == str((whole / "best").resolve())
    assert meta["init_from"]["head_loaded"] and meta["config"]["init_from"] == str((whole / "best").resolve())
    source, new = load_file(str(whole / "best" / "model.safetensors")), load_file(str(stage2 / "last" / "model.safetensors"))
    source = {k.replace("fc.1.", "fc."): v for k, v in source.items()}  # the source run had dropout
    backbone = [k for k in new if not k.startswith("fc.") and "running_" not in k and "num_batches" not in k]
    assert backbone and all(torch.equal(new[k], source[k]) for k in backbone)
    assert not torch.equal(new["fc.weight"], source["fc.weight"])
    optimizer = torch.load(stage2 / "last" / "training_state" / "optimizer.bin", weights_only=True)
    steps = {int(state["step"]) for state in optimizer["state"].values()}
    assert steps == {meta["global_step"]} == {5}  # 20 training images / batch 4: this run's steps only
    groups = optimizer["param_groups"]  # the new run's lr, head only (weights with decay, bias without)
    assert [(g["name"], g["initial_lr"], g["weight_decay"]) for g in groups] == [("head", 1e-4, 0.05), ("head", 1e-4, 0.0)]


def test_each_epoch_reports_its_own_training_sums(uninterrupted):
    """train_loss, train_accuracy and images/s cover one epoch, not a running total since epoch 1."""
    _, whole = uninterrupted
    rows = [json.loads(line) for line in (whole / "history.jsonl").read_text().splitlines()]
    assert [row["train_samples"] for row in rows] == [20, 20]  # 25 photos: 20 train (5 batches of 4), 5 val


def test_two_ddp_ranks_stopped_mid_epoch_resume_to_the_weights_of_an_uninterrupted_two_rank_run(tmp_path):
    """accelerate launch with two real ranks (gloo), 22 images a rank in batches of 2: 11 steps an
    epoch, and ranks agree on a signal every 10 batches. SIGTERM to the launcher early in epoch 2
    stops both ranks at batch 10 of 11; a two-rank resume ends with exactly the weights, EMA and
    history of a two-rank run nobody interrupted."""
    data = make_dataset(tmp_path / "flowers", per_class=11)  # 44 train, 11 val
    recipe = (*TINY_TRAIN, *RECIPE, "--batch-size", "2")
    env = {"ACCELERATE_USE_CPU": "true"}
    out = tmp_path / "out"

    def launch(*args: str) -> list[str]:
        return [ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_ddp.yaml", "--main_process_port",
                str(free_port()), "train.py", "--data", str(data), "--output-dir", str(out), *args]

    run_cli(*launch(*recipe, "--run-name", "whole"), env=env, timeout=TIMEOUT)
    stopped = interrupt_mid_epoch(launch(*recipe, "--run-name", "cut", "--save-every-steps", "2"), out / "cut",
                                  global_step=12, env=env, timeout=TIMEOUT)
    assert "processes: 2" in stopped.stdout and stopped.returncode != 0
    k = _stopped_at_batch(stopped.stdout, epoch=2, batches=11)
    cut, whole = out / "cut", out / "whole"
    assert json.loads((cut / "last" / "checkpoint.json").read_text())["global_step"] == 11 + k

    resumed = run_cli(*launch("--resume", str(cut)), env=env, timeout=TIMEOUT)
    assert f"after epoch 1/2 and {k} batches of the next" in resumed.stdout and "processes: 2" in resumed.stdout
    for name in ("last", "best", "ema"):
        ours, theirs = load_file(str(cut / name / "model.safetensors")), load_file(str(whole / name / "model.safetensors"))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), f"{name}/ weights differ"
    for ours, theirs in zip(_history(cut), _history(whole), strict=True):
        assert ours == theirs, {key: (ours.get(key), theirs.get(key)) for key in ours.keys() | theirs.keys()
                                if ours.get(key) != theirs.get(key)}

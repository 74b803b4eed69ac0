"""Training options do what they say in real runs: gradient accumulation, mid-epoch saves,
early stopping (also across a resume), and the report's recipe from training to evaluation."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from conftest import REPO, TINY_TRAIN, interrupt_when, make_colour_dataset, make_dataset, read_history, run_cli
from flowers.config import TrainConfig
from flowers.data import collate
from flowers.engine import EpochOptions, train_one_epoch
from flowers.recipe import make_loss
from flowers.runtime import make_accelerator


def _train(data: Path, out: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return run_cli("python", "train.py", "--data", str(data), "--output-dir", str(out), *TINY_TRAIN, *extra, **kwargs)


def _meta(checkpoint_dir: Path) -> dict:
    return json.loads((checkpoint_dir / "checkpoint.json").read_text())


# ---- --grad-accum-steps ------------------------------------------------------------------------

def _linear_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights every time
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))  # no BatchNorm: it would see half batches differently


def _sgd_update(batches: list[tuple[torch.Tensor, torch.Tensor]], accum_steps: int) -> dict[str, torch.Tensor]:
    """Weights of the linear model after one pass of flowers' training loop over `batches` of
    3x2x2 "images" (SGD, lr 1, no momentum: the update is minus the gradient it applied)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = make_accelerator(seed=0, grad_accum_steps=accum_steps)
    model = _linear_model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    loader = [collate([{"pixel_values": image, "labels": int(label)} for image, label in zip(x, y)]) for x, y in batches]
    train_one_epoch(accelerator, model, loader, optimizer, None, make_loss(TrainConfig(label_smoothing=0.0)),
                    EpochOptions(channels_last=False))
    return {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}


def test_two_accumulated_half_batches_apply_the_full_batch_gradient():
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
    reference = _linear_model()  # the full batch's gradient by plain autograd
    F.cross_entropy(reference(x), y).backward()
    expected = {name: (p - p.grad).detach() for name, p in reference.named_parameters()}

    accumulated = _sgd_update([(x[:4], y[:4]), (x[4:], y[4:])], accum_steps=2)
    full = _sgd_update([(x, y)], accum_steps=1)
    for name in expected:
        torch.testing.assert_close(accumulated[name], expected[name])
        torch.testing.assert_close(full[name], expected[name])


@pytest.mark.slow
def test_grad_accum_steps_the_optimizer_and_schedule_once_per_two_batches(tmp_path):
    """40 training images in batches of 8: 5 batches an epoch, so ceil(5 / 2) = 3 optimizer and
    schedule steps an epoch (the odd last batch steps alone), 6 in 2 epochs; the cosine schedule
    spans those 6 steps, so epoch 2 starts at step 3 of 6: half the peak lr."""
    data = make_dataset(tmp_path / "flowers", per_class=10)  # 50 photos: 40 train, 10 val
    _train(data, tmp_path / "out", "--run-name", "r", "--epochs", "2", "--grad-accum-steps", "2",
           "--scheduler", "cosine", "--warmup-epochs", "0", "--lr", "1e-3")
    last = tmp_path / "out" / "r" / "last"
    assert _meta(last)["global_step"] == 6
    optimizer = torch.load(last / "training_state" / "optimizer.bin", weights_only=True)
    assert {int(state["step"]) for state in optimizer["state"].values()} == {6}
    schedule = torch.load(last / "training_state" / "custom_checkpoint_0.pkl", weights_only=True)
    assert schedule["last_epoch"] == 6  # stepped 6 times
    lrs = [row["lr"] for row in read_history(last.parent)]
    assert lrs == pytest.approx([1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 6))])


# ---- --save-every-steps ------------------------------------------------------------------------

@pytest.mark.slow
def test_save_every_steps_writes_a_resumable_last_mid_epoch(tmp_path):
    """With --save-every-steps 2, last/ appears after optimizer step 2 (or 4) of the first epoch
    (5 steps); the run is frozen and killed the moment it appears, so no end-of-epoch save can
    have replaced it, and a resume continues from exactly that step."""
    data = make_dataset(tmp_path / "flowers", per_class=10)  # 40 train images: 5 batches of 8
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", "--data", str(data), "--output-dir", str(out), "--run-name", "r",
           "--epochs", "1", "--save-every-steps", "2", *TINY_TRAIN]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "r" / "last" / "checkpoint.json"
    deadline = time.monotonic() + 900
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)  # a last/ folder appears whole (renamed into place)
    meta = json.loads(last.read_text())
    proc.kill()
    proc.wait()
    assert meta["epoch"] == 0, "last/ was not written before the end of the first epoch"
    assert meta["global_step"] in (2, 4)

    resumed = _train(data, out, "--resume", str(out / "r"))
    assert f"after epoch 0/1 and {meta['global_step']} batches of the next" in resumed.stdout
    assert _meta(out / "r" / "last")["global_step"] == 5


# ---- early stopping ----------------------------------------------------------------------------

PATIENCE = 2
EARLY = ("--epochs", "8", "--early-stopping-patience", str(PATIENCE), "--seed", "1", "--lr", "1e-3",
         "--warmup-epochs", "0")


def _stop_epoch(accuracies: list[float], patience: int) -> int | None:
    """The epoch at which `patience` epochs in a row brought no better accuracy (a tie is not better)."""
    best, stale = -1.0, 0
    for epoch, accuracy in enumerate(accuracies, 1):
        best, stale = (accuracy, 0) if accuracy > best else (best, stale + 1)
        if stale == patience:
            return epoch
    return None


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("colours") / "data")  # 43 train: 5 full batches of 8


@pytest.fixture(scope="module")
def early_run(colours, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A run that reaches 100% val accuracy early (colours) and so stops early."""
    out = tmp_path_factory.mktemp("early")
    return out / "whole", _train(colours, out, "--run-name", "whole", *EARLY)


@pytest.mark.slow
def test_early_stopping_ends_a_real_run_at_the_expected_epoch(early_run):
    run_dir, proc = early_run
    accuracies = [row["val_accuracy"] for row in read_history(run_dir)]
    stop = _stop_epoch(accuracies, PATIENCE)
    assert stop is not None and stop < 8, accuracies
    assert len(accuracies) == stop  # history ends at the stop
    assert f"early stopping: no better val_acc for {PATIENCE} epochs" in proc.stdout
    assert f"epoch {stop + 1}/8" not in proc.stdout
    assert _meta(run_dir / "last")["epoch"] == stop


@pytest.mark.slow
def test_early_stopping_patience_survives_a_resume(early_run, colours, tmp_path):
    """Interrupted in the epoch where the uninterrupted run stopped, after one epoch without
    improvement (patience counter 1 of 2), the resumed run must stop in that epoch too, not count
    patience afresh."""
    whole, _ = early_run
    accuracies = [row["val_accuracy"] for row in read_history(whole)]
    stop = _stop_epoch(accuracies, PATIENCE)
    assert stop is not None  # with patience 2, epoch stop - 1 brought no improvement: the counter stood at 1
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", "--data", str(colours), "--output-dir", str(out), "--run-name", "cut",
           *TINY_TRAIN, *EARLY]
    stopped = interrupt_when(cmd, f"epoch {stop - 1}/8")  # lands at the end of that epoch or in the next
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-2000:]
    assert re.search(rf"saved \S+ at (the end of epoch {stop - 1}|epoch {stop}, batch)", stopped.stdout)

    resumed = _train(colours, out, "--resume", str(out / "cut"))
    assert [row["val_accuracy"] for row in read_history(out / "cut")] == accuracies
    assert f"early stopping: no better val_acc for {PATIENCE} epochs" in resumed.stdout


# ---- --recipe report ---------------------------------------------------------------------------

@pytest.mark.slow
def test_recipe_report_trains_with_the_reports_optimizer_and_schedule_and_eval_reproduces_it(tmp_path):
    """The report's recipe: Adam at lr 1e-3, no weight decay, a step schedule (x0.1 every 7 epochs,
    so constant over 2 epochs), no label smoothing; explicit flags (batch 8) win."""
    data = make_dataset(tmp_path / "flowers")
    out = tmp_path / "out"
    _train(data, out, "--run-name", "r", "--epochs", "2", "--recipe", "report")
    run_dir = out / "r"
    config = _meta(run_dir / "last")["config"]
    assert (config["optimizer"], config["lr"], config["weight_decay"], config["scheduler"], config["step_size"],
            config["gamma"], config["label_smoothing"], config["batch_size"]) == \
        ("adam", 1e-3, 0.0, "step", 7, 0.1, 0.0, 8)
    optimizer = torch.load(run_dir / "last" / "training_state" / "optimizer.bin", weights_only=True)
    groups = optimizer["param_groups"]
    assert all(g["lr"] == 1e-3 and g["weight_decay"] == 0 and not g.get("decoupled_weight_decay") for g in groups)
    assert [row["lr"] for row in read_history(run_dir)] == [1e-3, 1e-3]

    evaluation = run_cli("python", "eval.py", "--ckpt", "best", "--output-dir", str(out), "--workers", "0")
    assert "matches the accuracy recorded" in evaluation.stdout
    results = json.loads((run_dir / "eval-best-val" / "results.json").read_text())["metrics"]
    best = _meta(run_dir / "best")
    assert results["accuracy"] == best["metrics"]["val_accuracy"]
    assert results["num_samples"] == 8

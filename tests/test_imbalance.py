"""Imbalanced folders: --class-weights and --sampler, observed through the Run that fit() trains
with (training.open_run), and data_wait, the share of an epoch spent waiting for batches."""

from __future__ import annotations

import csv
import json
import time
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState

from conftest import open_tiny_run, CLASSES, make_dataset, read_history
from flowers import balance, training
from flowers.config import TrainConfig, parse
from flowers.engine import EpochOptions, train_one_epoch
from flowers.resume import epoch_loader

BIG = CLASSES[0]


@pytest.fixture(scope="module")
def lopsided(tmp_path_factory):
    """40 photos: 20 of the first class, 5 of each other."""
    root = tmp_path_factory.mktemp("imbalance") / "flowers"
    make_dataset(root, per_class=20, classes=CLASSES[:1])
    return make_dataset(root, per_class=5, classes=CLASSES[1:])


@pytest.fixture(scope="module")
def presplit(tmp_path_factory):
    """train/ lopsided (12 of the first class, 3 of each other), val/ balanced (2 a class)."""
    root = tmp_path_factory.mktemp("presplit") / "flowers"
    make_dataset(root / "train", per_class=12, classes=CLASSES[:1])
    make_dataset(root / "train", per_class=3, classes=CLASSES[1:])
    make_dataset(root / "val", per_class=2)
    return root


@pytest.fixture
def open_run(lopsided, tmp_path):
    return lambda *args, data=None: open_tiny_run(data or lopsided, tmp_path / "out", *args)


def _train_labels(run: training.Run) -> list[int]:
    return balance.split_labels(run.splits.train)


def test_class_weights_auto_weights_the_loss_by_inverse_training_frequency(open_run):
    run = open_run("--class-weights", "auto", "--label-smoothing", "0.1")
    counts = Counter(_train_labels(run))
    inverse = torch.tensor([1.0 / counts[c] for c in range(5)])
    weights = inverse / inverse.mean()
    assert weights[0] < 0.5 < 1.1 < weights[1]  # the big class counts for less, the small ones for more
    logits, labels = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 4, 0])
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    assert torch.allclose(run.loss_fn(logits, labels), weights[labels] * smoothed, atol=1e-6)  # each example x w[y]
    soft = F.one_hot(labels, 5).float() * 0.7 + F.one_hot(labels.roll(1), 5).float() * 0.3  # a MixUp target
    soft_loss = F.cross_entropy(logits, soft, label_smoothing=0.1, reduction="none")
    assert torch.allclose(run.loss_fn(logits, soft), (soft @ weights) * soft_loss, atol=1e-5)  # x its mix of weights
    meta = run.checkpoint_meta({})["data"]
    assert meta["class_weights"] == pytest.approx(weights.tolist(), abs=1e-5) and meta["sampler"] == "random"
    assert run.checkpoint_meta({})["config"]["class_weights"] == "auto"

    plain = open_run()  # the default: no weights
    assert torch.allclose(plain.loss_fn(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.1,
                                                                         reduction="none"))
    assert plain.checkpoint_meta({})["data"]["class_weights"] is None


def test_class_weights_come_from_the_training_split_not_the_validation_split(open_run, presplit):
    run = open_run("--class-weights", "auto", data=presplit)
    assert run.loss_fn.weight.tolist() == pytest.approx([5 / 17] + [20 / 17] * 4)  # 1/12 and 1/3, to mean 1


def _epoch_rows(run: training.Run, epoch: int, skip: int = 0) -> list[tuple[int, torch.Tensor]]:
    """(label, pixels) of every training image the run's loader gives in `epoch` (0-based)."""
    rows = []
    for batch in epoch_loader(run.train_loader, epoch, skip):
        rows += list(zip(batch["labels"].tolist(), batch["pixel_values"]))
    return rows


@pytest.mark.parametrize("pipeline", ["workers", "device"])
def test_sampler_balanced_draws_every_class_equally_often_as_a_function_of_seed_and_epoch(open_run, pipeline):
    run = open_run("--sampler", "balanced", "--pipeline", pipeline)
    labels = _train_labels(run)
    epochs = [_epoch_rows(run, e) for e in range(3)]
    drawn = Counter(label for rows in epochs for label, _ in rows)
    assert labels.count(0) / len(labels) > 0.45  # the folder: half of the training photos are the first class
    assert drawn[0] / sum(drawn.values()) < 0.35  # balanced: about 1/5 of the draws
    assert [l for l, _ in epochs[0]] != [l for l, _ in epochs[1]]  # a new order each epoch
    again = _epoch_rows(run, 1)
    assert [l for l, _ in again] == [l for l, _ in epochs[1]]  # ... a function of (seed, epoch)
    resumed = _epoch_rows(run, 1, skip=2)  # resumed after 2 batches of 4: the same images, bit for bit
    assert len(resumed) == len(epochs[1]) - 8
    assert all(a == b and torch.equal(x, y) for (a, x), (b, y) in zip(resumed, epochs[1][8:]))
    assert run.checkpoint_meta({})["data"]["sampler"] == "balanced"

    shuffled = [label for label, _ in _epoch_rows(open_run("--pipeline", pipeline), 0)]  # the default
    assert shuffled.count(0) / len(shuffled) > 0.4  # the big class keeps its share


def test_sampler_balanced_gives_both_pipelines_the_same_order(open_run):
    workers = [l for l, _ in _epoch_rows(open_run("--sampler", "balanced", "--pipeline", "workers"), 2)]
    device = [l for l, _ in _epoch_rows(open_run("--sampler", "balanced", "--pipeline", "device"), 2)]
    assert workers == device


def test_balanced_order_is_seeded_by_seed_and_epoch_alone():
    labels = torch.tensor([0] * 30 + [1] * 3 + [2] * 3)
    order = balance.balanced_order(labels, 36, seed=5, epoch=1)
    assert torch.equal(order, balance.balanced_order(labels, 36, seed=5, epoch=1))
    assert not torch.equal(order, balance.balanced_order(labels, 36, seed=5, epoch=2))
    assert not torch.equal(order, balance.balanced_order(labels, 36, seed=6, epoch=1))
    many = Counter(labels[balance.balanced_order(labels, 3000, seed=1, epoch=0)].tolist())
    assert all(900 < many[c] < 1100 for c in range(3))
    assert not hasattr(balance.BalancedSampler, "set_epoch")  # Accelerate would drive it with its own counter


# ---- data_wait ----------------------------------------------------------------------------------

class _Pixels:
    """The device loader's pixels made once (every batch ready at once); the host's part of each
    batch (`plan`) takes `sleep` seconds."""

    def __init__(self, run: training.Run, sleep: float = 0.0):
        make = run.train_loader.make_pixels
        self.device, self.sleep = make.device, sleep
        rows = torch.arange(run.cfg.batch_size)
        self.cached = make(rows, rows, 0)

    def plan(self, rows, epoch):
        time.sleep(self.sleep)
        return torch.zeros(len(rows), 0)

    def apply(self, rows, device_rows, plan):
        return self.cached


def test_data_wait_is_near_0_with_ready_batches_and_near_1_with_a_sleeping_loader(open_run):
    """The run's own loader and training loop, with a model whose step takes a steady 50 ms (a
    real one's time depends on the machine's load): ready batches cost the loop next to nothing,
    a loader that sleeps 1 s a batch nearly all of it (4 batches of 8)."""
    run = open_run("--pipeline", "device", "--batch-size", "8")

    class SteadyModel(torch.nn.Sequential):
        def forward(self, images):
            time.sleep(0.05)
            return super().forward(images)

    model = SteadyModel(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def data_wait(pixels: _Pixels) -> float:
        run.train_loader.make_pixels = pixels
        return train_one_epoch(run.accelerator, model, run.train_loader.for_epoch(0), optimizer, None,
                               run.loss_fn, EpochOptions(channels_last=False)).data_wait
    ready, sleeping = _Pixels(run), _Pixels(run, sleep=1.0)
    assert data_wait(ready) < 0.2
    assert data_wait(sleeping) > 0.8


def test_data_wait_is_in_the_epoch_line_history_and_summary(lopsided, tmp_path, capsys):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = parse(TrainConfig, ["--data", str(lopsided), "--output-dir", str(tmp_path), "--run-name", "r",
                              "--weights", "none", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
                              "--report-to", "none", "--workers", "0", "--sampler", "balanced",
                              "--class-weights", "auto"])
    run_dir = training.fit(cfg)
    out = capsys.readouterr().out
    assert "data_wait " in next(line for line in out.splitlines() if line.startswith("epoch 1/1"))
    assert "--class-weights auto or --sampler balanced" in out  # the imbalance warning names them
    assert 0 <= read_history(run_dir)[0]["data_wait"] <= 1
    with open(run_dir / "summary.csv", newline="") as f:
        assert 0 <= float(next(csv.DictReader(f))["data_wait"]) <= 1
    meta = json.loads((run_dir / "last" / "checkpoint.json").read_text())
    assert meta["data"]["sampler"] == "balanced" and len(meta["data"]["class_weights"]) == 5

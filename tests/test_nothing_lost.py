"""Nothing lost, nothing misreported: the accumulation tail's update, the EMA judged by its own
accuracy in its own precision, MixUp beside an image that did not decode, and copies to devices
that do not take non-blocking copies of temporaries."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from torch.utils.data import DataLoader

from conftest import TINY_TRAIN, make_dataset, read_history, run_cli
from flowers.config import TrainConfig
from flowers.data import collate
from flowers.engine import EpochOptions, evaluate, train_one_epoch
from flowers.recipe import make_batch_transform, make_loss
from flowers.runtime import make_accelerator
from flowers.transforms import upload


def _fresh_accelerator(**kwargs):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return make_accelerator(seed=0, **kwargs)


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))  # no BatchNorm: it sees each batch on its own


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[dict]:
    return [collate([{"pixel_values": image, "labels": int(label)} for image, label in zip(x[i:i + size], y[i:i + size])])
            for i in range(0, len(x), size)]


# ---- --grad-accum-steps: the epoch's last, short cycle ---------------------------------------------

def test_the_short_last_accumulation_cycle_applies_the_mean_gradient_of_its_batches():
    """3 batches of 4 with --grad-accum-steps 2: the first update is the mean gradient of batches 1-2,
    the second (the epoch's tail, one batch) the mean gradient of batch 3 alone, as plain autograd
    computes them (SGD, lr 1: the update is minus the gradient)."""
    torch.manual_seed(1)
    x, y = torch.randn(12, 3, 2, 2), torch.randint(0, 3, (12,))
    reference = _linear_model()
    for images, labels in ((x[:8], y[:8]), (x[8:], y[8:])):
        reference.zero_grad()
        F.cross_entropy(reference(images), labels).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= p.grad

    accelerator = _fresh_accelerator(grad_accum_steps=2)
    model = _linear_model()
    # a prepared DataLoader, as training has: it tells Accelerate where the epoch ends
    loader = DataLoader(_batches(x, y, 4), batch_size=None, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0), loader)
    steps = []
    train_one_epoch(accelerator, model, loader, optimizer, None, make_loss(TrainConfig(label_smoothing=0.0)),
                    EpochOptions(channels_last=False, on_step=lambda step, stepped: steps.append(stepped) and False))
    assert steps == [False, True, True]
    trained = accelerator.unwrap_model(model)
    for (name, expected), got in zip(reference.named_parameters(), trained.parameters()):
        torch.testing.assert_close(got, expected, msg=name)


# ---- MixUp/CutMix beside an image that did not decode ----------------------------------------------

@pytest.mark.parametrize("option", ["--mixup", "--cutmix"])
def test_mixed_targets_never_name_the_label_of_an_image_that_did_not_decode(option):
    """Slot 1 did not decode: collate fills it with slot 0's pixels, under its own label (class 4,
    which no image of the batch shows). Mixed into a neighbour, that label would become part of a
    target whose pixels hold no such image."""
    cfg = TrainConfig(**{option.lstrip("-"): 1.0}, label_smoothing=0.0)
    images = [torch.full((3, 4, 4), float(i)) for i in range(6)]
    examples = [{"pixel_values": None if i == 1 else image, "labels": 4 if i == 1 else i % 3}
                for i, image in enumerate(images)]
    batch = collate(examples)
    targets_seen = []
    loss = make_loss(cfg)

    def recording_loss(logits, targets):
        targets_seen.append(targets.detach().clone())
        return loss(logits, targets)

    accelerator = _fresh_accelerator()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for seed in range(5):  # several draws of the mix (CutMix's box, MixUp's weight)
        torch.manual_seed(seed)
        train_one_epoch(accelerator, model, [batch], optimizer, None, recording_loss,
                        EpochOptions(channels_last=False, batch_transform=make_batch_transform(cfg, 5)))
    assert len(targets_seen) == 5
    for targets in targets_seen:
        assert targets.shape == (6, 5)
        assert torch.all(targets[:, 4] == 0), targets


# ---- the EMA: its own accuracy, its own precision ---------------------------------------------------

def test_the_ema_is_validated_under_the_launch_mixed_precision():
    """Validation runs the EMA's module (never prepared by Accelerate) under the same autocast as
    the prepared model: the same weights give the same logits (bf16 here, on the CPU)."""
    accelerator = _fresh_accelerator(mixed_precision="bf16")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    plain = copy.deepcopy(model)
    prepared = accelerator.prepare(model)
    torch.manual_seed(1)
    loader = _batches(torch.randn(10, 3, 8, 8), torch.randint(0, 3, (10,)), 5)
    with_autocast = evaluate(accelerator, prepared, loader, channels_last=False)
    plain_module = evaluate(accelerator, plain, loader, channels_last=False)
    assert (with_autocast.scores == plain_module.scores).all()
    with torch.inference_mode():  # and they are bf16's logits, not fp32's
        fp32 = torch.cat([plain(b["pixel_values"]) for b in loader]).numpy()
    assert not (fp32 == plain_module.scores).all()


@pytest.mark.slow  # the fast loop's end-to-end run checks ema/'s recorded accuracy
def test_ema_checkpoint_records_its_own_accuracy_and_evaluates_as_recorded(tmp_path):
    """The review's run (8 photos a class, half held out, batch 4): ema/ records the EMA weights'
    validation accuracy (history's ema_val_accuracy of its epoch), not the raw model's, and
    eval.py finds that accuracy."""
    data = make_dataset(tmp_path / "flowers", per_class=8)
    out = tmp_path / "out"
    run_cli("python", "train.py", "--data", str(data), "--output-dir", str(out), "--run-name", "r", *TINY_TRAIN,
            "--ema-decay", "0.9", "--val-split", "0.5", "--batch-size", "4", "--seed", "1", "--epochs", "3")
    history = read_history(out / "r")
    ema_meta = json.loads((out / "r" / "ema" / "checkpoint.json").read_text())
    row = next(r for r in history if r["epoch"] == ema_meta["epoch"])
    assert ema_meta["metrics"]["val_accuracy"] == row["ema_val_accuracy"]
    assert ema_meta["metrics"]["val_accuracy"] == max(r["ema_val_accuracy"] for r in history)
    assert ema_meta["metrics"]["weights"] == "ema"
    best_meta = json.loads((out / "r" / "best" / "checkpoint.json").read_text())
    assert best_meta["metrics"]["val_accuracy"] == max(r["val_accuracy"] for r in history)
    evaluated = run_cli("python", "eval.py", "--ckpt", str(out / "r" / "ema"), "--workers", "0")
    assert "matches the accuracy recorded at training time" in evaluated.stdout, evaluated.stdout


# ---- copies to the device ----------------------------------------------------------------------

def test_copies_to_devices_other_than_cuda_are_blocking():
    """Non-blocking copies of temporaries are for CUDA (from pinned memory) only: on MPS they can
    deliver garbage (PyTorch #139550, #189690). The batches Accelerate moves follow the same rule."""
    calls = []

    class RecordTo(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to:
                calls.append(dict(kwargs or {}))
            return func(*args, **(kwargs or {}))

    with RecordTo():
        upload(torch.arange(4), torch.device("meta"))
    assert calls and not any(call.get("non_blocking") for call in calls), calls
    accelerator = _fresh_accelerator()
    assert accelerator.dataloader_config.non_blocking is torch.cuda.is_available()

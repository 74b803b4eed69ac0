"""Bugs a code review of c880512 found (issue 14): each test here failed on that commit."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage
from safetensors.torch import save_file

from conftest import CLASSES, REPO, TINY_TRAIN, make_dataset, run_cli
from flowers import checkpoint, data, loading
from flowers.config import TrainConfig
from flowers.datacheck import duplicate_groups
from flowers.errors import UserError
from flowers.imagefiles import load_rgb
from flowers.loading import initial_state, load_state_dict_file
from flowers.model import build_model, load_model_weights
from flowers.transforms import draws_for_epoch, train_transform


# ---- 1. Python 3.10: no hashlib.file_digest ---------------------------------------------------------

def test_duplicate_check_hashes_files_without_python_311s_file_digest(tmp_path, monkeypatch):
    monkeypatch.delattr(hashlib, "file_digest", raising=False)  # as on Python 3.10
    for name, colour in (("a.ppm", (255, 0, 0)), ("b.ppm", (255, 0, 0)), ("c.ppm", (0, 0, 255))):
        PILImage.new("RGB", (8, 8), colour).save(tmp_path / name)
    assert (tmp_path / "a.ppm").stat().st_size == (tmp_path / "c.ppm").stat().st_size  # so both get hashed
    ds = Dataset.from_dict({"image": [str(tmp_path / n) for n in ("a.ppm", "b.ppm", "c.ppm")], "label": [0, 1, 1]},
                           features=Features({"image": Image(), "label": ClassLabel(names=["x", "y"])}))
    assert duplicate_groups([ds]) == [[("a.ppm", 0), ("b.ppm", 1)]]


# ---- 2. large seeds ---------------------------------------------------------------------------

def _augmented(seed: int, epoch: int, index: int, images: Dataset) -> torch.Tensor:
    augmentation = data.SeededAugmentation(images, train_transform(32), seed)
    augmentation.epoch = epoch
    return augmentation[index]["pixel_values"]


def _drawn_with(draws, images: Dataset, index: int) -> torch.Tensor:
    """What the training transform gives with this row of draws."""
    entry = images.cast_column("image", Image(decode=False))[index]["image"]
    return train_transform(32)(load_rgb(entry), draws=draws)


def test_large_seeds_augment_and_each_image_draws_its_row_of_the_epoch(tmp_path):
    images, _ = data.full_dataset(str(make_dataset(tmp_path / "flowers", per_class=1)))
    for seed, epoch, index in ((42, 5, 3), (1_844_666, 2, 4), (2**32 - 1, 3, 2)):  # 1_844_666: once "Overflow"
        out = _augmented(seed, epoch, index, images)
        assert out.shape == (3, 32, 32)
        # the device pipeline draws the whole epoch at once: image `index` takes its row
        assert torch.equal(out, _drawn_with(draws_for_epoch(seed, epoch, 5)[[index]], images, index))
        assert not torch.equal(out, _drawn_with(draws_for_epoch(seed, epoch + 1, 5)[[index]], images, index))


@pytest.mark.slow
def test_the_largest_accepted_seed_trains(flower_dir, tmp_path):
    out = tmp_path / "out"
    run_cli("python", "train.py", "--data", str(flower_dir), "--output-dir", str(out), "--run-name", "big-seed",
            "--epochs", "1", "--seed", str(2**32 - 1), *TINY_TRAIN)
    assert checkpoint.load_meta(out / "big-seed" / "best")["data"]["split_seed"] == 2**32 - 1


# ---- 7. a Hub dataset's own validation split ------------------------------------------------------

def _png(index: int, label: int) -> dict:
    buffer = io.BytesIO()
    colour = [40 + (index * 13) % 60] * 3
    colour[label] = 200  # class = the dominant channel
    PILImage.new("RGB", (40, 40), tuple(colour)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _hub_copy(root: Path, splits: dict[str, int]) -> Path:
    """A local copy of a Hub dataset as the Hub stores it: data/<split>-00000-of-00001.parquet, with
    Hub-style column names (img, fine_label); `splits` maps split names to images per class."""
    features = Features({"img": Image(), "fine_label": ClassLabel(names=["red", "green", "blue"])})
    (root / "data").mkdir(parents=True)
    start = 0
    for split, per_class in splits.items():
        rows = [(start + i, label) for label in range(3) for i in range(per_class)]
        start += per_class
        Dataset.from_dict({"img": [_png(i, label) for i, label in rows], "fine_label": [label for _, label in rows]},
                          features=features).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.mark.slow
def test_a_hub_datasets_validation_split_is_used_recorded_and_rebuilt_by_eval(tmp_path):
    repo = _hub_copy(tmp_path / "hub-copy", {"train": 6, "validation": 2, "test": 3})
    splits = data.load_splits(str(repo), 0.2, seed=0)
    assert (splits.val_from, len(splits.train), len(splits.val)) == ("validation", 18, 6)
    assert splits.class_names == ["red", "green", "blue"]
    # a checkpoint saved before val_from was recorded: train was split, and eval must split it the same way
    old_style = data.load_splits(str(repo), 0.2, seed=0, val_from=None)
    assert (old_style.val_from, len(old_style.train), len(old_style.val)) == (None, 14, 4)

    out = tmp_path / "out"
    run_cli("python", "train.py", "--data", str(repo), "--output-dir", str(out), "--run-name", "hub", "--epochs", "1",
            *TINY_TRAIN)
    meta = checkpoint.load_meta(out / "hub" / "best")
    assert meta["data"]["val_from"] == "validation" and meta["data"]["val_size"] == 6
    proc = run_cli("python", "eval.py", "--ckpt", "best", "--output-dir", str(out), "--workers", "0")
    assert "matches the accuracy recorded at training time" in proc.stdout, proc.stdout
    results = json.loads((out / "hub" / "eval-best-val" / "results.json").read_text())
    assert results["metrics"]["num_samples"] == 6


def test_a_test_split_is_never_used_for_model_selection(tmp_path):
    repo = _hub_copy(tmp_path / "hub-copy", {"train": 5, "test": 4})
    splits = data.load_splits(str(repo), 0.2, seed=0)
    assert (splits.val_from, len(splits.train), len(splits.val)) == (None, 12, 3)  # held out of train


# ---- 10. reading a checkpoint while a trainer saves it --------------------------------------------

def _meta(epoch: int) -> dict:
    return {"num_classes": 4, "class_names": list("abcd"), "config": {}, "epoch": epoch}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_resolving_between_a_saves_two_renames_changes_nothing_and_the_save_succeeds(tmp_path, monkeypatch):
    out = tmp_path / "outputs"
    state = build_model(4, "none").state_dict()
    best = checkpoint.save_checkpoint(out / "run" / "best", state, _meta(epoch=1))

    # the in-between state: best/ renamed to best.old/, the new best/ not yet in place
    best.rename(best.with_name("best.old"))
    before = _listing(out)
    for ckpt in ("best", str(out / "run"), str(best)):
        found = checkpoint.resolve(ckpt, str(out))
        assert found == best.with_name("best.old") and loading.load_model(found)[1]["epoch"] == 1
    assert _listing(out) == before  # eval.py, predict and export only read
    best.with_name("best.old").rename(best)

    # an eval resolving `best` exactly between the trainer's two renames
    real_rename, seen = os.rename, []

    def rename_then_eval(src, dst):
        real_rename(src, dst)
        if str(dst).endswith("best.old"):
            seen.append(checkpoint.resolve("best", str(out)))
    monkeypatch.setattr(os, "rename", rename_then_eval)
    checkpoint.save_checkpoint(best, state, _meta(epoch=2))
    assert seen == [best.with_name("best.old")]
    assert checkpoint.load_meta(checkpoint.resolve("best", str(out)))["epoch"] == 2
    assert sorted(p.name for p in (out / "run").iterdir()) == ["best"]


# ---- 11. smaller ones -------------------------------------------------------------------------------

def test_weights_from_a_dropout_checkpoint_keep_their_head(tmp_path):
    trained = build_model(5, "none", dropout=0.3)
    save_file(trained.state_dict(), str(tmp_path / "dropout.safetensors"))
    plain = build_model(5, initial_state(str(tmp_path / "dropout.safetensors")))
    assert torch.equal(plain.fc.weight, trained.fc[1].weight) and torch.equal(plain.fc.bias, trained.fc[1].bias)
    save_file(plain.state_dict(), str(tmp_path / "plain.safetensors"))  # and the other way round
    with_dropout = build_model(5, initial_state(str(tmp_path / "plain.safetensors")), dropout=0.3)
    assert torch.equal(with_dropout.fc[1].weight, plain.fc.weight)


def test_weights_that_do_not_fit_are_described_in_one_sentence():
    from torchvision.models import resnet34

    model = build_model(5, "none")
    with pytest.raises(UserError) as deeper:
        load_model_weights(model, resnet34().state_dict(), source="w.pth")
    message = str(deeper.value)
    assert "\n" not in message and len(message) < 400, message  # c880512: one 'line' of 3,000+ characters
    assert re.search(r"\b96 unexpected keys \(e\.g\. layer1\.2\.", message), message
    assert "2 of another shape (e.g. fc.weight [1000, 512] instead of [5, 512]" in message
    assert "likely cause: weights of another architecture than resnet18" in message

    other_classes = {**model.state_dict(), "fc.weight": torch.zeros(3, 512), "fc.bias": torch.zeros(3)}
    with pytest.raises(UserError, match="likely cause: trained for another number of classes"):
        load_model_weights(model, other_classes)


@pytest.mark.slow
def test_resume_works_after_the_original_weights_and_init_from_moved(tmp_path):
    """Resuming restores the weights from last/ and reads neither --weights nor --init-from."""
    weights, start = tmp_path / "start.pth", tmp_path / "start-ckpt"
    torch.save(build_model(5, "none").state_dict(), weights)
    checkpoint.save_checkpoint(start, build_model(5, "none").state_dict(),
                               {"num_classes": 5, "class_names": CLASSES, "config": {}})
    data_dir, out = make_dataset(tmp_path / "flowers", per_class=5), tmp_path / "out"
    cmd = [sys.executable, "train.py", "--data", str(data_dir), "--output-dir", str(out), "--run-name", "cut",
           "--epochs", "2", *TINY_TRAIN, "--batch-size", "4", "--weights", str(weights), "--init-from", str(start)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 1/2  train_loss"):
            proc.send_signal(signal.SIGTERM)  # stops in epoch 2 with a resumable last/
            break
    assert "Resume with" in proc.stdout.read()
    proc.wait(timeout=600)
    assert checkpoint.load_meta(out / "cut" / "last")["epoch"] == 1
    shutil.move(weights, tmp_path / "elsewhere.pth")
    shutil.move(start, tmp_path / "elsewhere-ckpt")

    resumed = run_cli("python", "train.py", "--resume", str(out / "cut"))
    assert "resuming" in resumed.stdout
    resumed_meta = checkpoint.load_meta(out / "cut" / "last")
    assert resumed_meta["epoch"] == 2 and resumed_meta["init_from"]["path"] == str(start.resolve())  # still said
    assert TrainConfig(resume=str(out / "cut"), weights=str(weights)).weights == str(weights)  # not checked


def test_cpu_training_gets_one_worker_per_two_cores_beyond_two(monkeypatch):
    for cores, expected in ((2, 1), (8, 4), (32, 16), (64, 16)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert data.default_workers(1, "cpu") == expected, cores
    assert data.default_workers(2, "cpu") == 16  # 64 cores, 2 processes


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_of_compiled_and_ddp_wrapped_models_load(tmp_path, prefix, suffix):
    model = build_model(5, "none")
    wrapped = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / f"wrapped{suffix}"
    save_file(wrapped, str(path)) if suffix == ".safetensors" else torch.save(wrapped, path)
    assert set(load_state_dict_file(str(path))) == set(model.state_dict())
    loaded = build_model(5, initial_state(str(path)))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

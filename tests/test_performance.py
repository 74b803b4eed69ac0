"""Speed features keep behaviour: the resized-image cache, the one-pass colour jitter, the benchmarks."""

from __future__ import annotations

import json
import os
import sys
import time

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Image
from PIL import Image as PILImage

from conftest import REPO, TINY_TRAIN, run_cli
from flowers.data import WORKER_NICE, LoaderOptions, SeededAugmentation, image_paths, load_splits, make_loader, resized_splits
from flowers.imagefiles import load_rgb
from flowers.transforms import ColorJitterMatrix, ToNormalisedTensor, eval_size, eval_transform, train_transform


def test_cache_resized_keeps_eval_pixels_and_is_reused(flower_dir):
    splits = load_splits(str(flower_dir), 0.2, seed=0)
    short_side = eval_size(64)
    cached = resized_splits(splits, short_side)

    assert len(cached.train) == len(splits.train) and cached.val["label"] == splits.val["label"]
    assert all(min(img.size) <= short_side for img in cached.train["image"])
    transform = eval_transform(64)
    originals = splits.val.cast_column("image", Image(decode=False))["image"]
    for entry, small in zip(originals, cached.val["image"]):
        assert torch.equal(transform(load_rgb(entry)), transform(small))

    cache_file = Path(cached.train.cache_files[0]["filename"])
    written = cache_file.stat().st_mtime_ns
    again = resized_splits(load_splits(str(flower_dir), 0.2, seed=0), short_side)
    assert again.train.cache_files[0]["filename"] == str(cache_file)
    assert cache_file.stat().st_mtime_ns == written  # read back, not rebuilt
    other_size = resized_splits(splits, eval_size(32))
    assert other_size.train.cache_files[0]["filename"] != str(cache_file)


def test_cache_resized_follows_photos_edited_in_place_and_not_the_folders_spelling(flower_dir):
    short_side = eval_size(64)
    splits = load_splits(str(flower_dir), 0.2, seed=0)
    first = resized_splits(splits, short_side)
    same_folder = load_splits(str(flower_dir / ".." / flower_dir.name), 0.2, seed=0)
    assert resized_splits(same_folder, short_side).val.cache_files == first.val.cache_files

    edited = image_paths(splits.val)[0]  # replaced by another picture under the same name
    os.unlink(edited)  # the photos are symlinks to the shared data set: never write through them
    PILImage.new("RGB", (60, 50), (200, 30, 90)).save(edited, format="JPEG")
    stat = os.stat(edited)
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # even on a coarse clock
    again = resized_splits(load_splits(str(flower_dir), 0.2, seed=0), short_side)
    assert again.val.cache_files != first.val.cache_files
    transform = eval_transform(64)
    expected = transform(load_rgb({"path": edited, "bytes": None}))
    assert torch.equal(transform(again.val[0]["image"]), expected)
    assert not torch.equal(transform(first.val[0]["image"]), expected)


def _photo(size=(48, 40)) -> PILImage.Image:
    rng = np.random.default_rng(0)
    return PILImage.fromarray(rng.integers(30, 220, (size[1], size[0], 3), dtype=np.uint8))


def test_color_jitter_matrix_is_identity_without_jitter_and_varies_with_it():
    img = _photo()
    assert np.array_equal(np.asarray(ColorJitterMatrix(0, 0, 0, 0)(img)), np.asarray(img))

    torch.manual_seed(0)
    brighter_or_darker = np.asarray(ColorJitterMatrix(0.2, 0, 0, 0)(img)).astype(float)
    ratio = brighter_or_darker.sum() / np.asarray(img).astype(float).sum()
    assert 0.79 <= ratio <= 1.21 and abs(ratio - 1) > 1e-3

    grey = PILImage.new("RGB", (16, 16), (120, 120, 120))  # hue and saturation leave grey alone
    assert np.array_equal(np.asarray(ColorJitterMatrix(0, 0, 0.2, 0.05)(grey)), np.asarray(grey))

    jittered = {ColorJitterMatrix(0.2, 0.2, 0.2, 0.05)(img).tobytes() for _ in range(5)}
    assert len(jittered) == 5


def test_one_pass_normalisation_matches_torchvision():
    """ToNormalisedTensor gives the values of v2.ToImage + ToDtype + Normalize, for any image mode."""
    from torchvision.transforms import v2
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    reference = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    rgb = PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    ours = ToNormalisedTensor(mean, std)
    for img in (rgb, rgb.convert("L"), rgb.crop((0, 0, 7, 5))):  # also a smaller image after a larger one
        out = ours(img)
        assert out.shape == (3, img.height, img.width) and out.dtype == torch.float32
        assert torch.allclose(out, reference(img.convert("RGB")), atol=1e-5)


@pytest.mark.slow
def test_train_with_cache_resized(flower_dir, tmp_path):
    proc = run_cli("python", "train.py", "--data", str(flower_dir), "--epochs", "1", "--cache-resized",
                   "--output-dir", str(tmp_path / "out"), *TINY_TRAIN)
    assert "caching images at short side 37" in proc.stderr
    assert len(list((tmp_path / "out").glob("*/best/model.safetensors"))) == 1


@pytest.mark.slow
def test_throughput_bench_prints_ratios_and_the_plain_recipe(flower_dir, tmp_path):
    report = tmp_path / "bench.json"
    started = time.monotonic()
    proc = run_cli(sys.executable, str(REPO / "bench" / "throughput.py"), "--data", str(flower_dir),
                   "--image-size", "32", "--batch-size", "8", "--model-steps", "3", "--workers", "1",
                   "--json", str(report))
    wall = time.monotonic() - started
    for line in ("startup to first training step", "first step done at", "`accelerate launch` adds", "b/a",
                 "c/model-only", "ours (b) / plain", "peak memory"):
        assert line in proc.stdout
    results = json.loads(report.read_text())
    # 32 training images, batches of 8: the first step is start-up, the other 3 are measured, one per round
    assert results["train_images"] == 32 and results["train_steps"] == 3
    assert len(results["train_rounds_b_over_a"]) == 3 and len(results["plain_rounds"]) == 3
    # Each speed is 24 images (3 steps of 8) over the seconds they took inside this command: together
    # less than the command's wall time; and no faster than a CPU can train ResNet18 at 32 px
    # (~1 GFLOP a step of 8: well under 1,000 images/s per core).
    rates = [results[key] for key in ("train_end_to_end", "train_model_only", "plain")]
    assert sum(24 / rate for rate in rates) < wall, (rates, wall)
    assert all(rate < 1000 * os.cpu_count() for rate in rates), rates
    # one start-up, in order, within the command; the printed ratio is that of the two speeds
    assert 0 < results["imports_s"] < results["setup_s"] < results["startup_to_first_step_s"] \
        < results["first_step_done_s"] < wall
    assert f"b/a {results['train_end_to_end'] / results['train_model_only']:.3f}" in proc.stdout
    assert 0 < results["launcher_overhead_s"] < wall


def test_persistent_workers_see_each_epochs_augmentation(flower_dir):
    """Training workers live across epochs; the epoch set before each one still reaches them, so
    two worker processes draw exactly the augmentations of the main process, epoch by epoch."""
    train = load_splits(str(flower_dir), 0.2, seed=0).train

    def epochs(workers: int) -> list[torch.Tensor]:
        loader = make_loader(SeededAugmentation(train, train_transform(32), seed=3), batch_size=8, shuffle=False,
                             options=LoaderOptions(workers=workers, device_type="cpu", image_size=32, seed=3))
        images = []
        for epoch in range(3):
            loader.dataset.epoch = epoch  # as resume.epoch_loader does before every epoch
            images.append(torch.cat([batch["pixel_values"] for batch in loader]))
        return images

    in_process, in_workers = epochs(0), epochs(2)
    for a, b in zip(in_process, in_workers):
        assert torch.equal(a, b)
    assert not torch.equal(in_workers[0], in_workers[1]) and not torch.equal(in_workers[1], in_workers[2])


class _WorkerNiceness(torch.utils.data.Dataset):
    """Each example is the niceness of the process that loads it, as a 1x1 image."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": torch.full((1, 1, 1), os.nice(0)), "labels": index}


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")  # no GPU here
def test_cpu_training_workers_yield_the_cores_to_the_model():
    """Training on the CPU, loader workers run at the lowest priority, so they decode in the gaps
    the model's threads leave instead of preempting them; for a GPU they keep normal priority."""
    base = os.nice(0)
    for device_type, expected in (("cpu", min(19, base + WORKER_NICE)), ("cuda", base), ("mps", base)):
        loader = make_loader(_WorkerNiceness(), batch_size=2, shuffle=False,
                             options=LoaderOptions(workers=1, device_type=device_type, image_size=1))
        assert [int(n) for batch in loader for n in batch["pixel_values"].flatten()] == [expected] * 4

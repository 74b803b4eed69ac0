"""--pipeline device: decoded images on the training device, batches augmented there (device_data.py,
transforms.BatchAugmentation), checked against the PIL executor and the DataLoader path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage
from safetensors.torch import load_file
from torchvision.transforms import v2

from conftest import (ACCELERATE, TINY_TRAIN, free_port, interrupt_mid_epoch, make_dataset, patched_entry_script,
                      read_history, run_cli)
from flowers import device_data as dd
from flowers import transforms as T
from flowers.data import load_splits, resized_splits, with_transform

STD_255 = torch.tensor(T.IMAGENET_STD)[:, None, None] * 255  # normalised differences back to 0-255 levels


def _photo(width: int, height: int, seed: int) -> PILImage.Image:
    """A smooth random photo (an 8x smaller noise image scaled up): edges and gradients like a real one."""
    small = np.random.default_rng(seed).integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    return PILImage.fromarray(small).resize((width, height), PILImage.BICUBIC)


def _dataset(images: list[PILImage.Image], tmp_path: Path) -> Dataset:
    paths = []
    for i, img in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    return Dataset.from_dict({"image": paths, "label": [i % 2 for i in range(len(images))]},
                             features=Features({"image": Image(), "label": ClassLabel(names=["a", "b"])}))


SIZE = 64
SHORT = T.eval_size(SIZE)
# landscape, portrait (stored lying down), square and 2:1 photos, as data.resized_copy stores them
SHAPES = [(SHORT * 3 // 2, SHORT), (SHORT, SHORT * 3 // 2), (SHORT, SHORT), (2 * SHORT, SHORT)]


def test_each_image_of_a_batch_gets_its_own_draw_and_the_draws_follow_seed_and_epoch(tmp_path):
    images = dd.decode_training_images(_dataset([_photo(*SHAPES[0], seed=0)] * 8, tmp_path), SIZE)
    pixels = dd.TrainPixels(images, SIZE, seed=5, device=torch.device("cpu"))
    rows = torch.arange(8)
    batch = pixels(rows, rows, epoch=0)
    assert batch.shape == (8, 3, SIZE, SIZE) and batch.dtype == torch.float32
    flat = batch.flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 8  # one photo, eight different augmentations
    assert torch.equal(batch, pixels(rows, rows, epoch=0))  # a function of (seed, epoch, image)
    assert not torch.equal(batch, pixels(rows, rows, epoch=1))
    # the same image in another batch position, or alone, draws the same
    assert torch.equal(pixels(rows[[3]], rows[[3]], epoch=0), batch[[3]])


def _interior(params: T.AugmentParams, size: int, inside: bool = True) -> torch.Tensor:
    """Pixels at least 2 pixels away from the edge of the black fill the affine warp leaves outside
    the crop: on the crop's side (inside) or on the fill's."""
    inverse, _ = T._warp_matrices(params, size)
    normalised = T._normalised_coords(size, size)
    theta = torch.from_numpy((normalised @ inverse @ np.linalg.inv(normalised))[:, :2])
    in_crop = F.affine_grid(theta.float(), [len(params), 1, size, size], align_corners=False).abs().amax(-1) <= 1
    side = (in_crop if inside else ~in_crop)[:, None].float()
    return -F.max_pool2d(-side, 5, stride=1, padding=2)[:, 0] > 0.5


def _difference(photos: list, images: dd.DecodedImages, params: T.AugmentParams) -> torch.Tensor:
    """|device executor - PIL executor| on the 0-255 scale, (N, 3, SIZE, SIZE)."""
    device = T.BatchAugmentation(SIZE)(images.pixels, images.transposed, params)
    pil = torch.stack([T.ToNormalisedTensor()(T.augment_pil(p, params[i], SIZE)) for i, p in enumerate(photos)])
    return ((device - pil) * STD_255).abs()


def _params(photos: list, seed: int = 1) -> T.AugmentParams:
    widths, heights = [p.width for p in photos], [p.height for p in photos]
    return T.sample_augmentation(T.draws_for_epoch(seed, 0, len(photos)), widths, heights, SIZE)


def test_device_executor_matches_the_pil_executor_for_the_same_draws(tmp_path):
    """Tolerance, on the 0-255 scale, per image, at least 2 pixels away from the edge between the
    crop and the black fill the warp leaves around it:
    - crop, flip and colour jitter (no rotation or affine): a mean absolute difference under 1
      level (bilinear sampling vs PIL's antialiased resize; PIL rounds to uint8 between steps);
    - everything: a mean under 5 levels and a median under 4. PIL's warp samples the nearest
      pixel (torchvision's RandomAffine default), up to half a pixel from where bilinear samples;
    - in the fill (black, then colour-jittered on both paths): a mean under 1 level.
    A wrong crop, flip, angle or colour step gives tens of levels."""
    photos = [_photo(*SHAPES[i % 4], seed=i) for i in range(16)]
    images = dd.decode_training_images(_dataset(photos, tmp_path), SIZE)
    assert images.transposed.tolist() == [False, True, False, False] * 4
    params = _params(photos)
    assert set(params.flip.tolist()) == {True, False}
    difference = _difference(photos, images, params)
    crop, fill = _interior(params, SIZE), _interior(params, SIZE, inside=False)
    assert fill.any()
    for i in range(len(photos)):
        inside = difference[i][:, crop[i]]
        assert inside.numel() > 0.3 * 3 * SIZE * SIZE
        assert inside.mean() < 5 and inside.median() < 4, (i, SHAPES[i % 4], params[i], inside.mean(), inside.median())
        assert not fill[i].any() or difference[i][:, fill[i]].mean() < 1, (i, params[i])
    no_warp = params.replace(angle=0.0, translate=0, scale=1.0)
    difference = _difference(photos, images, no_warp)
    crop = _interior(no_warp, SIZE)
    for i in range(len(photos)):
        assert difference[i][:, crop[i]].mean() < 1, (i, SHAPES[i % 4], no_warp[i])
    # the same comparison notices a mistake: the flip left out of one executor
    unflipped = no_warp.replace(flip=~no_warp.flip)
    device = T.BatchAugmentation(SIZE)(images.pixels, images.transposed, unflipped)
    pil = torch.stack([T.ToNormalisedTensor()(T.augment_pil(p, no_warp[i], SIZE)) for i, p in enumerate(photos)])
    assert all(((device[i] - pil[i]) * STD_255).abs().mean() > 8 for i in range(len(photos)))


def _jitter_step_by_step(pixels: np.ndarray, order, factors) -> np.ndarray:
    """The colour jitter done as torchvision describes it, one step at a time on (P, 3) float pixels:
    contrast blends with the mean grey of the image as it is at its turn."""
    for kind in order:
        f = factors[kind]
        if kind == T.BRIGHTNESS:
            pixels = f * pixels
        elif kind == T.CONTRAST:
            pixels = f * pixels + (1 - f) * (pixels @ T.LUMA).mean()
        elif kind == T.SATURATION:
            pixels = f * pixels + (1 - f) * (pixels @ T.LUMA)[:, None]
        else:  # a rotation by f of a turn about the grey axis (Rodrigues' formula)
            axis, angle = np.ones(3) / np.sqrt(3), 2 * np.pi * f
            pixels = (np.cos(angle) * pixels + np.sin(angle) * np.cross(axis, pixels)
                      + (1 - np.cos(angle)) * (pixels @ axis)[:, None] * axis)
    return pixels


def test_the_colour_map_composed_on_the_host_is_the_jitter_done_step_by_step():
    """colour_maps (L @ pixel + K @ the image's starting mean) against the four steps applied in
    turn to real pixel values, for 40 draws of order and factors."""
    order, factors = T.jitter_from_draws(*np.random.default_rng(0).random((2, 40, 4)))
    assert len({tuple(o) for o in order.tolist()}) > 10  # the order varies
    linear, of_mean = T.colour_maps(order, factors)
    rng = np.random.default_rng(1)
    for i in range(40):
        pixels = rng.uniform(0, 255, (50, 3))
        expected = _jitter_step_by_step(pixels, order[i], factors[i])
        assert np.allclose(pixels @ linear[i].T + of_mean[i] @ pixels.mean(0), expected, atol=1e-9), i
    assert not np.allclose(linear[0], linear[1])


def test_the_sampler_draws_from_torchvisions_distributions():
    """The crop box (area share, aspect ratio, place), flip, rotation, shift and zoom of 4,000 draws
    follow the distributions of torchvision's RandomResizedCrop, RandomHorizontalFlip and
    RandomAffine (two-sample Kolmogorov-Smirnov distance under 0.05; a wrong range or a swapped
    draw gives several times that)."""
    width, height, n = 300, 200, 4000
    ours = T.sample_augmentation(T.draws_for_epoch(0, 0, n), [width] * n, [height] * n, SIZE)
    torch.manual_seed(0)
    boxes = np.array([v2.RandomResizedCrop.get_params(torch.empty(1, height, width), list(T.CROP_SCALE),
                                                      list(T.CROP_RATIO)) for _ in range(n)])
    affine = [v2.RandomAffine(degrees=T.ROTATION, translate=(T.TRANSLATE, T.TRANSLATE), scale=T.SCALE)
              .make_params([torch.empty(1, SIZE, SIZE)]) for _ in range(n)]

    def features(crop):
        top, left, h, w = crop.T.astype(float)
        return {"area": h * w / (width * height), "aspect": w / h, "top": top / height, "left": left / width}

    def ks(a, b):
        grid = np.sort(np.concatenate([a, b]))
        return np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                      - np.searchsorted(np.sort(b), grid, "right") / len(b)).max()

    theirs = features(boxes)
    for name, values in features(ours.crop).items():
        assert ks(values, theirs[name]) < 0.05, name
    assert ks(ours.angle, np.array([a["angle"] for a in affine])) < 0.05
    assert ks(ours.scale, np.array([a["scale"] for a in affine])) < 0.05
    assert ks(ours.translate[:, 0].astype(float), np.array([a["translate"][0] for a in affine], dtype=float)) < 0.05
    assert abs(ours.flip.mean() - 0.5) < 0.03
    assert ks(features(ours.crop)["area"], np.random.default_rng(0).uniform(0.5, 1, n)) > 0.2  # the check can fail


def test_evaluation_pixels_are_identical_on_both_pipelines(flower_dir):
    splits = load_splits(str(flower_dir), 0.2, seed=0)
    workers = with_transform(splits.val, T.eval_transform(SIZE))
    expected = torch.stack([workers[i]["pixel_values"] for i in range(len(splits.val))])
    cached = resized_splits(splits, SHORT)  # what the device path decodes
    images = dd.decode_eval_images(cached.val, SIZE)
    rows = torch.arange(len(images))
    assert torch.equal(dd.EvalPixels(images, torch.device("cpu"))(rows, rows, epoch=0), expected)
    assert images.labels.tolist() == splits.val["label"]


@pytest.mark.parametrize("processes,drop_last", [(1, True), (2, True), (3, False), (2, False)])
def test_process_shards_are_disjoint_and_cover_the_epoch(processes, drop_last):
    n, batch = 23, 4
    images = dd.DecodedImages(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), [(1, 1)] * n, torch.zeros(n, dtype=torch.bool),
                              torch.arange(n), torch.ones(n, dtype=torch.bool))

    class Rows:  # the loader's rows, as its "pixels"
        device = torch.device("cpu")

        def plan(self, rows, epoch):
            return torch.zeros(len(rows), 0)

        def apply(self, rows, device_rows, plan):
            return device_rows

    loaders = [dd.DeviceLoader(images, dd.Shard(r, processes, batch), Rows(), shuffle_seed=7, drop_last=drop_last)
               for r in range(processes)]
    seen = [[(b["labels"][b["valid"]]).tolist() for b in loader.for_epoch(2)] for loader in loaders]
    lengths = {len(loader.for_epoch(2)) for loader in loaders}
    assert lengths == {len(s) for s in seen} and len(lengths) == 1  # every process, the same number of batches
    flat = [label for rank in seen for labels in rank for label in labels]
    assert len(flat) == len(set(flat))  # disjoint
    global_batch = batch * processes
    assert len(flat) == (n // global_batch * global_batch if drop_last else n)  # whole global batches / all of it
    assert sorted(flat) != flat  # shuffled...
    again = [[b["labels"][b["valid"]].tolist() for b in loader.for_epoch(2)] for loader in loaders]
    assert again == seen  # ...as a function of (seed, epoch)
    assert [[b["labels"][b["valid"]].tolist() for b in loader.for_epoch(3)] for loader in loaders] != seen
    resumed = [b["labels"][b["valid"]].tolist() for b in loaders[0].for_epoch(2, skip_batches=2)]
    assert resumed == seen[0][2:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_batches_make_no_host_sync_on_cuda(tmp_path):
    """Making a training batch (indexing, augmentation, colour, normalisation) never makes the host
    wait for the GPU: torch raises on any synchronising call in this mode."""
    device = torch.device("cuda")
    images = dd.place(dd.decode_training_images(_dataset([_photo(*SHAPES[i % 4], seed=i) for i in range(8)],
                                                          tmp_path), SIZE), device)
    assert images.pixels.device.type == "cuda"
    loader = dd.DeviceLoader(images, dd.Shard(0, 1, 4), dd.TrainPixels(images, SIZE, 0, device), shuffle_seed=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(loader.for_epoch(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batches) == 2 and batches[0]["pixel_values"].is_cuda


# ---- real runs with --pipeline device on the CPU ---------------------------------------------------

# dropout, MixUp and EMA make the comparison cover the RNG and every piece of saved state
DEVICE_RUN = (*TINY_TRAIN, "--pipeline", "device", "--epochs", "2", "--batch-size", "4", "--dropout", "0.2",
              "--mixup", "0.2", "--ema-decay", "0.9", "--seed", "3")


def _history_without_timings(run: Path) -> list[dict]:
    rows = read_history(run)
    for row in rows:
        row.pop("epoch_time_s"), row.pop("images_per_s"), row.pop("data_wait")
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--resize-from", "32", "--image-size", "48"),
                                   ("--resize-from", "32", "--image-size", "48", "--pipeline", "workers")],
                         ids=["device", "device-resized", "workers-resized"])
def test_device_pipeline_stopped_by_sigterm_mid_epoch_resumes_bit_identically(tmp_path, extra):
    """25 photos: 20 train in 5 batches of 4. SIGTERM once step 6 (epoch 2's first) is saved; the
    resumed run ends with exactly the weights, EMA and history of a run nobody interrupted. With
    --resize-from the stop falls in epoch 2, the first at the larger size (32 then 48 px)."""
    data = make_dataset(tmp_path / "flowers", per_class=5)
    out = tmp_path / "out"
    train = ("train.py", "--data", str(data), "--output-dir", str(out), *DEVICE_RUN, *extra)
    whole = run_cli("python", *train, "--run-name", "whole", timeout=1200)
    if "workers" not in extra:
        assert "device pipeline: 20 + 5 images decoded, 0.00 GiB in this process, kept on cpu" in whole.stdout
    if extra:
        assert [row["image_size"] for row in read_history(out / "whole")] == [32, 48]
    stopped = interrupt_mid_epoch([sys.executable, *train, "--run-name", "cut", "--save-every-steps", "2"],
                                  out / "cut", global_step=6, timeout=1200)
    assert stopped.returncode != 0, stopped.stdout[-2000:]
    found = [int(k) for k in __import__("re").findall(r"at epoch 2, batch (\d+)/5\.", stopped.stdout)]
    assert len(found) == 1 and 0 < found[0] < 5, stopped.stdout[-2000:]
    resumed = run_cli("python", "train.py", "--resume", str(out / "cut"), timeout=1200)
    assert f"after epoch 1/2 and {found[0]} batches of the next" in resumed.stdout
    for name in ("last", "best", "ema"):
        ours, theirs = load_file(str(out / "cut" / name / "model.safetensors")), load_file(str(out / "whole" / name / "model.safetensors"))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), f"{name}/ weights differ"
    assert _history_without_timings(out / "cut") == _history_without_timings(out / "whole")


RECORD_ROWS = """
import json
from flowers import device_data
_plan = device_data.TrainPixels.plan
def _recording(self, rows, epoch):
    with open(os.environ["ROWS"] + os.environ.get("RANK", "0"), "a") as f:
        f.write(json.dumps([epoch, rows.tolist()]) + "\\n")
    return _plan(self, rows, epoch)
device_data.TrainPixels.plan = _recording
_decode = device_data.decode_training_images
def _decoding(*args, **kwargs):  # which ranks decode, and the pixels each rank trains on
    images = _decode(*args, **kwargs)
    with open(os.environ["ROWS"] + "decoded-" + os.environ.get("RANK", "0"), "w") as f:
        f.write("decoded")
    return images
device_data.decode_training_images = _decoding
_place = device_data.place_both
def _placing(train, val, *args, **kwargs):
    with open(os.environ["ROWS"] + "pixels-" + os.environ.get("RANK", "0"), "w") as f:
        f.write(json.dumps([int(train.pixels.long().sum()), int(val.pixels.long().sum())]))
    return _place(train, val, *args, **kwargs)
device_data.place_both = _placing
"""


@pytest.mark.slow
@pytest.mark.parametrize("room", ["enough", "none"])
def test_two_ranks_on_the_device_path_see_disjoint_shards_and_report_the_metrics_of_one_process(tmp_path, room):
    """Two real CPU ranks (gloo): 45 photos, 36 train in global batches of 2 x 4, so each epoch
    4 batches a rank, 32 images, none twice; 9 validation images in 2 global batches (the second
    padded). The accuracy both ranks record is what one process measures (eval.py). The node's
    local main decodes the photos once, into shared memory that both ranks train from, and the
    shared files are gone by the end; with no room in /dev/shm each rank decodes its own copy."""
    data = make_dataset(tmp_path / "flowers", per_class=9)
    shared_before = set(Path("/dev/shm").glob("flowers-*"))
    no_room = "device_data.shared_free_bytes = lambda: 0\n" if room == "none" else ""
    script = patched_entry_script(tmp_path / "train_rows.py", RECORD_ROWS + no_room)
    out = tmp_path / "out"
    proc = run_cli(ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_ddp.yaml", "--main_process_port",
                   str(free_port()), script, "--data", str(data), "--output-dir", str(out), "--run-name", "ddp",
                   *TINY_TRAIN, "--pipeline", "device", "--epochs", "2", "--batch-size", "4",
                   env={"ACCELERATE_USE_CPU": "true", "ROWS": str(tmp_path / "rows-")}, timeout=1200)
    assert "processes: 2" in proc.stdout
    if room == "enough":
        assert "one copy for this node's processes" in proc.stdout
        assert [(tmp_path / f"rows-decoded-{rank}").is_file() for rank in "01"] == [True, False]  # rank 1 mapped it
    else:
        assert "too little for the decoded train photos" in proc.stdout + proc.stderr
        assert "one copy for this node's processes" not in proc.stdout
        assert [(tmp_path / f"rows-decoded-{rank}").is_file() for rank in "01"] == [True, True]
    pixels = [json.loads((tmp_path / f"rows-pixels-{rank}").read_text()) for rank in "01"]
    splits = resized_splits(load_splits(str(data), 0.2, seed=42), T.eval_size(32))  # what one process decodes alone
    assert pixels[0] == pixels[1] == [int(dd.decode_training_images(splits.train, 32).pixels.long().sum()),
                                      int(dd.decode_eval_images(splits.val, 32).pixels.long().sum())]
    assert set(Path("/dev/shm").glob("flowers-*")) <= shared_before  # unlinked once both had mapped them
    seen = {rank: [json.loads(line) for line in (tmp_path / f"rows-{rank}").read_text().splitlines()]
            for rank in "01"}
    for epoch in (0, 1):
        shards = [[row for e, rows in seen[rank] if e == epoch for row in rows] for rank in "01"]
        assert [len(s) for s in shards] == [16, 16]
        assert not set(shards[0]) & set(shards[1]) and len(set(shards[0]) | set(shards[1])) == 32
    history = read_history(out / "ddp")
    assert [row["train_samples"] for row in history] == [32, 32]
    evaluated = run_cli("python", "eval.py", "--ckpt", str(out / "ddp" / "last"), timeout=600)
    assert "matches the accuracy recorded at training time" in evaluated.stdout, evaluated.stdout
    result = json.loads(next((out / "ddp").glob("eval-last*/results.json")).read_text())
    assert abs(result["metrics"]["loss"] - history[-1]["val_loss"]) < 1e-4


@pytest.mark.parametrize("channels_last", [True, False])
def test_device_normalisation_writes_the_model_layout_with_the_pil_paths_values(channels_last):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=g)
    normalised = T.DeviceNormalise(channels_last=channels_last)(pixels)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert normalised.is_contiguous(memory_format=layout) and normalised.dtype == torch.float32
    pil = torch.stack([T.ToNormalisedTensor()(PILImage.fromarray(p.permute(1, 2, 0).numpy())) for p in pixels])
    assert torch.equal(normalised, pil)  # bit for bit: evaluation is the same on both pipelines


@pytest.mark.parametrize("on_host", [False, True])
def test_one_copy_to_the_device_per_training_batch_two_when_gathered_on_the_host(tmp_path, monkeypatch, on_host):
    """The rows, labels, valid flags and augmentation plan travel together; the host-gather branch
    adds the batch's pixels (transforms.upload is the one way host tensors reach the device)."""
    images = dd.decode_training_images(_dataset([_photo(*SHAPES[i % 4], seed=i) for i in range(8)], tmp_path), SIZE)
    copies = []
    monkeypatch.setattr(T, "upload", lambda tensor, device: copies.append(tensor.shape) or tensor)
    monkeypatch.setattr(dd, "upload", T.upload)
    if on_host:  # the host-gather branch: pixels on the host, batches made for another device
        monkeypatch.setattr(dd.DecodedImages, "gather",
                            lambda self, rows, device_rows, device: T.upload(self.pixels[rows], device))
    loader = dd.DeviceLoader(images, dd.Shard(0, 1, 4), dd.TrainPixels(images, SIZE, 0, torch.device("cpu")),
                             shuffle_seed=1)
    list(loader.for_epoch(0))  # the first copies the constants (colour, normalisation) to the device, once
    copies.clear()
    batches = list(loader.for_epoch(1))
    assert len(copies) == len(batches) * (2 if on_host else 1)


def test_placement_leaves_the_reserve_free_and_device_cache_forces_either_place():
    cuda, gib = torch.device("cuda"), 2**30
    assert dd.on_device(gib, cuda, "auto", free_bytes=8 * gib)                     # a quarter of 8 GiB holds 1 GiB
    assert not dd.on_device(gib, cuda, "auto", reserve_bytes=5 * gib, free_bytes=8 * gib)  # not of the 3 GiB left
    assert dd.on_device(gib, cuda, "device", free_bytes=0) and not dd.on_device(gib, cuda, "host", free_bytes=80 * gib)
    assert dd.on_device(gib, torch.device("cpu"), "auto") and not dd.on_device(gib, torch.device("cpu"), "host")


@pytest.mark.slow  # the fast loop runs --device-cache host in tests/test_host_sync.py
def test_device_cache_host_keeps_the_photos_in_host_memory_and_trains(tmp_path):
    data = make_dataset(tmp_path / "flowers", per_class=2, classes=["a", "b"])
    run = run_cli("python", "train.py", "--data", str(data), "--output-dir", str(tmp_path / "out"), *TINY_TRAIN,
                  "--pipeline", "device", "--device-cache", "host", "--epochs", "1", "--batch-size", "2", "--val-split", "0.5",
                  timeout=600)
    assert "device pipeline: 2 + 2 images decoded, 0.00 GiB in this process, kept on the host (--device-cache host)" \
        in run.stdout, run.stdout
    assert "epoch 1/1" in run.stdout


def test_decoding_on_several_threads_gives_the_same_images_in_the_same_order(tmp_path):
    photos = [_photo(*SHAPES[i % 4], seed=i) for i in range(2 * dd.DECODE_CHUNK + 5)]  # three chunks
    ds = _dataset(photos, tmp_path)
    (tmp_path / "7.png").write_bytes(b"not a photo any more")  # one that no longer decodes
    one, four = (dd.decode_training_images(ds, SIZE, threads=n) for n in (1, 4))
    assert torch.equal(one.pixels, four.pixels) and one.sizes == four.sizes
    assert torch.equal(one.transposed, four.transposed) and torch.equal(one.labels, four.labels)
    assert torch.equal(one.valid, four.valid) and not four.valid[7] and four.valid.sum() == len(photos) - 1
    assert torch.equal(dd.decode_eval_images(ds, SIZE, threads=1).pixels, dd.decode_eval_images(ds, SIZE, threads=4).pixels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_gather_on_cuda_gives_the_pixels_of_images_kept_on_the_gpu(tmp_path):
    """The branch for sets that do not fit the GPU: gathered into pinned memory, copied without a sync."""
    device = torch.device("cuda")
    images = dd.decode_training_images(_dataset([_photo(*SHAPES[i % 4], seed=i) for i in range(8)], tmp_path), SIZE)
    on_gpu = dd.DecodedImages(images.pixels.to(device), images.sizes, images.transposed, images.labels, images.valid)
    loaders = [dd.DeviceLoader(i, dd.Shard(0, 1, 4), dd.TrainPixels(i, SIZE, 0, device), shuffle_seed=1)
               for i in (images, on_gpu)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gathered, kept = [[b["pixel_values"] for b in loader.for_epoch(0)] for loader in loaders]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(gathered, kept)) and len(gathered) == 2

"""The device data path (--pipeline device): every photo decoded once into uint8 tensors, batches
indexed from them and augmented on the training device, no DataLoader workers.

On a GPU the CPU cannot decode and augment photos one by one as fast as the model trains on
them; here the CPU only draws each image's augmentation parameters (a few small numbers) and the
device does the pixel work for a whole batch at once (transforms.BatchAugmentation).

Layout. Training photos are stored at evaluation's short side (as --cache-resized stores them),
each in a canvas of short side x twice the short side, lying down when it is a portrait, so the
random resized crop still sees the whole photo. A photo longer than twice its short side (rare)
is shrunk to fit. Validation photos are stored as evaluation's centre crops, the pixels the PIL
path computes, so evaluation is identical on both paths.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState
from datasets import Dataset, Image
from PIL import Image as PILImage
from tqdm.auto import tqdm

from flowers import imagefiles
from flowers.balance import balanced_order
from flowers.transforms import (BatchAugmentation, DeviceNormalise, eval_pixels, eval_size, example_seed,
                                sample_augmentation, upload)

# At most this share of the device's free memory holds the decoded images; the rest is left to the
# model, its activations and the batches. Beyond it, batches are gathered on the host instead.
DEVICE_SHARE = 0.25
DECODE_CHUNK = 64  # images read from the Arrow cache at a time


@dataclass
class DecodedImages:
    """One split, decoded: `pixels` (N, 3, H, W) uint8 on the device or the host; for each image
    its upright (height, width) as stored, whether it is stored lying down (transposed), its label,
    and whether it decoded at all (a black stand-in keeps the place of one that did not)."""
    pixels: torch.Tensor
    sizes: list[tuple[int, int]]
    transposed: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, rows: torch.Tensor, device_rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The uint8 pixels of `rows` (on the host; `device_rows`: the same on `device`) on `device`:
        an index on the device when the images live there, else gathered on the host and copied
        from pinned memory."""
        if self.pixels.device.type == device.type:
            return self.pixels[device_rows]
        return upload(self.pixels[rows], device)


def _rows(ds: Dataset, desc: str) -> Iterator[tuple[Optional[PILImage.Image], int]]:
    """Each image of `ds` decoded (None with a warning when it no longer decodes) and its label."""
    source = ds.cast_column("image", Image(decode=False))
    # one bar per node, on a terminal only (a log file gets the summary line that follows)
    quiet = not sys.stderr.isatty() or os.environ.get("LOCAL_RANK", "0") != "0"
    with tqdm(total=len(ds), desc=desc, leave=False, dynamic_ncols=True, disable=quiet) as bar:
        for start in range(0, len(ds), DECODE_CHUNK):
            chunk = source[start:start + DECODE_CHUNK]
            for entry, label in zip(chunk["image"], chunk["label"]):
                yield imagefiles.load_rgb_or_none(entry), label
                bar.update()


def _stack(canvas: torch.Tensor, sizes: list, transposed: list, labels: list, valid: list) -> DecodedImages:
    return DecodedImages(canvas, sizes, torch.tensor(transposed, dtype=torch.bool),
                         torch.tensor(labels, dtype=torch.long), torch.tensor(valid, dtype=torch.bool))


def decode_training_images(ds: Dataset, image_size: int) -> DecodedImages:
    """`ds` (photos at evaluation's short side, see data.resized_copy) in canvases, on the host."""
    short = eval_size(image_size)
    canvas = torch.zeros(len(ds), 3, short, 2 * short, dtype=torch.uint8)
    sizes, transposed, labels, valid = [], [], [], []
    for i, (img, label) in enumerate(_rows(ds, "decoding training images")):
        valid.append(img is not None)
        if img is None:
            img = PILImage.new("RGB", (short, short))
        if max(img.size) > 2 * min(img.size) or min(img.size) > short:
            scale = min(2 * short / max(img.size), short / min(img.size))
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), PILImage.BILINEAR)
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, h, w)
        lying = img.height > img.width
        if lying:
            pixels = pixels.transpose(1, 2)
        canvas[i, :, :pixels.shape[1], :pixels.shape[2]] = pixels
        sizes.append((img.height, img.width))
        transposed.append(lying)
        labels.append(label)
    return _stack(canvas, sizes, transposed, labels, valid)


def decode_eval_images(ds: Dataset, image_size: int) -> DecodedImages:
    """`ds` as evaluation's uint8 centre crops (the PIL path's pixels before normalisation)."""
    crop = eval_pixels(image_size)
    pixels = torch.zeros(len(ds), 3, image_size, image_size, dtype=torch.uint8)
    labels, valid = [], []
    for i, (img, label) in enumerate(_rows(ds, "decoding validation images")):
        if img is not None:
            pixels[i] = torch.from_numpy(np.array(crop(img))).permute(2, 0, 1)
        labels.append(label)
        valid.append(img is not None)
    return _stack(pixels, [(image_size, image_size)] * len(ds), [False] * len(ds), labels, valid)


def place(images: DecodedImages, device: torch.device) -> DecodedImages:
    """Move the decoded pixels to `device` when they fit in DEVICE_SHARE of its free memory
    (a CPU's own memory always holds them); otherwise they stay on the host (see gather)."""
    nbytes = images.pixels.numel()
    if device.type == "cuda":
        fits = nbytes <= DEVICE_SHARE * torch.cuda.mem_get_info(device)[0]
    elif device.type == "mps":
        fits = nbytes <= DEVICE_SHARE * (torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    else:
        fits = device.type == "cpu"
    if fits:
        images.pixels = images.pixels.to(device)
    return images


@dataclass(frozen=True)
class Shard:
    """This process's part of a split: of each global batch (batch_size x count images), the rows
    [index * batch_size, (index + 1) * batch_size). The processes' parts are disjoint and together
    cover the split."""
    index: int
    count: int
    batch_size: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.count


class DeviceLoader(DataLoaderStateMixin):
    """A split's batches for this process, made on the device: dicts of `pixel_values` (float,
    normalised), `labels` and `valid`, as the DataLoader path gives them.

    The epoch's order is a permutation drawn from (shuffle_seed, epoch) (`sampler` "balanced":
    balance.balanced_order, draws with replacement), or the split's own order when shuffle_seed is
    None (evaluation). A short last global batch is dropped (`drop_last`) or
    completed by wrapping around to the first images, marked not `valid` so that they count
    nowhere: every process gets batches of the same size, and gathered evaluation results hold
    each image exactly once, in the split's order. Accelerate's gradient state is told where the
    epoch ends, as a prepared DataLoader tells it (gradient accumulation syncs on the last batch).
    `make_pixels` (TrainPixels, EvalPixels) turns the batch's rows into its pixels on the device."""

    def __init__(self, images: DecodedImages, shard: Shard, make_pixels: "TrainPixels | EvalPixels",
                 shuffle_seed: Optional[int] = None, drop_last: bool = False, sampler: str = "random"):
        self.images, self.shard, self.make_pixels = images, shard, make_pixels
        self.shuffle_seed, self.sampler = shuffle_seed, sampler
        self.drop_last = drop_last and len(images) >= shard.global_batch
        self._drop_last = True  # for DataLoaderStateMixin: gather everything, `valid` says what counts
        self.gradient_state = GradientState()
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        batches = len(self.images) / self.shard.global_batch
        return (math.floor(batches) if self.drop_last else math.ceil(batches)) - self.start_batch

    def for_epoch(self, epoch: int, skip_batches: int = 0) -> "DeviceLoader":
        """This loader for `epoch` (0-based), starting after its first `skip_batches` batches."""
        self.epoch, self.start_batch = epoch, skip_batches
        return self

    def order(self) -> torch.Tensor:
        n = len(self.images)
        if self.shuffle_seed is None:
            return torch.arange(n)
        if self.sampler == "balanced":  # --sampler balanced: the workers path's order too
            return balanced_order(self.images.labels, n, self.shuffle_seed, self.epoch)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.shuffle_seed + self.epoch))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order, n, shard = self.order(), len(self.images), self.shard
        batches = len(self) + self.start_batch
        device = self.make_pixels.device
        self.begin()
        try:
            for k in range(self.start_batch, batches):
                positions = torch.arange(shard.batch_size) + k * shard.global_batch + shard.index * shard.batch_size
                rows = order[positions % n]
                valid = self.images.valid[rows] & (positions < n)
                self.end_of_dataloader = k == batches - 1
                on_device = upload(torch.stack([rows, self.images.labels[rows], valid.long()]), device)
                yield {"pixel_values": self.make_pixels(rows, on_device[0], self.epoch), "labels": on_device[1],
                       "valid": on_device[2].bool()}
        finally:
            self.start_batch = 0
            self.end()


class TrainPixels:
    """Augmented training pixels: each image's parameters drawn on the host from its own seeded
    generator (example_seed(seed, epoch, index), as data.SeededAugmentation draws them), the pixel
    work done for the whole batch on the device (transforms.BatchAugmentation)."""

    def __init__(self, images: DecodedImages, image_size: int, seed: int, device: torch.device):
        self.images, self.image_size, self.seed, self.device = images, image_size, seed, device
        self.augment = BatchAugmentation(image_size)

    def __call__(self, rows: torch.Tensor, device_rows: torch.Tensor, epoch: int) -> torch.Tensor:
        params = []
        for index in rows.tolist():
            height, width = self.images.sizes[index]
            generator = torch.Generator().manual_seed(example_seed(self.seed, epoch, index))
            params.append(sample_augmentation(width, height, self.image_size, generator))
        return self.augment(self.images.gather(rows, device_rows, self.device), self.images.transposed[rows], params)


class EvalPixels:
    """Evaluation pixels: the stored centre crops, normalised on the device."""

    def __init__(self, images: DecodedImages, device: torch.device):
        self.images, self.device, self.normalise = images, device, DeviceNormalise()

    def __call__(self, rows: torch.Tensor, device_rows: torch.Tensor, epoch: int) -> torch.Tensor:
        return self.normalise(self.images.gather(rows, device_rows, self.device))

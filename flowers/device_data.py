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

import itertools
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState
from datasets import Dataset, Image
from PIL import Image as PILImage
from tqdm.auto import tqdm

from flowers import imagefiles
from flowers.runtime import usable_cores
from flowers.balance import balanced_order
from flowers.transforms import (REPORT_STRENGTH, AugmentStrength, BatchAugmentation, DeviceNormalise,
                                draws_for_epoch, eval_pixels, eval_size, sample_augmentation, upload)

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
    shared_file: Optional[Path] = None  # the node's shared copy (local main), until release_shared unlinks it
    in_shared_memory: bool = False  # the pixels are the node's one copy in /dev/shm

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, rows: torch.Tensor, device_rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The uint8 pixels of `rows` (on the host; `device_rows`: the same on `device`) on `device`:
        an index on the device when the images live there, else gathered on the host and copied
        from pinned memory."""
        if self.pixels.device.type == device.type:
            return self.pixels[device_rows]
        if device.type == "cuda":
            # gathered straight into page-locked memory (one host copy, not two: index, then pin);
            # torch's caching host allocator reuses the block only once its copy has completed
            pinned = torch.empty((len(rows), *self.pixels.shape[1:]), dtype=self.pixels.dtype, pin_memory=True)
            return torch.index_select(self.pixels, 0, rows, out=pinned).to(device, non_blocking=True)
        return upload(self.pixels[rows], device)


def decode_threads() -> int:
    """Threads decoding photos in each process: this process's share of the cores (PIL decodes
    without holding the GIL), at most 8."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, usable_cores() // max(1, local_processes)))


def _rows(ds: Dataset, desc: str, threads: Optional[int] = None) -> Iterator[tuple[Optional[PILImage.Image], int]]:
    """Each image of `ds` decoded (None with a warning when it no longer decodes) and its label, in
    order; a chunk's photos are decoded on `threads` threads (decode_threads() when None)."""
    source = ds.cast_column("image", Image(decode=False))
    # one bar per node, on a terminal only (a log file gets the summary line that follows)
    quiet = not sys.stderr.isatty() or os.environ.get("LOCAL_RANK", "0") != "0"
    with tqdm(total=len(ds), desc=desc, leave=False, dynamic_ncols=True, disable=quiet) as bar, \
            ThreadPoolExecutor(threads or decode_threads()) as pool:
        for start in range(0, len(ds), DECODE_CHUNK):
            chunk = source[start:start + DECODE_CHUNK]
            for img, label in zip(pool.map(imagefiles.load_rgb_or_none, chunk["image"]), chunk["label"]):
                yield img, label
                bar.update()


def _stack(canvas: torch.Tensor, sizes: list, transposed: list, labels: list, valid: list) -> DecodedImages:
    return DecodedImages(canvas, sizes, torch.tensor(transposed, dtype=torch.bool),
                         torch.tensor(labels, dtype=torch.long), torch.tensor(valid, dtype=torch.bool))


def _shape(kind: str, count: int, image_size: int) -> tuple[int, ...]:
    short = eval_size(image_size)
    return (count, 3, short, 2 * short) if kind == "train" else (count, 3, image_size, image_size)


def decode_training_images(ds: Dataset, image_size: int, threads: Optional[int] = None,
                           out: Optional[torch.Tensor] = None) -> DecodedImages:
    """`ds` (photos at evaluation's short side, see data.resized_copy) in canvases, on the host
    (in `out`, zeros of its shape, when given)."""
    short = eval_size(image_size)
    canvas = torch.zeros(_shape("train", len(ds), image_size), dtype=torch.uint8) if out is None else out
    sizes, transposed, labels, valid = [], [], [], []
    for i, (img, label) in enumerate(_rows(ds, "decoding training images", threads)):
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


def decode_eval_images(ds: Dataset, image_size: int, threads: Optional[int] = None,
                       out: Optional[torch.Tensor] = None) -> DecodedImages:
    """`ds` as evaluation's uint8 centre crops (the PIL path's pixels before normalisation), in
    `out` (zeros of its shape) when given."""
    crop = eval_pixels(image_size)
    pixels = torch.zeros(_shape("val", len(ds), image_size), dtype=torch.uint8) if out is None else out
    labels, valid = [], []
    for i, (img, label) in enumerate(_rows(ds, "decoding validation images", threads)):
        if img is not None:
            pixels[i] = torch.from_numpy(np.array(crop(img))).permute(2, 0, 1)
        labels.append(label)
        valid.append(img is not None)
    return _stack(pixels, [(image_size, image_size)] * len(ds), [False] * len(ds), labels, valid)


# ---- one decoded copy per node ----------------------------------------------------------------------
# Under torchrun (accelerate launch) with several processes on a node, the node's local main process
# decodes each split once, on all the node's decode threads, into a file in shared memory
# (/dev/shm); the node's other processes wait for it by polling for its metadata file (no collective
# that a long decode could keep past the collective timeout) and map the same pages. The files are
# unlinked once every process has mapped them (release_shared, after the model's first collective),
# so the memory goes back when the last process lets go; multiprocessing's resource tracker
# unlinks them if the local main dies first.
SHARED_DIR = Path("/dev/shm")
_shared_calls = itertools.count()  # every process decodes its splits in the same order: the same names


def node_share() -> Optional[str]:
    """A name prefix the node's processes share (their launcher's pid), or None when this process
    decodes on its own: one process on the node, no torchrun, or no /dev/shm."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1 or "TORCHELASTIC_RUN_ID" not in os.environ \
            or not SHARED_DIR.is_dir():
        return None
    return f"flowers-{os.getppid()}"


def decode_split(kind: str, ds: Dataset, image_size: int) -> DecodedImages:
    """`ds` decoded as decode_training_images ("train") or decode_eval_images ("val") do it, once
    per node (see above): on the host, shared by the node's processes when there are several and
    /dev/shm has room for it (a container's default 64 MB would not: writing past it kills the
    process with SIGBUS); otherwise each process decodes its own copy, as the local main decides
    and tells the others with a marker file."""
    decode = decode_training_images if kind == "train" else decode_eval_images
    prefix = node_share()
    if prefix is None:
        return decode(ds, image_size)
    shape = _shape(kind, len(ds), image_size)
    path = SHARED_DIR / f"{prefix}-{next(_shared_calls)}-{kind}"
    meta, alone = path.with_name(path.name + ".meta"), path.with_name(path.name + ".alone")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        if math.prod(shape) > SHARED_ROOM * shared_free_bytes():
            _tracked(alone).touch()
            print(f"note: {SHARED_DIR} has {shared_free_bytes() / 2**30:.2f} GiB free, too little for the decoded "
                  f"{kind} photos ({math.prod(shape) / 2**30:.2f} GiB): each process decodes its own copy", flush=True)
            images = decode(ds, image_size)
        else:
            with open(_tracked(path), "wb") as f:
                f.truncate(math.prod(shape))
            images = decode(ds, image_size, min(8, usable_cores()), out=_mapped(path, shape))
            tmp = meta.with_name(meta.name + ".tmp")
            torch.save((images.sizes, images.transposed, images.labels, images.valid), tmp)
            os.replace(tmp, _tracked(meta))  # the signal: the pixels are complete
            images.in_shared_memory = True
        images.shared_file = path
        return images
    while not meta.is_file():
        if alone.is_file():
            return decode(ds, image_size)
        time.sleep(0.2)
    sizes, transposed, labels, valid = torch.load(meta, weights_only=True)
    if labels.tolist() != list(ds["label"]):
        raise RuntimeError(f"{path}: the node's local main process decoded another split than this process's")
    return DecodedImages(_mapped(path, shape), sizes, transposed, labels, valid, in_shared_memory=True)


SHARED_ROOM = 0.9  # at most this share of /dev/shm's free space holds a split


def shared_free_bytes() -> int:
    stat = os.statvfs(SHARED_DIR)
    return stat.f_bavail * stat.f_frsize


def _tracked(path: Path) -> Path:
    """`path` in /dev/shm, registered with multiprocessing's resource tracker, which unlinks it if
    this process dies before release_shared does (shm_unlink("/name") removes /dev/shm/name)."""
    resource_tracker.register(f"/{path.name}", "shared_memory")
    return path


def _mapped(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=torch.uint8).view(shape)


def release_shared(*splits: DecodedImages) -> None:
    """The local main process: unlink the splits' shared files, once every process of the node has
    mapped them (after a collective that follows their decoding); the pages stay while mapped."""
    for images in splits:
        if images.shared_file is not None:
            for suffix in ("", ".meta", ".alone"):
                path = images.shared_file.with_name(images.shared_file.name + suffix)
                if path.exists():
                    path.unlink()
                    resource_tracker.unregister(f"/{path.name}", "shared_memory")
            images.shared_file = None


def free_device_memory(device: torch.device) -> Optional[int]:
    """Bytes the device can still allocate (None for the CPU, whose memory is the host's)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    return None


def on_device(nbytes: int, device: torch.device, cache: str = "auto", reserve_bytes: int = 0,
              free_bytes: Optional[int] = None) -> bool:
    """Whether decoded photos of `nbytes` go to `device`: --device-cache device or host as told; auto
    when they take at most DEVICE_SHARE of the free memory (`free_bytes`, read from the device when
    None) less `reserve_bytes`. A CPU keeps them in its own memory either way."""
    if cache != "auto" or device.type == "cpu":
        return cache != "host"
    free = free_device_memory(device) if free_bytes is None else free_bytes
    return free is not None and nbytes <= DEVICE_SHARE * max(0, free - reserve_bytes)


def place(images: DecodedImages, device: torch.device, cache: str = "auto", reserve_bytes: int = 0) -> DecodedImages:
    """Move the decoded pixels to `device` as on_device decides; otherwise they stay on the host
    (see gather)."""
    if on_device(images.pixels.numel(), device, cache, reserve_bytes):
        images.pixels = images.pixels.to(device)
    return images


def place_both(train: DecodedImages, val: DecodedImages, device: torch.device, cache: str = "auto",
               reserve_bytes: int = 0) -> str:
    """Place both splits together (both on the device, or both on the host); where they are."""
    if on_device(train.pixels.numel() + val.pixels.numel(), device, cache, reserve_bytes):
        train.pixels, val.pixels = train.pixels.to(device), val.pixels.to(device)
        return str(device)
    return "the host"


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
    `make_pixels` (TrainPixels, EvalPixels) turns the batch's rows into its pixels: its `plan` (the
    host's part) travels to the device with the rows, labels and valid flags in one copy, and its
    `apply` makes the pixels there."""

    def __init__(self, images: DecodedImages, shard: Shard, make_pixels: "TrainPixels | EvalPixels",
                 shuffle_seed: Optional[int] = None, drop_last: bool = False, sampler: str = "random"):
        if len(images) >= 2**24:
            raise ValueError(f"{len(images)} images: the device pipeline numbers them in float32, up to 2**24")
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
                # the batch's rows, labels, valid flags and the pixels' plan: one copy to the device
                # (float32 holds row numbers exactly below 2**24)
                on_device = upload(torch.cat([torch.stack([rows, self.images.labels[rows], valid], dim=1).float(),
                                              self.make_pixels.plan(rows, self.epoch)], dim=1), device)
                device_rows = on_device[:, 0].long()
                yield {"pixel_values": self.make_pixels.apply(rows, device_rows, on_device[:, 3:]),
                       "labels": on_device[:, 1].long(), "valid": on_device[:, 2].bool()}
        finally:
            self.start_batch = 0
            self.end()


class TrainPixels:
    """Augmented training pixels: the whole epoch's parameters drawn and composed on the host at
    once, ahead of its first batch (transforms.draws_for_epoch: image i draws what
    data.SeededAugmentation draws for it), each batch's rows of them copied with the batch and the
    pixel work done for the whole batch on the device (transforms.BatchAugmentation). `sizes`: the
    crop size, or each epoch's (transforms.training_sizes, --resize-from)."""

    def __init__(self, images: DecodedImages, sizes: "int | tuple[int, ...]", seed: int, device: torch.device,
                 channels_last: bool = True, strength: AugmentStrength = REPORT_STRENGTH):
        self.images, self.seed, self.device, self.channels_last = images, seed, device, channels_last
        self.strength = strength
        self.sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes)
        self.heights, self.widths = np.array(images.sizes, dtype=np.int64).reshape(-1, 2).T
        self._epoch_plan: Optional[tuple[int, torch.Tensor]] = None
        self.augment = BatchAugmentation(self.sizes[0], channels_last=channels_last)

    def epoch_plan(self, epoch: int) -> torch.Tensor:
        """Every image's plan for `epoch` (N, BatchAugmentation.PLAN_COLUMNS), made once an epoch:
        vectorised, a few ms for the flower set instead of ~3 ms a batch drawn image by image."""
        if self._epoch_plan is None or self._epoch_plan[0] != epoch:
            size = self.sizes[min(epoch, len(self.sizes) - 1)]
            if size != self.augment.image_size:
                self.augment = BatchAugmentation(size, channels_last=self.channels_last)
            params = sample_augmentation(draws_for_epoch(self.seed, epoch, len(self.images)), self.widths,
                                         self.heights, size, self.strength)
            canvas = self.images.pixels.shape
            self._epoch_plan = (epoch, self.augment.plan((canvas[-1], canvas[-2]), self.images.transposed, params))
        return self._epoch_plan[1]

    def plan(self, rows: torch.Tensor, epoch: int) -> torch.Tensor:
        """The host's part of the batch of `rows` (see BatchAugmentation.plan)."""
        return self.epoch_plan(epoch)[rows]

    def apply(self, rows: torch.Tensor, device_rows: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        """The batch's pixels on the device, from `plan` there."""
        return self.augment.apply(self.images.gather(rows, device_rows, self.device), plan)

    def __call__(self, rows: torch.Tensor, device_rows: torch.Tensor, epoch: int) -> torch.Tensor:
        return self.apply(rows, device_rows, upload(self.plan(rows, epoch), self.device))


class EvalPixels:
    """Evaluation pixels: the stored centre crops, normalised on the device (channels-last unless
    `channels_last` is False: the model's layout)."""

    def __init__(self, images: DecodedImages, device: torch.device, channels_last: bool = True):
        self.images, self.device, self.normalise = images, device, DeviceNormalise(channels_last=channels_last)

    def plan(self, rows: torch.Tensor, epoch: int) -> torch.Tensor:
        return torch.zeros(len(rows), 0)  # nothing drawn

    def apply(self, rows: torch.Tensor, device_rows: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        return self.normalise(self.images.gather(rows, device_rows, self.device))

    def __call__(self, rows: torch.Tensor, device_rows: torch.Tensor, epoch: int) -> torch.Tensor:
        return self.apply(rows, device_rows, torch.zeros(len(rows), 0))

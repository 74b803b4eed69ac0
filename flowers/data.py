"""Load an image dataset with Hugging Face `datasets`, split it, and build DataLoaders."""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import datasets
from datasets import ClassLabel, Dataset, Features, Image, load_dataset
from datasets.utils.stratify import stratified_shuffle_split_generate_indices
from torch.utils.data import DataLoader

from flowers import device_data as dd
from flowers import imagefiles
from flowers.balance import BalancedSampler, split_labels
from flowers.config import TrainConfig
from flowers.errors import UserError
from flowers.runtime import usable_cores
from flowers.transforms import eval_transform, example_seed, short_side_resize, train_transform

DEFAULT_DATA_DIR = Path("data") / "flower_dataset"
VAL_DIR_NAMES = ("val", "validation", "valid")
# A Hub dataset's own validation split, used for model selection; never `test` (choosing the best
# epoch on it would leak the test set into the model and its reported accuracy).
HUB_VAL_SPLITS = ("validation", "valid")
AUTO = "auto"  # load_splits' val_from: the source's own validation split when it has one


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    class_names: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)  # unusable files left out (see imagefiles.py)
    # the source's own split (a Hub split or a val/ folder) that is the validation set; None: held
    # out of the training images (stratified, by seed and val_split). Recorded in checkpoints.
    val_from: Optional[str] = None


def resolve_data(data: Optional[str], download_if_missing: bool = True) -> str:
    """--data, else $FLOWERS_DATA, else data/flower_dataset, which is downloaded when absent."""
    if data:
        return data
    if os.environ.get("FLOWERS_DATA"):
        return os.environ["FLOWERS_DATA"]
    if DEFAULT_DATA_DIR.is_dir():
        return str(DEFAULT_DATA_DIR)
    if not download_if_missing:
        raise UserError(
            f"no data: pass --data PATH (a folder with one sub-folder per class) or a Hub dataset id, "
            f"set $FLOWERS_DATA, or put the photos in {DEFAULT_DATA_DIR}/")
    from flowers.download import download
    return str(download(DEFAULT_DATA_DIR.parent))


def _pre_split_dirs(root: Path) -> Optional[tuple[Path, Path]]:
    train = root / "train"
    val = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
    return (train, val) if train.is_dir() and val is not None else None


def _load_folder(root: Path, strict: bool = False) -> tuple[Dataset, list[str]]:
    """The usable images of a class-per-folder tree (unusable ones reported), and what was skipped."""
    scan = imagefiles.scan_folder(root, cache_dir=Path(datasets.config.HF_DATASETS_CACHE) / "flowers-scans")
    imagefiles.report(scan, strict)
    features = Features({"image": Image(), "label": ClassLabel(names=scan.class_names)})
    ds = Dataset.from_dict({"image": [path for path, _ in scan.files], "label": [label for _, label in scan.files]},
                           features=features)
    return ds, [path for path, _ in scan.skipped]


def _label_names(ds: Dataset) -> list[str]:
    feature = ds.features.get("label")
    if not isinstance(feature, ClassLabel):
        raise UserError("dataset has no 'label' class column")
    return list(feature.names)


def _normalise_hub_columns(ds: Dataset) -> Dataset:
    """Rename the first Image column to 'image' and the first ClassLabel column to 'label'."""
    image_col = next((k for k, v in ds.features.items() if isinstance(v, Image)), None)
    label_col = next((k for k, v in ds.features.items() if isinstance(v, ClassLabel)), None)
    if image_col is None or label_col is None:
        raise UserError(f"dataset needs an image column and a class-label column, found {list(ds.features)}")
    if image_col != "image":
        ds = ds.rename_column(image_col, "image")
    if label_col != "label":
        ds = ds.rename_column(label_col, "label")
    return ds.select_columns(["image", "label"])


def load_splits(data: str, val_split: float, seed: int, strict: bool = False,
                val_from: Optional[str] = AUTO) -> Splits:
    """Train/validation splits of a folder or Hub dataset (or a local copy of one: a folder of
    Parquet files per split, as the Hub stores them).

    A folder with train/ and val/ (or validation/) sub-folders is used as given, and so is a Hub
    dataset's own `validation` (or `valid`) split; otherwise the images are split stratified by
    class with `seed`, so every process (and eval.py later) gets exactly the same split.
    `val_from` (Hub datasets): AUTO, a split name, or None to split `train` even when the dataset
    has its own validation split (as checkpoints saved before val_from was recorded did).
    Unusable image files are left out with a warning each (`strict`: an error).
    """
    # absolute (recorded in checkpoints: eval.py may run elsewhere) and canonical, so that
    # `../x` and `/abs/x` share the caches of the scan and of --cache-resized
    root = Path(data).expanduser().resolve()
    if root.is_file():
        raise UserError(f"--data {data} is a file; expected a folder with one sub-folder per class")
    if root.is_dir() and not _holds_dataset_files(root):
        pre_split = _pre_split_dirs(root)
        if pre_split:
            (train, train_skipped), (val, val_skipped) = (_load_folder(d, strict) for d in pre_split)
            if _label_names(train) != _label_names(val):
                raise UserError(f"{pre_split[0]} and {pre_split[1]} hold different class folders")
            return Splits(train, val, _label_names(train), str(root), train_skipped + val_skipped,
                          val_from=pre_split[1].name)
        full, skipped = _load_folder(root, strict)
    elif not root.is_dir() and (data.startswith((".", "/", "~")) or os.path.sep + os.path.sep in data):
        raise UserError(f"--data {data}: no such folder")
    else:
        source = str(root) if root.is_dir() else data
        full, own_val, val_from = _load_hub(source, val_from)
        if own_val is not None:
            if _label_names(own_val) != _label_names(full):
                raise UserError(f"--data {data}: its '{val_from}' split has other classes than its training split")
            return Splits(full, own_val, _label_names(full), source, val_from=val_from)
        skipped = []
    names = _label_names(full)
    if len(names) < 2:
        raise UserError(f"--data {data} has {len(names)} class(es); need at least 2")
    try:
        train, val = stratified_split(full, val_split, seed)
    except ValueError as e:  # too few images for this fraction, or a class with a single image
        raise UserError(f"cannot hold out --val-split {val_split} of the {len(full)} images in {data}, "
                        f"stratified by class ({e})") from None
    return Splits(train, val, names, str(root) if root.is_dir() else data, skipped)


def stratified_split(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Exactly `ds.train_test_split(test_size=val_fraction, stratify_by_column="label", seed=seed)`
    (so splits and checkpoints stay comparable across versions), and faster on large sets:
    datasets reads the label column row by row, here it is one Arrow column."""
    n_val = math.ceil(val_fraction * len(ds))
    if not 0 < n_val < len(ds):
        raise ValueError(f"{n_val} of {len(ds)} images would be held out")
    labels = ds.with_format("arrow")[:]["label"].to_numpy()  # honours an indices mapping
    try:
        train_idx, val_idx = next(stratified_shuffle_split_generate_indices(
            labels, len(ds) - n_val, n_val, rng=np.random.default_rng(seed)))
    except ValueError as e:
        if str(e) == "Minimum class count error":
            raise ValueError("the least populated class has only 1 image; each class needs at least 2") from None
        raise
    return ds.select(train_idx), ds.select(val_idx)


def _holds_dataset_files(root: Path) -> bool:
    """A local copy of a Hub dataset (Parquet files, at the top or one folder down, e.g.
    data/train-00000-of-00001.parquet), which `load_dataset` reads with its splits, rather than
    a folder of photos."""
    return any(root.glob("*.parquet")) or any(root.glob("*/*.parquet"))


def _load_hub(data: str, val_from: Optional[str] = AUTO) -> tuple[Dataset, Optional[Dataset], Optional[str]]:
    """A Hub dataset's training split, and its own validation split and that split's name (see
    load_splits' `val_from`; (None, None) when it has none or val_from is None)."""
    try:
        dd = load_dataset(data)
    except Exception as e:  # network, unknown id, gated dataset: all one line for the user
        raise UserError(f"--data {data}: not a folder here, and loading it from the Hub failed "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    split = "train" if "train" in dd else next(iter(dd))
    if val_from == AUTO:
        val_from = next((name for name in HUB_VAL_SPLITS if name in dd and name != split), None)
    elif val_from is not None and val_from not in dd:
        raise UserError(f"--data {data} has no '{val_from}' split (the checkpoint's validation split); "
                        f"its splits: {', '.join(dd)}")
    own_val = _normalise_hub_columns(dd[val_from]) if val_from else None
    return _normalise_hub_columns(dd[split]), own_val, val_from


def full_dataset(data: str, strict: bool = False) -> tuple[Dataset, list[str]]:
    """Every image of a folder (or its val/ split if it has one), for evaluation on other data."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise UserError(f"--data {data}: no such folder")
    pre_split = _pre_split_dirs(root)
    ds, _ = _load_folder(pre_split[1] if pre_split else root, strict)
    return ds, _label_names(ds)


def image_paths(ds: Dataset) -> list[Optional[str]]:
    """File path of every example (None for images stored as bytes), without decoding any image."""
    return [item["path"] for item in ds.cast_column("image", Image(decode=False))["image"]]


def _resize_batch(batch: dict, short_side: int) -> dict:
    """Every image resized to `short_side` (up or down) and stored as uncompressed PPM bytes:
    decoding one is a copy (far cheaper than a JPEG), and evaluation's resize has nothing left to do."""
    resize, out = short_side_resize(short_side), []
    for entry in batch["image"]:
        buffer = io.BytesIO()
        resize(imagefiles.load_rgb(entry)).save(buffer, format="PPM")
        out.append({"bytes": buffer.getvalue(), "path": None})
    return {"image": out}


def _files_stamp(ds: Dataset) -> str:
    """A hash of the size and modification time of every image file in `ds`: a photo edited or
    replaced in place keeps its path, and so the dataset's fingerprint, but not its stamp."""
    digest = hashlib.sha256()
    for path in image_paths(ds):
        if path is not None:
            try:
                st = os.stat(path)
                digest.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
            except OSError:
                digest.update(b"missing;")  # decoding it will say what is wrong
    return digest.hexdigest()[:16]


def resized_copy(ds: Dataset, short_side: int) -> Dataset:
    """`ds` with every image decoded once and stored resized in an Arrow file under the `datasets`
    cache, named by the dataset's fingerprint (its paths and labels), its files' sizes and
    modification times, and `short_side`, so later epochs and runs read small raw images instead
    of decoding and resizing JPEGs. On disk: about 4 * short_side**2 bytes per image."""
    cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "flowers-resized"
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = ds.cast_column("image", Image(decode=False))
    name = f"{source._fingerprint}-{_files_stamp(source)}-short{short_side}-v2.arrow"
    return source.map(
        _resize_batch, batched=True, batch_size=64, fn_kwargs={"short_side": short_side}, features=ds.features,
        num_proc=min(4, usable_cores()) if len(ds) >= 1000 else None,
        cache_file_name=str(cache_dir / name),
        desc=f"caching images at short side {short_side}")


def resized_splits(splits: Splits, short_side: int) -> Splits:
    return replace(splits, train=resized_copy(splits.train, short_side), val=resized_copy(splits.val, short_side))


def with_transform(ds: Dataset, transform: Callable) -> Dataset:
    """Decode (upright RGB, see imagefiles.load_rgb) and transform on the fly, batch-wise, into
    `pixel_values` and `labels`. An image that no longer decodes is dropped from its batch with a
    warning instead of killing the run."""
    def apply(batch: dict) -> dict:
        return {
            "pixel_values": [_transformed_or_none(entry, transform) for entry in batch["image"]],
            "labels": batch["label"],
        }
    return ds.cast_column("image", Image(decode=False)).with_transform(apply)


def _transformed_or_none(entry: dict, transform: Callable) -> Optional[torch.Tensor]:
    img = imagefiles.load_rgb_or_none(entry)
    return None if img is None else transform(img)


class SeededAugmentation(torch.utils.data.Dataset):
    """Training examples whose random augmentation depends only on (seed, epoch, example index).

    So an epoch's images are the same whatever the number of worker processes or ranks, and a
    run resumed mid-epoch sees exactly the images it would have seen. Set `epoch` before each
    epoch's iterator is created. It lives in shared memory, so persistent worker processes see
    the new value: they take up the new epoch's indices only after the iterator is created.
    """

    def __init__(self, ds: Dataset, transform: Callable, seed: int):
        self.ds = ds.cast_column("image", Image(decode=False))  # decoded by imagefiles.load_rgb
        self.transform, self.seed = transform, seed
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch[0] = value

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        rows = self.ds[list(indices)]
        return [self._example(entry, label, index) for entry, label, index in zip(rows["image"], rows["label"], indices)]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def _example(self, entry: dict, label: int, index: int) -> dict:
        # a generator of its own: the global RNG (dropout, MixUp) is left untouched
        generator = torch.Generator().manual_seed(example_seed(self.seed, self.epoch, index))
        return {"pixel_values": _transformed_or_none(entry, functools.partial(self.transform, generator=generator)),
                "labels": label}


def collate(examples: list[dict], image_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """One batch, images stacked channels-last, the model's memory format: the transforms leave
    pixels in HWC order, so this is a plain copy (cheaper than an NCHW stack, and the main
    process has no layout to convert).

    An image that no longer decodes (None; already warned about by name) keeps its place, filled
    with a copy of another image of the batch (or zeros of `image_size` when none decoded), and
    `valid` says which images count. Batches keep the size every process expects: under DDP the
    processes exchange gradients and metrics batch by batch, and a shorter or empty batch on one
    of them would make the others wait forever."""
    valid = [e["pixel_values"] is not None for e in examples]
    stand_in = next((e["pixel_values"] for e in examples if e["pixel_values"] is not None), None)
    if stand_in is None:
        if image_size is None:
            raise UserError("no image of this batch could be decoded")
        stand_in = torch.zeros(3, image_size, image_size)
    pixels = [e["pixel_values"] if ok else stand_in for e, ok in zip(examples, valid)]
    return {
        "pixel_values": torch.stack([p.permute(1, 2, 0) for p in pixels]).permute(0, 3, 1, 2),
        "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
        "valid": torch.tensor(valid),
    }


def default_workers(num_processes: int, device_type: str) -> int:
    """DataLoader workers per process for a device type ("cpu", "cuda", "mps", ...)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cores // max(1, num_processes))
    if device_type == "cpu":
        # the workers take cores from the model's threads; one worker per 2 cores keeps up and,
        # measured on 2 cores, slows training least (bench/throughput.py). At most 16, as for a
        # GPU: each is a process with its own memory, and 16 decode far more images per second
        # (500-700 each at 224 px) than a CPU trains on.
        return max(1, min(16, per_process // 2))
    if device_type == "mps":
        # Apple silicon: workers start by spawning (macOS), and half or more of the cores are
        # efficiency cores; a few workers, not one per core (not measured here: no Mac).
        return min(4, max(1, per_process - 1))
    # CUDA and other GPUs: decoding is the bottleneck, so every core but the main process's decodes
    return min(16, max(1, per_process - 1))


def pins_memory(device_type: str) -> bool:
    """Page-locked batches make host-to-device copies asynchronous on CUDA (and XPU); MPS shares
    the host's memory and has no pinned memory, and the CPU needs no copy."""
    return device_type in ("cuda", "xpu")


WORKER_NICE = 19  # CPU training: DataLoader workers at the lowest priority (see _init_worker)


def _init_worker(worker_id: int, low_priority: bool = False) -> None:
    """Ctrl-C reaches the whole process group: workers leave it to the main process, which stops
    cleanly after the current step (see resume.StopOnSignal) instead of losing its workers.

    `low_priority` (training on the CPU): the model's threads use every core, and a worker that
    preempts one of them stalls the others at the next barrier, so a small share of CPU for
    decoding cost a large share of the training speed. At nice 19 a worker runs in the gaps the
    model's threads leave (and still gets a small share when there are none); docs/performance.md
    has the measurements."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if low_priority:
        os.nice(WORKER_NICE)


@dataclass(frozen=True)
class LoaderOptions:
    """How a DataLoader runs: worker processes, the device type its batches go to, the image size
    (for a batch of which no image decodes) and the seed of its own generator (None: the global RNG)."""
    workers: int
    device_type: str
    image_size: int
    seed: Optional[int] = None


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, options: LoaderOptions,
                drop_last: bool = False, sampler: Optional[torch.utils.data.Sampler] = None) -> DataLoader:
    """A DataLoader with persistent workers; with a seed, it has its own generator (shuffling and
    worker seeds then never draw from the global RNG). For CUDA, batches go to pinned memory
    (see pins_memory); for the CPU, workers run at low priority (see _init_worker)."""
    workers = options.workers
    generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler, num_workers=workers,
        collate_fn=functools.partial(collate, image_size=options.image_size),
        pin_memory=pins_memory(options.device_type), persistent_workers=workers > 0, drop_last=drop_last,
        prefetch_factor=4 if workers > 0 else None, generator=generator,
        worker_init_fn=(functools.partial(_init_worker, low_priority=options.device_type == "cpu")
                        if workers > 0 else None),
    )


def resolve_pipeline(pipeline: str, device_type: str) -> str:
    """--pipeline auto: the device path on an accelerator, DataLoader workers on a CPU (where the
    workers path keeps up with the model and is measured faster)."""
    if pipeline == "auto":
        return "workers" if device_type == "cpu" else "device"
    return pipeline


@dataclass
class Loaders:
    """The training and validation batches of a run, ready to iterate on this process."""
    train: object
    val: object
    pipeline: str  # "device" or "workers"
    workers: int  # DataLoader workers per process (0 on the device path)


def place_decoded_images(loaders: Loaders, cfg: TrainConfig, accelerator, model) -> None:
    """--pipeline device: move the decoded photos to the training device as --device-cache says.
    Call it once `model`, its optimizer and the EMA are on the device; what the first step will
    still allocate there, the optimizer's state (Adam's two moments), is left out of the free memory."""
    if loaders.pipeline != "device":
        return
    reserve_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    train, val = loaders.train.images, loaders.val.images
    nbytes = train.pixels.numel() + val.pixels.numel()
    where = dd.place_both(train, val, accelerator.device, cfg.device_cache, reserve_bytes)
    accelerator.print(f"device pipeline: {len(train)} + {len(val)} images decoded, {nbytes / 2**30:.2f} GiB in this "
                      f"process, kept on {where} (--device-cache {cfg.device_cache})")


def build_loaders(cfg: TrainConfig, splits: Splits, accelerator, shuffle_seed: int) -> Loaders:
    """The loaders of a TrainConfig for this process, prepared by `accelerator` (the workers path)
    or sharded by this module (the device path: see device_data.py). `splits` holds images at
    evaluation's short side on the device path (resized_splits)."""
    device = accelerator.device
    pipeline = resolve_pipeline(cfg.pipeline, device.type)
    # drop_last: a last batch of one image would crash BatchNorm in training mode
    drop_last = len(splits.train) > cfg.batch_size * accelerator.num_processes
    if pipeline == "device":
        # every process decodes at once, on its share of the cores (no barrier for the others to wait
        # in, which a large set could keep past the collective timeout); the bar is the local main's.
        # On the host until place_decoded_images (once the model and its optimizer are on the device).
        train_images = dd.decode_training_images(splits.train, cfg.image_size)
        val_images = dd.decode_eval_images(splits.val, cfg.image_size)
        shard = dd.Shard(accelerator.process_index, accelerator.num_processes, cfg.batch_size)
        train_pixels = dd.TrainPixels(train_images, cfg.image_size, cfg.seed, device, cfg.channels_last)
        train = dd.DeviceLoader(train_images, shard, train_pixels, shuffle_seed=shuffle_seed, drop_last=drop_last,
                                sampler=cfg.sampler)
        val = dd.DeviceLoader(val_images, shard, dd.EvalPixels(val_images, device, cfg.channels_last))
        return Loaders(train, val, pipeline, 0)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(accelerator.num_processes, device.type)
    options = LoaderOptions(workers=workers, device_type=device.type, image_size=cfg.image_size, seed=cfg.seed)
    augmented = SeededAugmentation(splits.train, train_transform(cfg.image_size), cfg.seed)
    # --sampler balanced: our seeded order (Accelerate shards its batches); random: Accelerate's seedable shuffle
    sampler = (BalancedSampler(augmented, split_labels(splits.train), shuffle_seed)
               if cfg.sampler == "balanced" else None)
    train = make_loader(augmented, cfg.batch_size, shuffle=True, options=options, drop_last=drop_last, sampler=sampler)
    val = make_loader(with_transform(splits.val, eval_transform(cfg.image_size)), cfg.batch_size,
                      shuffle=False, options=options)
    train, val = accelerator.prepare(train, val)
    return Loaders(train, val, pipeline, workers)

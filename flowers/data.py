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
from flowers import duplicates, imagefiles
from flowers.balance import BalancedSampler, split_labels
from flowers.config import TrainConfig
from flowers.errors import UserError
from flowers.runtime import usable_cores
from flowers.transforms import (AugmentStrength, draws_for_image, eval_transform, short_side_resize, train_transform,
                                training_sizes)

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
    # groups of near-duplicate files (paths relative to `source`) kept on one side of the split;
    # the files left out (--exclude) and given another class (--relabel); the cross-validation fold
    # (number, of folds) that is the validation set. All recorded in checkpoints (see recorded_split).
    groups: list[list[str]] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    relabel: dict[str, str] = field(default_factory=dict)
    fold: Optional[tuple[int, int]] = None

    def group_paths(self) -> list[list[str]]:
        """`groups` as absolute paths."""
        return [[os.path.join(self.source, p) for p in group] for group in self.groups]


@dataclass(frozen=True)
class SplitOptions:
    """What decides a split besides seed and fraction (a folder of photos only).

    groups: AUTO finds near-duplicate groups within `duplicate_distance` (a negative distance: none);
    a list (a checkpoint's record) is used as it is; [] is the plain stratified split.
    exclude: paths (relative to the data folder) left out; relabel: path -> class name.
    fold: (number from 1, of K folds): validate on that fold of a K-fold split instead of --val-split."""
    groups: object = AUTO
    duplicate_distance: int = duplicates.DEFAULT_DISTANCE
    exclude: tuple = ()
    relabel: tuple = ()  # ((path, class name), ...): hashable
    fold: Optional[tuple[int, int]] = None


def recorded_split(data_meta: dict) -> SplitOptions:
    """The options that rebuild a checkpoint's split from its meta["data"]; what it does not record
    (checkpoints saved before groups, exclusions and folds were) means none: their plain split."""
    fold = data_meta.get("fold")
    return SplitOptions(groups=[list(g) for g in data_meta.get("groups") or []],
                        exclude=tuple(data_meta.get("exclude") or ()),
                        relabel=tuple(sorted((data_meta.get("relabel") or {}).items())),
                        fold=(int(fold[0]), int(fold[1])) if fold else None)


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


def _load_folder(root: Path, strict: bool = False, options: Optional[SplitOptions] = None
                 ) -> tuple[Dataset, list[str]]:
    """The usable images of a class-per-folder tree (unusable ones reported), and what was skipped;
    `options`' exclusions and new labels applied."""
    scan = imagefiles.scan_folder(root, cache_dir=_cache_root() / "flowers-scans")
    imagefiles.report(scan, strict)
    files = _edited(scan, options) if options else scan.files
    features = Features({"image": Image(), "label": ClassLabel(names=scan.class_names)})
    ds = Dataset.from_dict({"image": [path for path, _ in files], "label": [label for _, label in files]},
                           features=features)
    return ds, [path for path, _ in scan.skipped]


def read_edits(exclude_file: Optional[str], relabel_file: Optional[str], root: Path) -> tuple[tuple, tuple]:
    """(paths to exclude, ((path, class name), ...)) from --exclude and --relabel CSV files: a path per
    row (relative to the data folder, or absolute inside it), for --relabel followed by the class.
    A header row starting with `path` is optional; label_issues.csv works as it is (--relabel reads
    its suggested_label column)."""
    exclude = tuple(sorted({row[0] for row in _csv_rows(exclude_file, "--exclude", root, 1)})) if exclude_file else ()
    relabel = {}
    for row in _csv_rows(relabel_file, "--relabel", root, 2) if relabel_file else []:
        relabel[row[0]] = row[1]
    return exclude, tuple(sorted(relabel.items()))


def _csv_rows(file: str, flag: str, root: Path, columns: int) -> list[list[str]]:
    import csv
    try:
        with open(Path(file).expanduser(), newline="") as f:
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {file}: cannot read it ({type(e).__name__}: {e.strerror if isinstance(e, OSError) else e})") from None
    label_column = 1
    if rows and rows[0][0].strip().lower() == "path":
        header = [cell.strip().lower() for cell in rows[0]]
        label_column = next((header.index(name) for name in ("label", "suggested_label") if name in header), 1)
        rows = rows[1:]
    out = []
    for number, row in enumerate(rows, start=1):
        if len(row) <= (label_column if columns == 2 else 0):
            raise UserError(f"{flag} {file}: row {number} has no {'class' if columns == 2 else 'path'}: {','.join(row)}")
        path = Path(row[0].strip()).expanduser()
        relative = os.path.relpath(path.resolve(), root) if path.is_absolute() else os.path.normpath(path)
        out.append([relative, row[label_column].strip()] if columns == 2 else [relative])
    return out


def _cache_root() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE)


def _edited(scan: imagefiles.FolderScan, options: SplitOptions) -> list[tuple[str, int]]:
    """scan.files without the excluded paths and with the new labels; a path or class that is not
    in the folder is an error (a list meant for other data)."""
    known = {scan.relative(path): (path, label) for path, label in scan.files}
    relabel = dict(options.relabel)
    unknown = sorted((set(options.exclude) | set(relabel)) - set(known))
    if unknown:
        raise UserError(f"{len(unknown)} path(s) of --exclude/--relabel are not images in {scan.root}: "
                        f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
    bad = sorted({name for name in relabel.values() if name not in scan.class_names})
    if bad:
        raise UserError(f"--relabel names class(es) {', '.join(bad)}, not among {', '.join(scan.class_names)}")
    excluded = set(options.exclude)
    return [(path, scan.class_names.index(relabel[rel]) if rel in relabel else label)
            for rel, (path, label) in known.items() if rel not in excluded]


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
                val_from: Optional[str] = AUTO, options: SplitOptions = SplitOptions()) -> Splits:
    """Train/validation splits of a folder or Hub dataset (or a local copy of one: a folder of
    Parquet files per split, as the Hub stores them).

    A folder with train/ and val/ (or validation/) sub-folders is used as given, and so is a Hub
    dataset's own `validation` (or `valid`) split; otherwise the images are split stratified by
    class with `seed`, so every process (and eval.py later) gets exactly the same split.
    `val_from` (Hub datasets): AUTO, a split name, or None to split `train` even when the dataset
    has its own validation split (as checkpoints saved before val_from was recorded did).
    Unusable image files are left out with a warning each (`strict`: an error).
    A folder's split keeps near-duplicate photos on one side and applies `options` (SplitOptions).
    """
    # absolute (recorded in checkpoints: eval.py may run elsewhere) and canonical, so that
    # `../x` and `/abs/x` share the caches of the scan and of --cache-resized
    root = Path(data).expanduser().resolve()
    if root.is_file():
        raise UserError(f"--data {data} is a file; expected a folder with one sub-folder per class")
    if root.is_dir() and not _holds_dataset_files(root):
        pre_split = _pre_split_dirs(root)
        if pre_split:
            if options.exclude or options.relabel or options.fold:
                raise UserError(f"--data {data} is split into {pre_split[0].name}/ and {pre_split[1].name}/ already: "
                                "--exclude, --relabel and cross-validation need one folder per class at its top")
            (train, train_skipped), (val, val_skipped) = (_load_folder(d, strict) for d in pre_split)
            if _label_names(train) != _label_names(val):
                raise UserError(f"{pre_split[0]} and {pre_split[1]} hold different class folders")
            return Splits(train, val, _label_names(train), str(root), train_skipped + val_skipped,
                          val_from=pre_split[1].name)
        full, skipped = _load_folder(root, strict, options)
        photos = True
    elif not root.is_dir() and (data.startswith((".", "/", "~")) or os.path.sep + os.path.sep in data):
        raise UserError(f"--data {data}: no such folder")
    else:
        source = str(root) if root.is_dir() else data
        full, own_val, val_from = _load_hub(source, val_from)
        if own_val is not None:
            if _label_names(own_val) != _label_names(full):
                raise UserError(f"--data {data}: its '{val_from}' split has other classes than its training split")
            return Splits(full, own_val, _label_names(full), source, val_from=val_from)
        skipped, photos = [], False
        if options.exclude or options.relabel or options.fold:
            raise UserError(f"--data {data}: --exclude, --relabel and cross-validation need a folder of photos")
    names = _label_names(full)
    if len(names) < 2:
        raise UserError(f"--data {data} has {len(names)} class(es); need at least 2")
    groups = _groups(full, root, options) if photos else []  # (Hub datasets: images as bytes, no groups)
    members = _group_members(full, root, groups)
    try:
        if options.fold:
            train, val = fold_split(full, options.fold, seed, members)
        else:
            train, val = stratified_split(full, val_split, seed, members)
    except ValueError as e:  # too few images for this fraction, or a class with a single image
        what = f"make {options.fold[1]} folds" if options.fold else f"hold out --val-split {val_split}"
        raise UserError(f"cannot {what} of the {len(full)} images in {data}, stratified by class ({e})") from None
    return Splits(train, val, names, str(root) if root.is_dir() else data, skipped, groups=groups,
                  exclude=sorted(options.exclude), relabel=dict(options.relabel), fold=options.fold)


def _groups(ds: Dataset, root: Path, options: SplitOptions) -> list[list[str]]:
    """The near-duplicate groups (relative paths) the split keeps together: found (AUTO) or given."""
    if options.groups != AUTO:
        return [list(g) for g in options.groups]
    if options.duplicate_distance < 0:
        return []
    paths = image_paths(ds)
    cache = imagefiles.cache_file_for(root, _cache_root() / "flowers-hashes")
    found = duplicates.path_groups(paths, max_distance=options.duplicate_distance, cache_file=cache)
    return [[os.path.relpath(p, root) for p in group] for group in found]


def _group_members(ds: Dataset, root: Path, groups: list[list[str]]) -> list[list[int]]:
    """Each group as row indices of `ds` (files no longer in it are left out; groups of one dropped)."""
    if not groups:
        return []
    row = {os.path.relpath(p, root): i for i, p in enumerate(image_paths(ds)) if p is not None}
    members = [sorted(row[p] for p in group if p in row) for group in groups]
    return [m for m in members if len(m) > 1]


def _units(n: int, labels: np.ndarray, groups: list[list[int]]) -> tuple[list[list[int]], np.ndarray]:
    """The rows as units that the split keeps whole: each group one unit (at its first row, labelled
    by that row's class), every other row a unit of its own; in row order. Without groups, unit i is
    row i, so the split is the plain one."""
    first_of = {g[0]: g for g in groups}
    grouped = {i for g in groups for i in g[1:]}
    units = [first_of.get(i, [i]) for i in range(n) if i not in grouped]
    return units, labels[[u[0] for u in units]]


def _labels(ds: Dataset) -> np.ndarray:
    return ds.with_format("arrow")[:]["label"].to_numpy()  # honours an indices mapping


def stratified_split(ds: Dataset, val_fraction: float, seed: int,
                     groups: Optional[list[list[int]]] = None) -> tuple[Dataset, Dataset]:
    """Without `groups`: exactly `ds.train_test_split(test_size=val_fraction,
    stratify_by_column="label", seed=seed)` (so splits and checkpoints stay comparable across
    versions), and faster on large sets: datasets reads the label column row by row, here it is one
    Arrow column. `groups` (lists of row indices) each land whole on one side: the same split
    drawn over units (see _units), a group counting as one image of its first row's class."""
    units, labels = _units(len(ds), _labels(ds), groups or [])
    n_val = math.ceil(val_fraction * len(units))
    if not 0 < n_val < len(units):
        raise ValueError(f"{n_val} of {len(units)} images would be held out")
    try:
        train_idx, val_idx = next(stratified_shuffle_split_generate_indices(
            labels, len(units) - n_val, n_val, rng=np.random.default_rng(seed)))
    except ValueError as e:
        if str(e) == "Minimum class count error":
            raise ValueError("the least populated class has only 1 image; each class needs at least 2") from None
        raise
    return ds.select([i for u in train_idx for i in units[u]]), ds.select([i for u in val_idx for i in units[u]])


def fold_split(ds: Dataset, fold: tuple[int, int], seed: int,
               groups: Optional[list[list[int]]] = None) -> tuple[Dataset, Dataset]:
    """(the other folds, fold number `fold[0]` of `fold[1]`): each class's units (see _units) in a
    seeded order dealt round the folds, continuing from where the previous class stopped, so every
    fold holds each class's share and the folds' sizes differ by at most one unit."""
    number, folds = fold
    units, labels = _units(len(ds), _labels(ds), groups or [])
    if len(units) < folds:
        raise ValueError(f"{len(units)} images cannot fill {folds} folds")
    rng, fold_of, dealt = np.random.default_rng(seed), np.empty(len(units), dtype=np.int64), 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold_of[members] = (np.arange(len(members)) + dealt) % folds
        dealt += len(members)
    val = [i for u in np.flatnonzero(fold_of == number - 1) for i in units[u]]
    train = [i for u in np.flatnonzero(fold_of != number - 1) for i in units[u]]
    return ds.select(train), ds.select(val)


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

    def __init__(self, ds: Dataset, transform: Callable, seed: int, sizes: Optional[tuple[int, ...]] = None):
        self.ds = ds.cast_column("image", Image(decode=False))  # decoded by imagefiles.load_rgb
        self.transform, self.seed = transform, seed
        self.sizes = sizes  # each epoch's crop size (transforms.training_sizes), else the transform's own
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
        # draws of its own (transforms.draws_for_image): the global RNG (dropout, MixUp) is left untouched
        draws = draws_for_image(self.seed, self.epoch, index)
        size = self.sizes[min(self.epoch, len(self.sizes) - 1)] if self.sizes else None
        return {"pixel_values": _transformed_or_none(entry, functools.partial(self.transform, draws=draws, size=size)),
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
    if dd.node_share() is not None:  # every process of the node has mapped the shared copy: unlink it
        accelerator.wait_for_everyone()
        dd.release_shared(train, val)
    nbytes = train.pixels.numel() + val.pixels.numel()
    where = dd.place_both(train, val, accelerator.device, cfg.device_cache, reserve_bytes)
    shared = train.in_shared_memory and train.pixels.device.type == "cpu"  # still the mapped copy
    accelerator.print(f"device pipeline: {len(train)} + {len(val)} images decoded, {nbytes / 2**30:.2f} GiB "
                      + ("on the host, one copy for this node's processes" if shared else
                         f"in this process, kept on {where}") + f" (--device-cache {cfg.device_cache})")


def augment_strength(cfg: TrainConfig) -> AugmentStrength:
    return AugmentStrength(crop_scale=cfg.crop_scale, affine=cfg.affine, colour_jitter=cfg.colour_jitter)


def build_loaders(cfg: TrainConfig, splits: Splits, accelerator, shuffle_seed: int) -> Loaders:
    """The loaders of a TrainConfig for this process, prepared by `accelerator` (the workers path)
    or sharded by this module (the device path: see device_data.py). `splits` holds images at
    evaluation's short side on the device path (resized_splits)."""
    device = accelerator.device
    pipeline = resolve_pipeline(cfg.pipeline, device.type)
    sizes = training_sizes(cfg.image_size, cfg.resize_from, cfg.epochs)  # --resize-from: a size per epoch
    # drop_last: a last batch of one image would crash BatchNorm in training mode
    drop_last = len(splits.train) > cfg.batch_size * accelerator.num_processes
    if pipeline == "device":
        # once per node, shared by its processes (see device_data.decode_split; no barrier for the others
        # to wait in, which a large set could keep past the collective timeout); the bar is the local
        # main's. On the host until place_decoded_images (once the model and its optimizer are on the device).
        train_images = dd.decode_split("train", splits.train, cfg.image_size)
        val_images = dd.decode_split("val", splits.val, cfg.image_size)
        shard = dd.Shard(accelerator.process_index, accelerator.num_processes, cfg.batch_size)
        train_pixels = dd.TrainPixels(train_images, sizes, cfg.seed, device, cfg.channels_last, augment_strength(cfg))
        train = dd.DeviceLoader(train_images, shard, train_pixels, shuffle_seed=shuffle_seed, drop_last=drop_last,
                                sampler=cfg.sampler)
        val = dd.DeviceLoader(val_images, shard, dd.EvalPixels(val_images, device, cfg.channels_last))
        return Loaders(train, val, pipeline, 0)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(accelerator.num_processes, device.type)
    options = LoaderOptions(workers=workers, device_type=device.type, image_size=cfg.image_size, seed=cfg.seed)
    augmented = SeededAugmentation(splits.train, train_transform(cfg.image_size, strength=augment_strength(cfg)),
                                   cfg.seed, sizes)
    # --sampler balanced: our seeded order (Accelerate shards its batches); random: Accelerate's seedable shuffle
    sampler = (BalancedSampler(augmented, split_labels(splits.train), shuffle_seed)
               if cfg.sampler == "balanced" else None)
    train = make_loader(augmented, cfg.batch_size, shuffle=True, options=options, drop_last=drop_last, sampler=sampler)
    val = make_loader(with_transform(splits.val, eval_transform(cfg.image_size)), cfg.batch_size,
                      shuffle=False, options=options)
    train, val = accelerator.prepare(train, val)
    return Loaders(train, val, pipeline, workers)

"""The checks of bench/gpu.sh, one subcommand each; on a CPU the same code runs at tiny sizes (the
dry run in .ci/run). Each prints lines of `name: value` and exits 0 unless a check failed.

    python bench/gpu_probe.py data DIR --out WORK          # which data: DIR, else generated photos
    python bench/gpu_probe.py sync-warnings --data D --steps 20 [--ema-decay 0.999]
    python bench/gpu_probe.py throughput --data D --batch-sizes 32,128 [--compile]
    python bench/gpu_probe.py epochs --data D --epochs 6 --smi nvidia-smi
    python bench/gpu_probe.py gpu-in-use               # the GPU that nvidia-smi samples are read for
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

GiB = 1024 ** 3
CLASSES = ["daisy", "dandelion", "rose", "sunflower", "tulip"]
# the flower set's most common photo sizes (width, height), for generated stand-ins
PHOTO_SIZES = [(500, 333), (320, 240), (240, 320), (500, 375), (333, 500)]


# ---- which data --------------------------------------------------------------------------------

def data_folder(given: str, work: Path, per_class: int) -> Path:
    """`given` when it holds photos, else `per_class` generated photos per class (smooth noise at
    the flower set's sizes) under `work`."""
    folder = Path(given)  # Path("") is the current folder: no folder given means generate
    if given and folder.is_dir() and any(folder.rglob("*.jpg")):
        count = sum(1 for _ in folder.rglob("*.jpg"))
        print(f"data: {folder} ({count} photos)", file=sys.stderr)
        return folder
    out = work / "generated-photos"
    rng = np.random.default_rng(0)
    from PIL import Image
    for c, name in enumerate(CLASSES):
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = PHOTO_SIZES[(c + i) % len(PHOTO_SIZES)]
            small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
            Image.fromarray(small).resize((width, height), Image.BICUBIC).save(out / name / f"{i}.jpg", quality=90)
    print(f"data: {given or 'no folder given'} has no photos; generated {per_class * len(CLASSES)} photos of the "
          f"flower set's sizes in {out}", file=sys.stderr)
    return out


# ---- the GPU in use and its utilisation ----------------------------------------------------------

def gpu_in_use() -> str:
    """The GPU this process trains on, as nvidia-smi names it: its UUID when torch sees it, else the
    first entry of CUDA_VISIBLE_DEVICES (an index or a UUID), else index 0."""
    if torch.cuda.is_available():
        uuid = str(torch.cuda.get_device_properties(0).uuid)
        return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


class Sampler:
    """nvidia-smi's utilisation and memory of one GPU every 200 ms, each sample stamped on arrival;
    samples that are not numbers (MIG devices report [N/A]) are counted as unavailable."""

    def __init__(self, smi: str, gpu: str):
        self.gpu, self.samples, self.unavailable = gpu, [], 0
        self.process = subprocess.Popen([smi, "--query-gpu=index,uuid,utilization.gpu,memory.used",
                                         "--format=csv,noheader,nounits", "-lms", "200"],
                                        stdout=subprocess.PIPE, text=True, bufsize=1)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _mine(self, index: str, uuid: str) -> bool:
        return self.gpu in (index, uuid) or (self.gpu.startswith(("GPU-", "MIG-")) and uuid.startswith(self.gpu))

    def _read(self) -> None:
        for line in self.process.stdout:
            fields = [f.strip() for f in line.split(",")]
            if len(fields) != 4 or not self._mine(fields[0], fields[1]):
                continue
            try:
                self.samples.append((time.time(), float(fields[2]), float(fields[3])))
            except ValueError:
                self.unavailable += 1

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=5)
        self.thread.join(timeout=5)

    def within(self, windows: list[tuple[float, float]]) -> list[tuple[float, float, float]]:
        return [s for s in self.samples if any(a <= s[0] <= b for a, b in windows)]


# ---- runs of training.fit, hooked -------------------------------------------------------------

class _Enough(Exception):
    pass


def _fit(argv: list[str]) -> None:
    from flowers import training
    from flowers.config import TrainConfig, parse
    sys.argv = ["train.py", *argv]
    training.fit(parse(TrainConfig))


def _set_sync_mode(mode: str) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode(mode)


def sync_warnings(args, common: list[str]) -> int:
    """`args.steps` training steps (after the first, which sets up) under set_sync_debug_mode("warn"):
    the synchronising calls torch warns about (0 on a CPU, where there is nothing to count)."""
    from flowers import training
    counted = {"warnings": 0, "steps": 0, "where": {}}
    train_one_epoch, after_step = training.train_one_epoch, training.Run.after_step

    def stop_after(self, step, stepped):
        result = after_step(self, step, stepped)
        counted["steps"] = step + 1
        if step == 0:
            _set_sync_mode("warn")
        if step + 1 > args.steps:
            raise _Enough
        return result

    def watched(*a, **k):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return train_one_epoch(*a, **k)
            finally:
                _set_sync_mode("default")
                syncs = [w for w in caught if "synchroniz" in str(w.message)]
                counted["warnings"] += len(syncs)
                for w in syncs:
                    where = f"{Path(w.filename).name}:{w.lineno}"
                    counted["where"][where] = counted["where"].get(where, 0) + 1

    training.train_one_epoch, training.Run.after_step = watched, stop_after
    try:
        _fit([*common, "--epochs", "1", "--save-every-steps", "0"])
    except _Enough:
        pass
    label = f"--ema-decay {args.ema_decay}" if args.ema_decay else "no EMA"
    note = "" if torch.cuda.is_available() else " (no CUDA here: nothing to count)"
    print(f"sync warnings in steps 2-{counted['steps']}, {label}: {counted['warnings']}{note}")
    for where, n in sorted(counted["where"].items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {n} x {where}")
    return 0 if counted["warnings"] == 0 else 1


def epochs(args, common: list[str]) -> int:
    """Train `args.epochs` epochs; time epochs 2.. (training and validation; the first epoch's
    warm-up and every checkpoint write are outside the window) and read the GPU in use's
    utilisation over the same window."""
    from flowers import training
    windows: list[list[float]] = []
    train_epoch, save_epoch = training.Run.train_epoch, training.Run.save_epoch

    def timed_train(self, epoch):
        windows.append([time.time(), 0.0])
        return train_epoch(self, epoch)

    def untimed_save(self, result):
        windows[-1][1] = time.time()  # training and validation are done; the save is not timed
        return save_epoch(self, result)

    training.Run.train_epoch, training.Run.save_epoch = timed_train, untimed_save
    gpu = gpu_in_use()
    sampler = Sampler(args.smi, gpu) if args.smi else None
    try:
        _fit([*common, "--epochs", str(args.epochs)])
    finally:
        if sampler:
            sampler.stop()
    timed = [tuple(w) for w in windows[1:]]
    seconds = sum(b - a for a, b in timed)
    print(f"epochs 2-{len(windows)}: {seconds:.2f} s of training + validation "
          f"({seconds / max(1, len(timed)):.2f} s an epoch; 25 epochs at this pace: {25 * seconds / max(1, len(timed)):.1f} s)")
    if not sampler:
        print(f"GPU in use {gpu}: no nvidia-smi here, utilisation not sampled")
    else:
        inside = sampler.within(timed)
        if inside:
            util = [s[1] for s in inside]
            print(f"GPU in use {gpu}: mean utilisation {np.mean(util):.0f}% over {len(inside)} samples "
                  f"(busy in {100 * np.mean(np.array(util) > 0):.0f}% of them), peak memory {max(s[2] for s in inside) / 1024:.1f} GiB"
                  f"; {sampler.unavailable} samples unavailable")
        else:
            print(f"GPU in use {gpu}: utilisation unavailable ({sampler.unavailable} samples not numbers, "
                  f"{len(sampler.samples)} numeric in all, none inside the window)")
    return 0


# ---- model-only vs end-to-end ---------------------------------------------------------------------

def _steps(accelerator, model, optimizer, loss_fn, batches, count: int) -> dict:
    """`count` training steps (after one untimed warm-up step): img/s, host ms a step (the time the
    host spends issuing it) and, on CUDA, device ms a step (CUDA events)."""
    from flowers.engine import EpochOptions, _train_step
    options, cuda = EpochOptions(), torch.cuda.is_available()
    iterator = iter(batches)
    _train_step(accelerator, model, next(iterator), optimizer, None, loss_fn, options)
    if cuda:
        torch.cuda.synchronize()
    host, events, images = 0.0, [], 0
    start = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        batch = next(iterator)
        if cuda:
            events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            events[-1][0].record()
        _train_step(accelerator, model, batch, optimizer, None, loss_fn, options)
        if cuda:
            events[-1][1].record()
        host += time.perf_counter() - t0
        images += len(batch["labels"])
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    out = {"img_s": images / wall, "host_ms": 1000 * host / count}
    if cuda:
        out["device_ms"] = sum(a.elapsed_time(b) for a, b in events) / count
    return out


def _line(name: str, r: dict) -> str:
    device = f", device {r['device_ms']:.2f} ms a step" if "device_ms" in r else ", device time n/a (no CUDA)"
    return f"{name}: {r['img_s']:.0f} img/s, host {r['host_ms']:.2f} ms a step{device}"


def _memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (no CUDA)"
    free, total = torch.cuda.mem_get_info(device)
    return f"allocated {torch.cuda.memory_allocated(device) / GiB:.2f} GiB, free {free / GiB:.1f} of {total / GiB:.1f} GiB"


def throughput(args, common_cfg: dict) -> int:
    """Model-only vs end-to-end training speed for each batch size; memory before and after the
    decoded images are placed, the peak at the largest batch; the host-gather branch forced (same
    pixels, its speed); CUDA vs CPU augmentation of the same draws."""
    import itertools

    from flowers import data, device_data as dd
    from flowers.model import build_model
    from flowers.recipe import make_loss
    from flowers.config import TrainConfig
    from flowers.runtime import make_accelerator
    from flowers.transforms import BatchAugmentation, draws_for_epoch, eval_size, sample_augmentation

    cfg = TrainConfig(**common_cfg)
    accelerator = make_accelerator(cfg.seed, mixed_precision=args.precision)
    device = accelerator.device
    splits = data.load_splits(data.resolve_data(cfg.data), cfg.val_split, cfg.seed)
    splits = data.resized_splits(splits, eval_size(cfg.image_size))
    print(f"memory before placement: {_memory(device)}")
    images = dd.place(dd.decode_training_images(splits.train, cfg.image_size), device)
    print(f"memory after placement: {_memory(device)} ({len(images)} images, {images.pixels.numel() / GiB:.2f} GiB, "
          f"on {images.pixels.device})")
    model = build_model(len(splits.class_names), "none", arch=cfg.arch).to(memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = make_loss(cfg)
    label = " --compile (CUDA graphs)" if args.compile else ""

    def loader(images_at, batch_size):
        shard = dd.Shard(0, 1, batch_size)
        pixels = dd.TrainPixels(images_at, cfg.image_size, cfg.seed, device)
        return dd.DeviceLoader(images_at, shard, pixels, shuffle_seed=1, drop_last=True)

    def epochs_of(made):
        return itertools.chain.from_iterable(made.for_epoch(e) for e in itertools.count())

    for batch_size in args.batch_sizes:
        if device.type == "cuda" and batch_size == max(args.batch_sizes):
            torch.cuda.reset_peak_memory_stats(device)
        fixed = {"pixel_values": torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, device=device)
                 .contiguous(memory_format=torch.channels_last),
                 "labels": torch.zeros(batch_size, dtype=torch.long, device=device),
                 "valid": torch.ones(batch_size, dtype=torch.bool, device=device)}
        model_only = _steps(accelerator, model, optimizer, loss_fn, itertools.repeat(fixed), args.steps)
        end_to_end = _steps(accelerator, model, optimizer, loss_fn, epochs_of(loader(images, batch_size)), args.steps)
        print(_line(f"model only, batch {batch_size}{label}", model_only))
        print(_line(f"end to end, batch {batch_size}{label}", end_to_end)
              + f" ({100 * end_to_end['img_s'] / model_only['img_s']:.0f}% of model-only)")
        if device.type == "cuda" and batch_size == max(args.batch_sizes):
            print(f"peak memory at batch {batch_size}: {torch.cuda.max_memory_allocated(device) / GiB:.2f} GiB")
    if args.compile:
        return 0
    # the host-gather branch: the same images kept on the host, each batch gathered there
    on_host = dd.DecodedImages(images.pixels.cpu(), images.sizes, images.transposed, images.labels, images.valid)
    first = next(iter(loader(images, args.batch_sizes[0]).for_epoch(0)))["pixel_values"]
    gathered = next(iter(loader(on_host, args.batch_sizes[0]).for_epoch(0)))["pixel_values"]
    same = torch.equal(first, gathered)
    r = _steps(accelerator, model, optimizer, loss_fn, epochs_of(loader(on_host, args.batch_sizes[0])), args.steps)
    print(_line(f"host-gather branch forced, batch {args.batch_sizes[0]}", r) + f"; same pixels as on the device: {same}")
    # CUDA vs CPU augmentation of the same draws
    rows = torch.arange(min(32, len(images)))
    heights, widths = np.array([images.sizes[i] for i in rows]).T
    params = sample_augmentation(draws_for_epoch(cfg.seed, 0, len(rows)), widths, heights, cfg.image_size)
    augment = BatchAugmentation(cfg.image_size)
    on_cpu = augment(on_host.pixels[rows], images.transposed[rows], params)
    here = augment(images.pixels[rows.to(images.pixels.device)], images.transposed[rows], params).cpu()
    levels = (here - on_cpu).abs() * torch.tensor([0.229, 0.224, 0.225])[:, None, None] * 255
    print(f"augmentation, {device.type} vs cpu, same draws: max {levels.max():.3f}, mean {levels.mean():.4f} levels of 255")
    return 0 if same else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["data", "sync-warnings", "throughput", "epochs", "gpu-in-use"])
    parser.add_argument("folder", nargs="?", default="")
    parser.add_argument("--out", default=".")
    parser.add_argument("--per-class", type=int, default=570)
    parser.add_argument("--data", default="")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--ema-decay", type=float, default=0.0)
    parser.add_argument("--precision", default=os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--smi", default="")
    parser.add_argument("--work", default=".")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.command == "data":
        print(data_folder(args.folder, Path(args.out), args.per_class))
        return 0
    if args.command == "gpu-in-use":
        print(gpu_in_use())
        return 0
    common = ["--data", args.data, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
              "--weights", "none", "--report-to", "none", "--pipeline", "device", "--cache-resized",
              "--output-dir", str(Path(args.work) / f"{args.command}-{os.getpid()}"),
              *(["--ema-decay", str(args.ema_decay)] if args.ema_decay else [])]
    if args.command == "sync-warnings":
        return sync_warnings(args, common)
    if args.command == "epochs":
        return epochs(args, common)
    return throughput(args, {"data": args.data, "image_size": args.image_size, "pipeline": "device"})


if __name__ == "__main__":
    sys.exit(main())

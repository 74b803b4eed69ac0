"""Does the data pipeline starve the model? Model-only vs end-to-end speed, measured in one run.

    python bench/throughput.py --image-size 128 --batch-size 32 [--data PATH] [--cache-resized]
    accelerate launch --mixed_precision bf16 bench/throughput.py --image-size 224   # on a GPU

(b) end-to-end training: one epoch of the real photos through flowers.data (datasets, transforms,
    DataLoader) and flowers.engine.train_one_epoch, set up with the same functions as fit();
(a) model-only training: the same loop, model, optimizer, precision, memory format and batch size
    on random tensors already in memory; the ratio b/a is the share of model speed we keep;
(c) evaluation the same two ways (flowers.engine.evaluate);
plus the time from command start to the first training step, peak memory, and the plain PyTorch
recipe (bench/plain_recipe.py) measured in the same run. Images/s count from the end of the first
step (worker start-up is in the start-up time instead). Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GiB = 1024 ** 3


def seconds_since_command_start() -> float:
    """Since the kernel created this process, so interpreter start-up and imports count."""
    return time.time() - psutil.Process().create_time()


class PeakMemory:
    """Samples this process and its children (DataLoader workers) in a background thread."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.main_rss = self.tree_rss = self.tree_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "PeakMemory":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    info = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
            self.main_rss = max(self.main_rss, me.memory_info().rss)
            self.tree_rss, self.tree_pss = max(self.tree_rss, rss), max(self.tree_pss, pss)
            self._stop.wait(self.interval_s)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="image folder; default: $FLOWERS_DATA, else data/flower_dataset")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=-1, help="-1: flowers.data.default_workers")
    parser.add_argument("--cache-resized", action="store_true", help="as train.py --cache-resized")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true", help="as train.py --compile")
    parser.add_argument("--model-steps", type=int, default=30, help="model-only training steps measured")
    parser.add_argument("--train-images", type=int, default=None, help="use only this many training images")
    parser.add_argument("--no-plain", dest="plain", action="store_false", help="skip bench/plain_recipe.py")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser.parse_args()


class StepClock:
    """on_step callback for train_one_epoch: when the first step ended, how many images since."""

    def __init__(self, sync, batch_size: int):
        self.sync, self.batch_size = sync, batch_size
        self.first_step_end = None
        self.steps_after_first = 0

    def __call__(self, step: int) -> None:
        if self.first_step_end is None:
            self.sync()
            self.first_step_end = time.perf_counter()
            self.first_step_since_start = seconds_since_command_start()
        else:
            self.steps_after_first += 1


def images_per_s(clock: StepClock, end: float, total_images: int) -> float:
    """Images after the first step over the time after it (the last batch may be partial)."""
    images_after_first = total_images - clock.batch_size
    return images_after_first / (end - clock.first_step_end)


def machine() -> str:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{psutil.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / GiB:.0f} GiB RAM"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_plain(data: str, image_size: int, batch_size: int, steps: int) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / "plain_recipe.py"), "--data", data,
           "--image-size", str(image_size), "--batch-size", str(batch_size), "--max-steps", str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    memory = PeakMemory().start()
    results: dict = {"load_at_start": load()}

    import torch
    from torch import nn

    from flowers import training  # noqa: F401  (everything train.py imports, so start-up compares)
    from flowers.config import TrainConfig
    from flowers.data import (SeededAugmentation, default_workers, load_splits, make_loader, resized_splits,
                              resolve_data, with_transform)
    from flowers.engine import evaluate, train_one_epoch
    from flowers.model import build_model
    from flowers.optim import build_optimizer, build_scheduler
    from flowers.recipe import parameter_groups
    from flowers.runtime import make_accelerator
    from flowers.transforms import eval_size, eval_transform, train_transform
    results["imports_s"] = seconds_since_command_start()

    cfg = TrainConfig(data=args.data, image_size=args.image_size, batch_size=args.batch_size,
                      weights="none", report_to="none", workers=args.workers, channels_last=args.channels_last,
                      cache_resized=args.cache_resized, compile=args.compile)
    accelerator = make_accelerator(cfg.seed, compile=cfg.compile)
    on_gpu = accelerator.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    # The same setup as flowers.training.fit.
    data = resolve_data(cfg.data)
    started = time.perf_counter()
    splits = load_splits(data, cfg.val_split, cfg.seed)
    results["load_split_s"] = time.perf_counter() - started
    if cfg.cache_resized:
        started = time.perf_counter()
        splits = resized_splits(splits, eval_size(cfg.image_size))
        results["cache_resized_s"] = time.perf_counter() - started
    if args.train_images:
        splits.train = splits.train.select(range(min(args.train_images, len(splits.train))))
    model = build_model(len(splits.class_names), cfg.weights, dropout=cfg.dropout)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, parameter_groups(cfg, model))
    workers = cfg.workers if cfg.workers >= 0 else default_workers(accelerator.num_processes, on_gpu)
    train_loader = make_loader(SeededAugmentation(splits.train, train_transform(cfg.image_size), cfg.seed),
                               cfg.batch_size, shuffle=True, workers=workers, pin_memory=on_gpu, seed=cfg.seed,
                               persistent=False, drop_last=len(splits.train) > cfg.batch_size * accelerator.num_processes)
    val_loader = make_loader(with_transform(splits.val, eval_transform(cfg.image_size)), cfg.batch_size,
                             shuffle=False, workers=workers, pin_memory=on_gpu, seed=cfg.seed)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader))
    loss_fn = nn.CrossEntropyLoss()
    results.update(device=str(accelerator.device), precision=accelerator.mixed_precision, workers=workers,
                   threads=torch.get_num_threads(), train_images=len(splits.train), val_images=len(splits.val))

    # (b) end-to-end training, one epoch; its first step also ends the start-up time.
    clock = StepClock(sync, cfg.batch_size)
    stats = train_one_epoch(accelerator, model, train_loader, optimizer, scheduler, loss_fn,
                            channels_last=cfg.channels_last, on_step=clock)
    results["startup_to_first_step_s"] = clock.first_step_since_start
    results["train_end_to_end"] = images_per_s(clock, time.perf_counter(), stats.samples)
    results["train_steps"] = clock.steps_after_first + 1
    results["load_after_train_end_to_end"] = load()

    # (a) model-only training: random batches already in memory (on the device).
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    batch = {"pixel_values": torch.randn(shape, device=accelerator.device),
             "labels": torch.randint(0, len(splits.class_names), (cfg.batch_size,), device=accelerator.device)}
    if cfg.channels_last:
        batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
    clock = StepClock(sync, cfg.batch_size)
    steps = args.model_steps + 1
    train_one_epoch(accelerator, model, [batch] * steps, optimizer, scheduler, loss_fn,
                    channels_last=cfg.channels_last, on_step=clock)
    results["train_model_only"] = images_per_s(clock, time.perf_counter(), steps * cfg.batch_size)

    # (c) evaluation: end-to-end over the validation split (a first pass starts the workers), model-only.
    evaluate(accelerator, model, val_loader, channels_last=cfg.channels_last)
    out = evaluate(accelerator, model, val_loader, channels_last=cfg.channels_last)
    results["eval_end_to_end"] = len(out.labels) / out.seconds
    eval_batches = [batch] * max(2, len(val_loader))
    evaluate(accelerator, model, eval_batches[:2], channels_last=cfg.channels_last)
    out = evaluate(accelerator, model, eval_batches, channels_last=cfg.channels_last)
    results["eval_model_only"] = len(out.labels) / out.seconds
    results["load_after_ours"] = load()
    memory.stop()
    results.update(peak_main_rss_gib=memory.main_rss / GiB, peak_tree_rss_gib=memory.tree_rss / GiB,
                   peak_tree_pss_gib=memory.tree_pss / GiB)
    del train_loader, val_loader  # stop our workers before the plain script runs

    if args.plain and accelerator.is_main_process:
        results["plain"] = run_plain(data, cfg.image_size, cfg.batch_size, results["train_steps"])
        results["load_after_plain"] = load()
    if accelerator.is_main_process:
        report(args, cfg, results)


def report(args: argparse.Namespace, cfg, results: dict) -> None:
    r = results
    print(f"machine: {machine()}; device {r['device']}, precision {r['precision']}, "
          f"{r['threads']} compute threads, {r['workers']} DataLoader workers")
    print(f"config: --image-size {cfg.image_size} --batch-size {cfg.batch_size}"
          f"{' --cache-resized' if cfg.cache_resized else ''}{'' if cfg.channels_last else ' --no-channels-last'}"
          f"{' --compile' if cfg.compile else ''}; {r['train_images']} train / {r['val_images']} val images")
    print(f"load average (1/5/15 min): start {r['load_at_start']}, after ours {r['load_after_ours']}"
          + (f", after plain {r['load_after_plain']}" if "load_after_plain" in r else ""))
    cache = f", cache-resized {r['cache_resized_s']:.1f} s" if "cache_resized_s" in r else ""
    print(f"startup to first training step: {r['startup_to_first_step_s']:.1f} s "
          f"(imports {r['imports_s']:.1f} s, load+split {r['load_split_s']:.1f} s{cache})")
    print(f"train images/s: model-only (a) {r['train_model_only']:.1f}  end-to-end (b) {r['train_end_to_end']:.1f}"
          f"  b/a {r['train_end_to_end'] / r['train_model_only']:.3f}")
    print(f"eval  images/s: model-only {r['eval_model_only']:.1f}  end-to-end (c) {r['eval_end_to_end']:.1f}"
          f"  c/model-only {r['eval_end_to_end'] / r['eval_model_only']:.3f}")
    if "plain" in r:
        plain = r["plain"]["train_images_per_s"]
        print(f"plain PyTorch recipe (bench/plain_recipe.py) end-to-end train: {plain:.1f} img/s; "
              f"ours (b) / plain {r['train_end_to_end'] / plain:.2f}x")
    print(f"peak memory: main process RSS {r['peak_main_rss_gib']:.2f} GiB; with DataLoader workers "
          f"PSS {r['peak_tree_pss_gib']:.2f} GiB (RSS sum {r['peak_tree_rss_gib']:.2f} GiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **r}, indent=2))


if __name__ == "__main__":
    main()

"""Does the data pipeline starve the model? Model-only vs end-to-end speed, measured in one run.

    python bench/throughput.py --image-size 128 --batch-size 32 [--data PATH] [--cache-resized]
    accelerate launch --mixed_precision bf16 bench/throughput.py --image-size 224   # on a GPU

(b) end-to-end training: one epoch of the real photos through flowers.data (datasets, transforms,
    DataLoader) and flowers.engine.train_one_epoch, set up with the same functions as fit();
(a) model-only training: the same loop, model, optimizer, precision, memory format and batch size
    on random tensors already in memory; the ratio b/a is the share of model speed we keep;
(c) evaluation the same two ways (flowers.engine.evaluate);
plus the time from command start to the first training step, peak memory, the plain PyTorch
recipe (bench/plain_recipe.py) for as many steps as (b), and what `accelerate launch` adds to
start-up before the script's first line runs. The first step is start-up, not speed.
The measurements alternate in rounds (b, a, plain; then c, eval model-only): on a shared machine
whose speed drifts by +-20% from minute to minute, that slows each of them alike.
Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
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
    """Peak resident memory of this process and of it plus its children (DataLoader workers).

    A background thread sums the children's RSS every 0.5 s: that is cheap (/proc/PID/statm),
    while PSS (/proc/PID/smaps_rollup, ~40 ms per process) would steal CPU from the measured loop,
    so PSS is only read by `snapshot_pss()` between the measurements. Workers share most of their
    pages with the main process, so the RSS sum over-counts and PSS is the fair total. PSS is split
    into anonymous memory, shared memory (batches in transit) and file pages: the libraries' code
    and the memory-mapped Arrow files (the image cache), page cache the kernel can reclaim.
    """

    PARTS = ("Pss", "Pss_Anon", "Pss_Shmem", "Pss_File")

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.tree_rss = 0
        self.tree_pss = dict.fromkeys(self.PARTS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "PeakMemory":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def main_rss(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the kernel's exact peak

    def _each(self, read) -> list:
        me, values = psutil.Process(), []
        for proc in [me, *me.children(recursive=True)]:
            try:
                values.append(read(proc))
            except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                pass
        return values

    @classmethod
    def _pss_parts(cls, proc: psutil.Process) -> dict:
        parts = dict.fromkeys(cls.PARTS, 0)
        with open(f"/proc/{proc.pid}/smaps_rollup") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in parts:
                    parts[key] = int(value.split()[0]) * 1024
        return parts

    def snapshot_pss(self) -> None:
        per_process = self._each(self._pss_parts)
        total = {k: sum(p[k] for p in per_process) for k in self.PARTS}
        if total["Pss"] > self.tree_pss["Pss"]:
            self.tree_pss = total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tree_rss = max(self.tree_rss, sum(self._each(lambda p: p.memory_info().rss)))
            self._stop.wait(self.interval_s)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="image folder; default: $FLOWERS_DATA, else data/flower_dataset")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=-1, help="-1: flowers.data.default_workers")
    parser.add_argument("--cache-resized", action="store_true", help="as train.py --cache-resized")
    parser.add_argument("--pipeline", default="auto", choices=["auto", "device", "workers"], help="as train.py --pipeline")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true", help="as train.py --compile")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="end-to-end training steps measured (default: one epoch)")
    parser.add_argument("--model-steps", type=int, default=30, help="model-only training steps measured")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleave the measurements in this many rounds, so a machine whose speed drifts "
                             "(a shared VM) slows each of them alike")
    parser.add_argument("--no-plain", dest="plain", action="store_false", help="skip bench/plain_recipe.py")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser.parse_args()


class FirstStep:
    """Marks, counted from command start, when the first batch reaches the training loop (start-up
    ends, training begins) and when the first step has ended."""

    def __init__(self, sync):
        self.sync, self.batch_ready, self.step_done = sync, None, None

    def batches(self, batches):
        for batch in batches:
            if self.batch_ready is None:
                self.batch_ready = seconds_since_command_start()
            yield batch

    def __call__(self, step: int, stepped: bool) -> None:  # on_step callback for train_one_epoch
        if self.step_done is None:
            self.sync()
            self.step_done = seconds_since_command_start()


class Take:
    """The next `n` batches of an endless batch iterator, as the sized loader train_one_epoch wants."""

    def __init__(self, batches, n: int):
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(self.batches, self.n)


def endless(loader):
    while True:
        yield from loader


class Rate:
    """Images and seconds summed over the rounds of one measurement."""

    def __init__(self):
        self.images, self.seconds, self.per_round = 0, 0.0, []

    def add(self, images: int, seconds: float) -> None:
        self.images, self.seconds = self.images + images, self.seconds + seconds
        self.per_round.append(images / seconds)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


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


def launcher_overhead_s() -> float:
    """Seconds from starting `accelerate launch` (one CPU process) to the first line of the script
    it launches: the launcher's own imports, paid before train.py's start-up begins."""
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "first_line.py"
        script.write_text("import time\nprint(time.time())\n")
        started = time.time()
        out = subprocess.run([*cmd, "launch", "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
                              "--num_cpu_threads_per_process", "1", str(script)],
                             check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1]) - started


def main() -> None:
    args = parse_args()
    memory = PeakMemory().start()
    results: dict = {"load_at_start": load()}

    import torch
    from torch import nn

    from flowers import training  # everything train.py imports, so start-up compares
    from flowers.config import TrainConfig
    from flowers.data import (build_loaders, load_splits, place_decoded_images, resized_splits, resolve_data,
                              resolve_pipeline)
    from flowers.engine import EpochOptions, evaluate, train_one_epoch
    from flowers.model import build_model
    from flowers.optim import build_optimizer, build_scheduler
    from flowers.recipe import parameter_groups
    from flowers.runtime import make_accelerator
    from flowers.transforms import eval_size
    results["imports_s"] = seconds_since_command_start()

    cfg = TrainConfig(data=args.data, image_size=args.image_size, batch_size=args.batch_size,
                      weights="none", report_to="none", workers=args.workers, channels_last=args.channels_last,
                      cache_resized=args.cache_resized, compile=args.compile, pipeline=args.pipeline)
    accelerator = make_accelerator(cfg.seed, compile=cfg.compile)
    on_gpu = accelerator.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    # The same setup as flowers.training.fit.
    data = resolve_data(cfg.data)
    started = time.perf_counter()
    splits = load_splits(data, cfg.val_split, cfg.seed)
    results["load_split_s"] = time.perf_counter() - started
    if cfg.cache_resized or resolve_pipeline(cfg.pipeline, accelerator.device.type) == "device":
        started = time.perf_counter()
        splits = resized_splits(splits, eval_size(cfg.image_size))
        results["cache_resized_s"] = time.perf_counter() - started
    model = build_model(len(splits.class_names), cfg.weights, dropout=cfg.dropout, arch=cfg.arch)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, parameter_groups(cfg, model))
    loaders = build_loaders(cfg, splits, accelerator, training.data_order_seed(cfg.seed))
    train_loader, val_loader, workers = loaders.train, loaders.val, loaders.workers
    model, optimizer = accelerator.prepare(model, optimizer)
    place_decoded_images(loaders, cfg, accelerator, model)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    results.update(device=str(accelerator.device), precision=accelerator.mixed_precision, workers=workers,
                   pipeline=loaders.pipeline,
                   threads=torch.get_num_threads(), train_images=len(splits.train), val_images=len(splits.val))

    def timed(fn) -> float:
        sync()
        started = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - started

    # Start-up ends when the first batch reaches the loop; the first step is not counted in (b).
    results["setup_s"] = seconds_since_command_start()
    first = FirstStep(sync)
    batches = endless(train_loader)
    train_one_epoch(accelerator, model, Take(first.batches(batches), 1), optimizer, scheduler, loss_fn,
                    EpochOptions(channels_last=cfg.channels_last, on_step=first))
    results.update(startup_to_first_step_s=first.batch_ready, first_step_done_s=first.step_done)
    memory.snapshot_pss()  # with the workers running

    # (a) model-only: the same loop on a batch of random tensors already in memory (on the device).
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    batch = {"pixel_values": torch.randn(shape, device=accelerator.device),
             "labels": torch.randint(0, len(splits.class_names), (cfg.batch_size,), device=accelerator.device),
             "valid": torch.ones(cfg.batch_size, dtype=torch.bool, device=accelerator.device)}
    if cfg.channels_last:
        batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)

    # Rounds of (b) end-to-end, (a) model-only, then the plain recipe for as many steps as (b).
    e2e_steps = args.train_steps or len(train_loader) - 1
    args.rounds = max(1, min(args.rounds, e2e_steps, args.model_steps))
    train_b, train_a, plain = Rate(), Rate(), Rate()
    for steps_b, steps_a in zip(split(e2e_steps, args.rounds), split(args.model_steps, args.rounds)):
        seconds = timed(lambda: train_one_epoch(accelerator, model, Take(batches, steps_b), optimizer, scheduler,
                                                loss_fn, EpochOptions(channels_last=cfg.channels_last)))
        train_b.add(steps_b * cfg.batch_size, seconds)
        seconds = timed(lambda: train_one_epoch(accelerator, model, [batch] * steps_a, optimizer, scheduler,
                                                loss_fn, EpochOptions(channels_last=cfg.channels_last)))
        train_a.add(steps_a * cfg.batch_size, seconds)
        if args.plain and accelerator.is_main_process:
            out = run_plain(data, cfg.image_size, cfg.batch_size, steps_b + 1)  # its first step is not counted
            plain.add(out["images_after_first"], out["seconds_after_first"])
    results.update(train_end_to_end=train_b.images_per_s, train_model_only=train_a.images_per_s,
                   train_steps=e2e_steps, train_rounds_b_over_a=[b / a for b, a in zip(train_b.per_round, train_a.per_round)])
    if plain.per_round:
        results.update(plain=plain.images_per_s, plain_rounds=plain.per_round)

    # (c) evaluation: rounds of a pass over the validation split and as many in-memory batches.
    eval_batches = [batch] * len(val_loader)
    evaluate(accelerator, model, val_loader, channels_last=cfg.channels_last)  # warm-up
    eval_c, eval_model = Rate(), Rate()
    for _ in range(args.rounds):
        out = evaluate(accelerator, model, val_loader, channels_last=cfg.channels_last)
        eval_c.add(len(out.labels), out.seconds)
        out = evaluate(accelerator, model, eval_batches, channels_last=cfg.channels_last)
        eval_model.add(len(out.labels), out.seconds)
    results.update(eval_end_to_end=eval_c.images_per_s, eval_model_only=eval_model.images_per_s)
    memory.snapshot_pss()  # training and validation workers
    results["load_after_ours"] = load()
    memory.stop()
    if on_gpu:
        results["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
    results.update(peak_main_rss_gib=memory.main_rss / GiB, peak_tree_rss_gib=memory.tree_rss / GiB,
                   peak_tree_pss_gib=memory.tree_pss["Pss"] / GiB,
                   peak_tree_pss_parts_gib={k: v / GiB for k, v in memory.tree_pss.items()})

    if accelerator.is_main_process:
        results["launcher_overhead_s"] = launcher_overhead_s()
        report(args, cfg, results)


def report(args: argparse.Namespace, cfg, results: dict) -> None:
    r = results
    rounds = lambda values: " ".join(f"{v:.2f}" for v in values)  # noqa: E731
    print(f"machine: {machine()}; device {r['device']}, precision {r['precision']}, "
          f"{r['threads']} compute threads, --pipeline {r['pipeline']}, {r['workers']} DataLoader workers")
    print(f"config: --image-size {cfg.image_size} --batch-size {cfg.batch_size}"
          f"{' --cache-resized' if cfg.cache_resized else ''}{'' if cfg.channels_last else ' --no-channels-last'}"
          f"{' --compile' if cfg.compile else ''}; {r['train_images']} train / {r['val_images']} val images; "
          f"{r['train_steps']} end-to-end steps in {args.rounds} rounds")
    print(f"load average (1/5/15 min): start {r['load_at_start']}, end {r['load_after_ours']}")
    cache = f", cache-resized {r['cache_resized_s']:.1f} s" if "cache_resized_s" in r else ""
    setup = r["setup_s"] - r["imports_s"] - r["load_split_s"] - r.get("cache_resized_s", 0)
    print(f"startup to first training step: {r['startup_to_first_step_s']:.1f} s (imports {r['imports_s']:.1f} s, "
          f"load+split {r['load_split_s']:.1f} s{cache}, model and loaders {setup:.1f} s, "
          f"first batch {r['startup_to_first_step_s'] - r['setup_s']:.1f} s); "
          f"first step done at {r['first_step_done_s']:.1f} s")
    print(f"`accelerate launch` adds {r['launcher_overhead_s']:.1f} s before its script's first line "
          f"(`python train.py` runs one process without it)")
    print(f"train images/s: model-only (a) {r['train_model_only']:.1f}  end-to-end (b) {r['train_end_to_end']:.1f}"
          f"  b/a {r['train_end_to_end'] / r['train_model_only']:.3f}  (per round {rounds(r['train_rounds_b_over_a'])})")
    print(f"eval  images/s: model-only {r['eval_model_only']:.1f}  end-to-end (c) {r['eval_end_to_end']:.1f}"
          f"  c/model-only {r['eval_end_to_end'] / r['eval_model_only']:.3f}")
    if "plain" in r:
        print(f"plain PyTorch recipe (bench/plain_recipe.py) end-to-end train: {r['plain']:.1f} img/s "
              f"(per round {rounds(r['plain_rounds'])}); ours (b) / plain {r['train_end_to_end'] / r['plain']:.2f}x")
    if "peak_gpu_allocated_gib" in r:
        print(f"peak GPU memory allocated by torch: {r['peak_gpu_allocated_gib']:.2f} GiB")
    parts = r["peak_tree_pss_parts_gib"]
    print(f"peak memory: main process RSS {r['peak_main_rss_gib']:.2f} GiB; with DataLoader workers "
          f"PSS {r['peak_tree_pss_gib']:.2f} GiB = anonymous {parts['Pss_Anon']:.2f} + shared memory "
          f"{parts['Pss_Shmem']:.2f} + file pages {parts['Pss_File']:.2f} (libraries, memory-mapped image cache); "
          f"RSS sum, counting shared pages in every process, {r['peak_tree_rss_gib']:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **r}, indent=2))


if __name__ == "__main__":
    main()

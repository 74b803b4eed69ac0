"""The Accelerator and the process environment: threads, precision warnings, printing."""

from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def has_gpu() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or bool(mps and mps.is_available())
            or bool(xpu and xpu.is_available()))


def dynamo_backend(compile: bool) -> Optional[str]:
    """torch.compile's backend for --compile: the one `accelerate launch --dynamo_backend` chose
    (ACCELERATE_DYNAMO_BACKEND), else inductor. Without --compile, None leaves it to the launcher."""
    if not compile:
        return None
    chosen = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    return "inductor" if chosen == "no" else chosen


def make_accelerator(seed: int, grad_accum_steps: int = 1, log_with: Optional[list[str]] = None,
                     project_dir: Optional[str] = None, compile: bool = False,
                     mixed_precision: Optional[str] = None) -> Accelerator:
    """One Accelerator for CPU, one GPU or many. `seed` seeds the shuffle order; precision comes
    from `mixed_precision` when given, else from `accelerate launch`/its config."""
    accelerator = Accelerator(
        # With no GPU, force the CPU backend: a multi-process launch then really runs DDP over
        # gloo (without this, a MULTI_GPU config with use_cpu silently runs N separate 1-process jobs).
        cpu=not has_gpu(),
        mixed_precision=mixed_precision,
        dynamo_backend=dynamo_backend(compile),
        gradient_accumulation_steps=grad_accum_steps,
        log_with=log_with or None,
        project_dir=project_dir,
        # Accelerate owns the shuffle order (seeded per epoch), which makes data order resumable.
        # non_blocking: batch copies to a CUDA GPU overlap compute (with pinned memory); not on MPS,
        # where a non-blocking copy of a temporary can deliver garbage (PyTorch #139550, #189690).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed,
                                                  non_blocking=torch.cuda.is_available()),
        # Our scheduler steps once per optimizer step, which we call ourselves.
        step_scheduler_with_optimizer=False,
    )
    _configure_cpu_threads(accelerator)
    _configure_cudnn(accelerator)
    _warn_slow_precision(accelerator)
    return accelerator


def _configure_cpu_threads(accelerator: Accelerator) -> None:
    """Give each CPU process its share of the cores, even when a launcher set OMP_NUM_THREADS=1."""
    if accelerator.device.type != "cpu":
        return
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    torch.set_num_threads(max(1, usable_cores() // max(1, local_procs)))


def _configure_cudnn(accelerator: Accelerator) -> None:
    """On CUDA, cuDNN times its convolution algorithms for each new shape at its first use and keeps
    the fastest: a training run's shapes are fixed (a few batch sizes), so that pays off after the
    first steps. The choice can differ between launches (see docs/reference.md, Reproducibility)."""
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def release_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc only; elsewhere a no-op).

    A training step frees its activations to malloc, which keeps them. A DataLoader worker forked
    after that (the validation workers, at the first evaluation) shares those pages copy-on-write,
    and keeps its own copy of each once the main process reuses it. Trimming first keeps that
    memory out of the workers (measured with bench/throughput.py: docs/performance.md)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _warn_slow_precision(accelerator: Accelerator) -> None:
    if accelerator.device.type != "cpu" or accelerator.mixed_precision == "no":
        return
    if accelerator.mixed_precision == "bf16" and not cpu_has_native_bf16():
        accelerator.print("warning: bf16 on a CPU without native bf16 is many times slower than fp32; "
                          "launch with --mixed_precision no for speed")
    elif accelerator.mixed_precision == "fp16":
        accelerator.print("warning: fp16 mixed precision has no effect on CPU; training runs in fp32")


def _installed_version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # e.g. wandb, where only --report-to none is used
        return "not installed"


def environment(accelerator: Accelerator, model: Optional[torch.nn.Module] = None) -> dict:
    """Where and how this run executes (recorded in checkpoints and tracker runs)."""
    import platform

    import accelerate
    import datasets
    import torchvision

    from flowers import __version__

    env = {
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),
        "mixed_precision": accelerator.mixed_precision,
        "torch_threads": torch.get_num_threads(),
        "versions": {"flowers": __version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "accelerate": accelerate.__version__,
                     "datasets": datasets.__version__, "wandb": _installed_version("wandb"),
                     "python": platform.python_version()},
    }
    if accelerator.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(accelerator.device)
    if model is not None:
        env["model_wrapper"] = type(model).__name__
    return env

"""Which side is the limit? The training loader alone (no model) against the model alone (no loader).

    python bench/loader_vs_model.py --data /path/to/flower_dataset [--image-size 224] [--workers 15 8 24]

Prints the CPU cost of one training image in this process, then, for each worker count, three
epochs of the real training loader (`flowers.data.build_loaders`, --cache-resized), each batch
copied to the device and no model; then, on a GPU, the eager model alone (bf16,
channels_last, batch 32) with and without an AdamW step. When train.py is slower than both, the
two compete for the main process. Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flowers.config import TrainConfig  # noqa: E402
from flowers.data import SeededAugmentation, build_loaders, load_splits, resized_splits  # noqa: E402
from flowers.runtime import make_accelerator  # noqa: E402
from flowers.transforms import eval_size, train_transform  # noqa: E402


def per_image_ms(splits, image_size: int, count: int = 200) -> float:
    ds = SeededAugmentation(splits.train, train_transform(image_size), seed=42)
    count = min(count, len(ds))
    started = time.perf_counter()
    for i in range(count):
        ds[i]
    return (time.perf_counter() - started) / count * 1e3


def loader_epochs(splits, data: str, image_size: int, workers: int, device: torch.device) -> None:
    cfg = TrainConfig(data=data, image_size=image_size, workers=workers, weights="none", report_to="none",
                      pipeline="workers")
    loaders = build_loaders(cfg, splits, make_accelerator(cfg.seed), cfg.seed)
    train, val = loaders.train, loaders.val
    for epoch in range(3):
        train.dataset.epoch = epoch
        started, images, first = time.perf_counter(), 0, None
        for batch in train:
            images += len(batch["pixel_values"].to(device, non_blocking=True))
            first = first or time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        val_images = sum(len(batch["labels"]) for batch in val)
        val_seconds = time.perf_counter() - started
        print(f"workers {workers}, epoch {epoch}: train loader {images / seconds:.0f} img/s ({seconds:.2f} s, "
              f"first batch {first:.2f} s); validation loader {val_images / val_seconds:.0f} img/s", flush=True)


def model_alone(image_size: int, batch_size: int = 32, steps: int = 50) -> None:
    from torchvision.models import resnet18

    x = torch.randn(batch_size, 3, image_size, image_size, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (batch_size,), device="cuda")
    for name, with_optimizer in (("forward + backward", False), ("forward + backward + AdamW", True)):
        model = resnet18(num_classes=5).to("cuda", memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3) if with_optimizer else None

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        print(f"model alone, eager bf16, {name}: {steps * batch_size / (time.perf_counter() - started):.0f} img/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[15, 8, 24])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits = resized_splits(load_splits(args.data, 0.2, seed=42), eval_size(args.image_size))
    print(f"one process: {per_image_ms(splits, args.image_size):.2f} ms of CPU per training image "
          f"at {args.image_size} px", flush=True)
    for workers in args.workers:
        loader_epochs(splits, args.data, args.image_size, workers, device)
    if device.type == "cuda":
        model_alone(args.image_size)


if __name__ == "__main__":
    main()

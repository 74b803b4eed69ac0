"""The host's share of --pipeline device's training batches: what the CPU spends per batch while
the GPU waits, with none of the device's own work counted.

    python bench/host_overhead.py --image-size 224 --batch-size 32 [--host-gather] [--epochs 3]

Prints one JSON line {"host_ms_per_batch", "uploads_per_batch", "device_ops_per_batch"}:
- host_ms_per_batch: the wall time of iterating an epoch of DeviceLoader batches (indexing, the
  epoch's parameter draws and matrices, made ahead of its first batch, packing, uploads, the Python
  of every device op) less the time spent inside the aten ops whose result is on the device (the host's own
  ops, such as the host-gather branch's indexing, count as host time), divided by its batches; the
  median over epochs 2.. (the first warms up). The device is torch's "meta" device: every op is
  dispatched and shape-checked as on a GPU, none executes, so the number does not depend on a GPU.
  The ops are timed in a TorchDispatchMode, whose own Python per op (~5-10 us) stays on the host
  side: about what CUDA's launch path costs per op, which the subtraction leaves out. (Without the
  subtraction `meta` reads far higher: its grid_sampler_2d shape function alone costs ~7 ms a batch
  of 32 at 224 px; stderr gives that wall time too.)
- uploads_per_batch: host-to-device copies per batch (Tensor.to / copy_ from a host tensor to the
  device, counted with a TorchFunctionMode).
- device_ops_per_batch: aten operators per batch whose result is on the device and is not a view
  of another tensor (counted in the same TorchDispatchMode): augmentation and normalisation, and
  the indexing that feeds them. The count with views goes to stderr.
--host-gather keeps the decoded images on the host (the branch for sets that do not fit the
device). The photos are stand-ins of the flower set's sizes (their pixels do not change the host's
work). Host times depend on the machine and its load: say which, and prefer the counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from flowers import device_data as dd  # noqa: E402
from flowers.transforms import eval_size  # noqa: E402

DEVICE = torch.device("meta")
# the flower set's most common sizes at the stored short side: landscape, portrait (lying down), square
SHAPES = [(1.0, 1.5, False), (1.0, 1.5, True), (1.0, 1.0, False), (1.0, 1.33, False)]


def stand_in_images(count: int, image_size: int, host_gather: bool) -> dd.DecodedImages:
    short = eval_size(image_size)
    sizes, transposed = [], []
    for i in range(count):
        _, long_side, lying = SHAPES[i % len(SHAPES)]
        long = int(short * long_side)
        sizes.append((long, short) if lying else (short, long))
        transposed.append(lying)
    canvas = torch.zeros(count, 3, short, 2 * short, dtype=torch.uint8)
    images = dd.DecodedImages(canvas, sizes, torch.tensor(transposed), torch.arange(count) % 5,
                              torch.ones(count, dtype=torch.bool))
    if not host_gather:
        images.pixels = images.pixels.to(DEVICE)
    return images


class CountUploads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.uploads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cuda) and args[0].device.type != DEVICE.type \
                and isinstance(out, torch.Tensor) and out.device.type == DEVICE.type:
            self.uploads += 1
        elif func is torch.Tensor.copy_ and args[0].device.type == DEVICE.type and args[1].device.type != DEVICE.type:
            self.uploads += 1
        return out


class DeviceOps(TorchDispatchMode):
    """Counts and times the aten ops with a result on the device (with and without views)."""

    def __init__(self):
        super().__init__()
        self.ops = self.with_views = 0
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        seconds = time.perf_counter() - start
        outputs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(o, torch.Tensor) and o.device.type == DEVICE.type for o in outputs):
            self.seconds += seconds  # the host's own ops (indexing, packing, gathering) stay host time
            self.with_views += 1
            self.ops += not func.is_view
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--host-gather", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = stand_in_images(args.images, args.image_size, args.host_gather)
    loader = dd.DeviceLoader(images, dd.Shard(0, 1, args.batch_size),
                             dd.TrainPixels(images, args.image_size, seed=0, device=DEVICE), shuffle_seed=1,
                             drop_last=True)
    host_ms, wall_ms = [], []
    for epoch in range(args.epochs):
        ops = DeviceOps()
        with ops:
            start = time.perf_counter()
            batches = sum(1 for _ in loader.for_epoch(epoch))
            wall = time.perf_counter() - start
        wall_ms.append(1000 * wall / batches)
        host_ms.append(1000 * (wall - ops.seconds) / batches)
    uploads = CountUploads()
    with uploads:
        batches = sum(1 for _ in loader.for_epoch(args.epochs))
    print(f"host ms a batch, epochs 1-{args.epochs}: {', '.join(f'{m:.2f}' for m in host_ms)} (wall time with "
          f"meta's shape functions: {', '.join(f'{m:.2f}' for m in wall_ms)}); device ops with views a batch: "
          f"{ops.with_views / batches:.1f}; {'host-gather' if args.host_gather else 'on-device'} branch, "
          f"{args.images} images, {args.image_size} px, batch {args.batch_size}, 1 thread", file=sys.stderr)
    print(json.dumps({"host_ms_per_batch": round(statistics.median(host_ms[1:] or host_ms), 3),
                      "uploads_per_batch": round(uploads.uploads / batches, 2),
                      "device_ops_per_batch": round(ops.ops / batches, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

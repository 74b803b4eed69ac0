"""The host's share of --pipeline device's training batches: what the CPU spends per batch while
the GPU waits, with none of the device's own work counted.

    python bench/host_overhead.py --image-size 224 --batch-size 32 [--host-gather] [--epochs 3]

Prints one JSON line {"host_ms_per_batch", "uploads_per_batch", "device_ops_per_batch"}:
- host_ms_per_batch: wall time of iterating an epoch of DeviceLoader batches (indexing, parameter
  draws, warp and colour matrices, uploads, dispatching every device op), divided by its batches;
  the median over epochs 2.. (the first warms up), work done ahead of the epoch included. The
  device is torch's "meta" device: every op is dispatched and shape-checked as on a GPU, none
  executes, so device time is excluded and the number does not depend on the GPU. `meta`'s shape
  functions (several in Python) cost more than CUDA's launch path, so this is an upper bound;
  stderr gives the host's own share (TrainPixels.plan: parameter draws and matrices) apart.
- uploads_per_batch: host-to-device copies per batch (Tensor.to / copy_ from a host tensor to the
  device, counted with a TorchFunctionMode).
- device_ops_per_batch: aten operators per batch whose result is on the device and is not a view
  of another tensor (counted with a TorchDispatchMode): augmentation and normalisation, and the
  indexing that feeds them. The count with views goes to stderr.
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


class CountDeviceOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.with_views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(o, torch.Tensor) and o.device.type == DEVICE.type for o in outputs):
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
    per_batch, planning = [], [0.0]
    plan = loader.make_pixels.plan

    def timed_plan(*a):
        start = time.perf_counter()
        out = plan(*a)
        planning[0] += time.perf_counter() - start
        return out
    loader.make_pixels.plan = timed_plan
    for epoch in range(args.epochs):
        start, planning[0] = time.perf_counter(), 0.0
        batches = sum(1 for _ in loader.for_epoch(epoch))
        per_batch.append(1000 * (time.perf_counter() - start) / batches)
    loader.make_pixels.plan = plan
    uploads, ops = CountUploads(), CountDeviceOps()
    with uploads, ops:
        batches = sum(1 for _ in loader.for_epoch(args.epochs))
    print(f"host ms a batch, epochs 1-{args.epochs}: {', '.join(f'{m:.2f}' for m in per_batch)}, of which the "
          f"host's own work (TrainPixels.plan: draws and matrices) {1000 * planning[0] / batches:.2f} in the last; "
          "the rest is indexing, packing and dispatching device ops onto meta, whose shape functions are "
          "slower than CUDA's launch path (an upper bound); "
          f"device ops with views a batch: {ops.with_views / batches:.1f}; "
          f"{'host-gather' if args.host_gather else 'on-device'} branch, {args.images} images, "
          f"{args.image_size} px, batch {args.batch_size}, 1 thread", file=sys.stderr)
    print(json.dumps({"host_ms_per_batch": round(statistics.median(per_batch[1:] or per_batch), 3),
                      "uploads_per_batch": round(uploads.uploads / batches, 2),
                      "device_ops_per_batch": round(ops.ops / batches, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

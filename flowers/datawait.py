"""data_wait: the share of an epoch's training time the loop spent waiting for its next batch.

One definition, used by engine.train_one_epoch (each epoch line, history.jsonl, summary.csv and
the trackers) and by benchmarks that measure the host's share of a step: the wall-clock seconds
spent inside the loader's `next()` divided by the epoch's training seconds (the loop from its
first `next()` to the end of its last step).

What `next()` covers depends on the pipeline. The workers path: waiting for a batch the
DataLoader workers have not finished (near 0 when they keep ahead; with pinned memory on CUDA the
copy is queued, not waited for). The device path (device_data.DeviceLoader): the host time spent
producing the batch, drawing each image's augmentation parameters and queueing the device's
pixel work, which the device runs asynchronously; on a CPU the pixel work itself. On a GPU the
model's work is queued too: a host that waits for the device elsewhere (a sync in the step) hides
a slow loader behind it, so data_wait is a lower bound of the time the device sat idle.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator


class DataWait:
    """Iterate over `loader` through this object to count the seconds spent waiting for batches."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def batches(self, loader: Iterable) -> Iterator:
        iterator = iter(loader)  # creating the iterator (starting workers, the sampler's order) counts too
        while True:
            began = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.seconds += time.perf_counter() - began
                return
            self.seconds += time.perf_counter() - began
            yield batch

    def share(self, total_seconds: float) -> float:
        """data_wait: waiting seconds / the epoch's training seconds, in [0, 1]."""
        return min(1.0, self.seconds / total_seconds) if total_seconds > 0 else 0.0

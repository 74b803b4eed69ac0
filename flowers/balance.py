"""Imbalanced classes: class weights for the loss (--class-weights) and a balanced data order
(--sampler balanced), both from the training split's per-class counts.

The balanced order is a function of (shuffle seed, epoch) only, the same on every process, so
exact resume mid-epoch and disjoint shards under DDP hold as they do for the shuffled order:
Accelerate shards its batches (the workers path), device_data.DeviceLoader its rows (the device
path). It has no `set_epoch`: Accelerate would call that with its own per-process counter
(docs/design.md); the epoch is read from the dataset, which resume.epoch_loader sets.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def class_counts(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Images per class (int64, length num_classes)."""
    return torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes)


def inverse_frequency(counts: torch.Tensor) -> torch.Tensor:
    """One weight per class, proportional to 1 / its count and normalised to mean 1 over the
    classes (a class with no images is counted as one, so its weight stays finite)."""
    inverse = 1.0 / counts.clamp(min=1).double()
    return (inverse / inverse.mean()).float()


def loss_class_weights(mode: str, counts: torch.Tensor) -> Optional[torch.Tensor]:
    """--class-weights: None (none) or the inverse-frequency weights (auto)."""
    return inverse_frequency(counts) if mode == "auto" else None


def balanced_order(labels: torch.Tensor, num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """Epoch `epoch`'s data order for --sampler balanced: `num_samples` example indices drawn with
    replacement, each example weighted by 1 / its class's count (every class equally likely per
    draw), from a generator seeded with (seed, epoch) alone."""
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if len(labels) else 1)
    weights = 1.0 / counts[labels].double()
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.multinomial(weights, num_samples, replacement=True, generator=generator)


class BalancedSampler(torch.utils.data.Sampler):
    """--sampler balanced on the workers path: balanced_order for the epoch that `dataset.epoch`
    holds (data.SeededAugmentation's, set by resume.epoch_loader before each epoch's iterator)."""

    def __init__(self, dataset, labels: Sequence[int], seed: int):
        self.dataset, self.seed = dataset, seed
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        return iter(balanced_order(self.labels, len(self.labels), self.seed, self.dataset.epoch).tolist())


def split_labels(ds) -> list[int]:
    """The label of every example of a split (a `datasets.Dataset`), without decoding any image."""
    return list(ds.select_columns(["label"])["label"])

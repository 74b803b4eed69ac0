"""Image pipelines (torchvision.transforms.v2): the report's augmentations for training,
resize + centre crop for evaluation. Geometry runs on uint8 tensors (cheaper than float)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalised_float(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def train_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """The report's augmentation: random resized crop, flip, rotation, colour jitter, affine."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(15),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
        v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.9, 1.1)),
        *_to_normalised_float(mean, std),
    ])


def eval_size(image_size: int) -> int:
    """Short side before the centre crop, in the usual 256/224 ratio."""
    return int(round(image_size * 256 / 224))


def eval_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(eval_size(image_size), antialias=True),
        v2.CenterCrop(image_size),
        *_to_normalised_float(mean, std),
    ])

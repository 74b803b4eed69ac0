"""Image pipelines (torchvision.transforms.v2): the report's augmentations for training,
resize + centre crop for evaluation. Both work on uint8 pixels and convert to float last."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageStat
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = np.array([0.299, 0.587, 0.114])  # the grey of ITU-R 601, as torchvision's rgb_to_grayscale


class ColorJitterMatrix:
    """Random brightness, contrast, saturation and hue, in random order, like v2.ColorJitter, but
    composed into one 3x4 colour matrix that PIL applies in a single C pass over the uint8 pixels
    (4x cheaper; the HSV hue shift alone costs more than all other augmentations together).
    Hue is a rotation about the grey axis, the usual linear stand-in for an HSV hue shift; values
    are clipped once at the end rather than after every step."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue})")

    @staticmethod
    def _factor(spread: float) -> float:
        return float(torch.empty(1).uniform_(1 - spread, 1 + spread))

    def _step(self, kind: int, mean_rgb: np.ndarray) -> np.ndarray:
        """One jitter step as a 4x4 affine matrix on homogeneous RGB; `mean_rgb` is the current mean."""
        step = np.eye(4)
        if kind == 0:
            step[:3, :3] *= self._factor(self.brightness)
        elif kind == 1:  # blend with the mean grey of the image
            c = self._factor(self.contrast)
            step[:3, :3] *= c
            step[:3, 3] = (1 - c) * float(LUMA @ mean_rgb)
        elif kind == 2:  # blend with the pixel's own grey
            s = self._factor(self.saturation)
            step[:3, :3] = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), LUMA)
        else:
            angle = 2 * math.pi * float(torch.empty(1).uniform_(-self.hue, self.hue))
            axis = np.ones(3) / math.sqrt(3)
            cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
            step[:3, :3] = (math.cos(angle) * np.eye(3) + math.sin(angle) * cross
                            + (1 - math.cos(angle)) * np.outer(axis, axis))
        return step

    def __call__(self, img: Image.Image) -> Image.Image:
        mean_rgb = np.array(ImageStat.Stat(img.reduce(4) if min(img.size) >= 16 else img).mean[:3])
        matrix = np.eye(4)
        for kind in torch.randperm(4).tolist():
            current_mean = (matrix @ np.append(mean_rgb, 1.0))[:3]
            matrix = self._step(kind, current_mean) @ matrix
        return img.convert("RGB", tuple(matrix[:3].ravel().tolist()))


class ToNormalisedTensor:
    """RGB PIL image -> float32 CHW tensor, normalised with `mean` and `std` (on the 0-1 scale).

    Same values as v2.ToImage + ToDtype + Normalize, 3x cheaper: the pixels stay in their HWC
    order (a CHW view is returned), and the scale and shift are applied as flat per-element
    vectors, which vectorise, instead of broadcasting over a channel axis of length 3, which doesn't.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = tuple(mean), tuple(std)
        self._scale = 1 / (255 * torch.tensor(self.std))
        self._shift = -torch.tensor(self.mean) / torch.tensor(self.std)
        self._flat_scale = self._flat_shift = torch.empty(0)  # repeated per pixel, grown on demand

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={list(self.mean)}, std={list(self.std)})"

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(img if img.mode == "RGB" else img.convert("RGB")))
        n = pixels.numel()
        if len(self._flat_scale) < n:
            self._flat_scale, self._flat_shift = self._scale.repeat(n // 3), self._shift.repeat(n // 3)
        flat = pixels.view(-1).float().mul_(self._flat_scale[:n]).add_(self._flat_shift[:n])
        return flat.view(pixels.shape).permute(2, 0, 1)


def train_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """The report's augmentation: random resized crop, flip, rotation, affine, colour jitter.

    The steps run on the PIL image (C code on uint8), 2-3x faster than the same steps on tensors,
    which matters on a small CPU where decoding competes with training. Rotation (+-15 degrees) and
    the affine shift/scale are one warp: the same random transform, resampled once instead of twice.
    """
    return v2.Compose([
        v2.RandomResizedCrop(image_size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1)),
        ColorJitterMatrix(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
        ToNormalisedTensor(mean, std),
    ])


def eval_size(image_size: int) -> int:
    """Short side before the centre crop, in the usual 256/224 ratio."""
    return int(round(image_size * 256 / 224))


def short_side_resize(short_side: int) -> v2.Resize:
    """Scale an image so its short side is `short_side`: evaluation's first step, and what
    --cache-resized stores (so evaluation on the cache sees the same pixels)."""
    return v2.Resize(short_side, antialias=True)


def eval_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    return v2.Compose([
        short_side_resize(eval_size(image_size)),
        v2.CenterCrop(image_size),
        ToNormalisedTensor(mean, std),
    ])

"""Image pipelines: the report's augmentation for training, resize + centre crop for evaluation.

Training augmentation has one parameter sampler (sample_augmentation: every random draw of an
image, from its own seeded generator) and two executors of those parameters: augment_pil on one
PIL image (DataLoader workers, --pipeline workers) and BatchAugmentation on a batch of uint8
tensors on any device (--pipeline device). Both work on uint8 pixels and normalise last."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageStat
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = np.array([0.299, 0.587, 0.114])  # the grey of ITU-R 601, as torchvision's rgb_to_grayscale


JITTER = (0.2, 0.2, 0.2, 0.05)  # the report's colour jitter: brightness, contrast, saturation, hue
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def colour_matrices(order: torch.Tensor, factors: torch.Tensor, mean_rgb: torch.Tensor) -> torch.Tensor:
    """The 3x4 colour matrices (on homogeneous RGB, 0-255 scale) of a batch of colour jitters.

    `order` (B, 4): the steps' order (BRIGHTNESS, CONTRAST, SATURATION, HUE); `factors` (B, 4): each
    step's factor by kind (the hue's as a fraction of a turn); `mean_rgb` (B, 3): each image's mean
    colour before the jitter. Contrast blends with the mean grey of the image as it is at its turn,
    so the steps compose in order; the others do not depend on the pixels. Batched tensor maths, so
    that the PIL executor (one image, float64) and the device executor (a batch, float32, no host
    sync) compute the same matrices. Hue is a rotation about the grey axis, the usual linear
    stand-in for an HSV hue shift."""
    dtype, device, n = mean_rgb.dtype, mean_rgb.device, len(order)
    luma, cross = _colour_constants(dtype, device)
    eye = torch.eye(4, dtype=dtype, device=device)
    brightness, contrast, saturation, hue = factors.to(dtype).unbind(1)
    steps = eye.repeat(n, 4, 1, 1)  # (B, kind, 4, 4)
    steps[:, BRIGHTNESS, :3, :3] = brightness[:, None, None] * eye[:3, :3]
    steps[:, CONTRAST, :3, :3] = contrast[:, None, None] * eye[:3, :3]  # its shift follows the mean, below
    steps[:, SATURATION, :3, :3] = (saturation[:, None, None] * eye[:3, :3]
                                    + (1 - saturation)[:, None, None] * luma.expand(3, 3))
    angle = 2 * math.pi * hue
    axis = torch.full((3,), 1 / math.sqrt(3), dtype=dtype, device=device)
    steps[:, HUE, :3, :3] = (angle.cos()[:, None, None] * eye[:3, :3] + angle.sin()[:, None, None] * cross
                             + (1 - angle.cos())[:, None, None] * torch.outer(axis, axis))
    matrix = eye.repeat(n, 1, 1)
    mean = torch.cat([mean_rgb, torch.ones(n, 1, dtype=dtype, device=device)], dim=1)[:, :, None]
    rows = torch.arange(n, device=device)
    for position in range(4):
        kind = order[:, position].to(device)
        step = steps[rows, kind]
        grey = (matrix @ mean)[:, :3, 0] @ luma  # the mean grey of the image as it is now
        shift = torch.where(kind == CONTRAST, (1 - contrast) * grey, torch.zeros_like(grey))
        step[:, :3, 3] = shift[:, None]
        matrix = step @ matrix
    return matrix[:, :3]


@functools.lru_cache(maxsize=None)
def _colour_constants(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The grey weights and the hue rotation's cross-product matrix, made on the host and copied to
    `device` once (torch.tensor(..., device=cuda) would make the host wait for the device)."""
    luma = torch.tensor(LUMA, dtype=dtype)
    cross = torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]], dtype=dtype) / math.sqrt(3)
    return upload(luma, device), upload(cross, device)


def draw_jitter(spread: tuple[float, float, float, float] = JITTER,
                generator: Optional[torch.Generator] = None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A random order of the four steps and each step's factor (drawn in that order): brightness,
    contrast and saturation in [1 - s, 1 + s], the hue in [-s, s] of a turn."""
    order = tuple(torch.randperm(4, generator=generator).tolist())
    factors = [1.0, 1.0, 1.0, 0.0]
    for kind in order:
        low, high = (-spread[kind], spread[kind]) if kind == HUE else (1 - spread[kind], 1 + spread[kind])
        factors[kind] = _uniform(low, high, generator)
    return order, tuple(factors)


def _jitter_step(kind: int, factor: float, mean_rgb: np.ndarray) -> np.ndarray:
    """One jitter step as a 4x4 matrix on homogeneous RGB; `mean_rgb` is the image's mean now."""
    step = np.eye(4)
    if kind == BRIGHTNESS:
        step[:3, :3] *= factor
    elif kind == CONTRAST:  # blend with the mean grey of the image
        step[:3, :3] *= factor
        step[:3, 3] = (1 - factor) * float(LUMA @ mean_rgb)
    elif kind == SATURATION:  # blend with the pixel's own grey
        step[:3, :3] = factor * np.eye(3) + (1 - factor) * np.outer(np.ones(3), LUMA)
    else:
        angle, axis = 2 * math.pi * factor, np.ones(3) / math.sqrt(3)
        cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        step[:3, :3] = (math.cos(angle) * np.eye(3) + math.sin(angle) * cross
                        + (1 - math.cos(angle)) * np.outer(axis, axis))
    return step


def jitter_pil(img: Image.Image, order: tuple[int, ...], factors: tuple[float, ...]) -> Image.Image:
    """Apply one colour jitter as a single 3x4 matrix in one C pass of PIL over the uint8 pixels
    (far cheaper than the four steps of v2.ColorJitter, whose HSV hue shift alone costs more than
    all other augmentations together); values are clipped once, at the end. The matrix is
    colour_matrices' for one image, composed in numpy: for a single image the batched torch
    version costs more than the rest of the augmentation (tests check that both agree)."""
    mean_rgb = np.array(ImageStat.Stat(img.reduce(4) if min(img.size) >= 16 else img).mean[:3])
    matrix = np.eye(4)
    for kind in order:
        matrix = _jitter_step(kind, factors[kind], (matrix @ np.append(mean_rgb, 1.0))[:3]) @ matrix
    return img.convert("RGB", tuple(matrix[:3].ravel().tolist()))


class ColorJitterMatrix:
    """Random brightness, contrast, saturation and hue, in random order, like v2.ColorJitter, as
    one colour matrix (see colour_matrices and jitter_pil)."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float):
        self.spread = (brightness, contrast, saturation, hue)

    def __repr__(self) -> str:
        return "{}(brightness={}, contrast={}, saturation={}, hue={})".format(type(self).__name__, *self.spread)

    def __call__(self, img: Image.Image, generator: Optional[torch.Generator] = None) -> Image.Image:
        return jitter_pil(img, *draw_jitter(self.spread, generator))


class ToNormalisedTensor:
    """RGB PIL image -> float32 CHW tensor, normalised with `mean` and `std` (on the 0-1 scale).

    Same values as v2.ToImage + ToDtype + Normalize, cheaper: the pixels stay in their HWC
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


# The report's augmentation (besides JITTER): torchvision's RandomResizedCrop, RandomHorizontalFlip
# and RandomAffine with these settings.
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
ROTATION, TRANSLATE, SCALE = 15.0, 0.1, (0.9, 1.1)  # degrees; fraction of the side; zoom range


def example_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one training example's augmentation. Reduced modulo 2**64 (the generator's seed
    range; larger seeds, from --seed 1844666 on, made manual_seed raise): seeds below that keep
    their value, so every run that worked before draws the same images and resumes bit-identically."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**64


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`, without making the host wait for the device's queued
    work: on CUDA the copy is from page-locked memory, so it is queued like a kernel. On the CPU
    the tensor itself. Elsewhere a plain copy: on MPS a non-blocking copy of a temporary can deliver
    garbage (PyTorch issues #139550, #189690)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    if device.type == "cpu":
        return tensor
    return tensor.to(device)


def _uniform(low: float, high: float, generator: Optional[torch.Generator]) -> float:
    return torch.empty(1).uniform_(low, high, generator=generator).item()


@dataclass(frozen=True)
class AugmentParams:
    """One training image's random draw, which both executors apply: crop (top, left, height, width)
    in the source image, resized to the output size; a horizontal flip; then an affine warp about
    the centre (degrees, pixels, zoom); then the colour jitter (see colour_matrices)."""
    crop: tuple[int, int, int, int]
    flip: bool
    angle: float
    translate: tuple[int, int]
    scale: float
    colour_order: tuple[int, ...]
    colour_factors: tuple[float, ...]


def _random_resized_crop(width: int, height: int, generator: Optional[torch.Generator]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box, drawn exactly as it draws it (so seeds draw what they drew)."""
    area, log_ratio = height * width, torch.log(torch.tensor(CROP_RATIO))
    for _ in range(10):
        target_area = area * _uniform(*CROP_SCALE, generator)
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return top, left, h, w
    ratio = width / height  # no box fits: the central crop nearest in aspect ratio
    w = width if ratio <= max(CROP_RATIO) else int(round(height * max(CROP_RATIO)))
    h = height if ratio >= min(CROP_RATIO) else int(round(width / min(CROP_RATIO)))
    return (height - h) // 2, (width - w) // 2, h, w


def sample_augmentation(width: int, height: int, size: int,
                        generator: Optional[torch.Generator] = None) -> AugmentParams:
    """The one parameter sampler of the training augmentation, for an image of width x height
    pixels and an output of size x size. Draws in the order and from the distributions of
    torchvision's RandomResizedCrop, RandomHorizontalFlip and RandomAffine, then the colour jitter.
    Every draw comes from `generator` (the default generator when None): seeded per image, it makes
    the augmentation a function of (seed, epoch, image) on any device, so exact resume holds."""
    crop = _random_resized_crop(width, height, generator)
    flip = torch.rand(1, generator=generator).item() < 0.5
    angle = _uniform(-ROTATION, ROTATION, generator)
    shift = float(TRANSLATE * size)
    translate = (int(round(_uniform(-shift, shift, generator))), int(round(_uniform(-shift, shift, generator))))
    scale = _uniform(*SCALE, generator)
    order, factors = draw_jitter(JITTER, generator)
    return AugmentParams(crop, flip, angle, translate, scale, order, factors)


def augment_pil(img: Image.Image, params: AugmentParams, size: int) -> Image.Image:
    """The PIL executor (DataLoader workers): torchvision's own operations on the uint8 image,
    which in C on a small CPU are faster than the same steps on tensors."""
    img = TF.resized_crop(img, *params.crop, size=[size, size], antialias=True)
    if params.flip:
        img = TF.horizontal_flip(img)
    img = TF.affine(img, angle=params.angle, translate=list(params.translate), scale=params.scale, shear=[0.0, 0.0],
                    interpolation=InterpolationMode.NEAREST, fill=0)
    return jitter_pil(img, params.colour_order, params.colour_factors)


class ReportAugmentation:
    """The report's augmentation (random resized crop, flip, rotation, affine, colour jitter) of
    one PIL image, normalised to a float tensor: sample_augmentation + augment_pil."""

    def __init__(self, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.image_size, self.to_tensor = image_size, ToNormalisedTensor(mean, std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, {self.to_tensor})"

    def __call__(self, img: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        params = sample_augmentation(img.width, img.height, self.image_size, generator)
        return self.to_tensor(augment_pil(img, params, self.image_size))


def train_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ReportAugmentation:
    return ReportAugmentation(image_size, mean, std)


def _warp_matrices(params: list[AugmentParams], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, two 3x3 maps on homogeneous coordinates: output pixel -> crop pixel (the inverse
    of the affine warp about the centre, as torchvision's affine computes it) and crop pixel ->
    source pixel (undo the flip, then scale and shift into the crop box). Pixel coordinates are
    continuous, pixel k covering [k, k + 1), as PIL and grid_sample(align_corners=False) use them."""
    # whole-batch tensor maths: a Python loop over the images cost the host ~50 us an image
    f64 = torch.float64
    n, centre = len(params), size / 2
    angle = torch.tensor([p.angle for p in params], dtype=f64).deg2rad()
    scale = torch.tensor([p.scale for p in params], dtype=f64)
    shift = torch.tensor([p.translate for p in params], dtype=f64) + centre
    top, left, height, width = torch.tensor([p.crop for p in params], dtype=f64).unbind(1)
    flip = torch.tensor([p.flip for p in params])
    cos, sin = angle.cos() / scale, angle.sin() / scale
    inverse_affine, to_source = torch.eye(3, dtype=f64).repeat(2, n, 1, 1)
    inverse_affine[:, :2, :2] = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)
    inverse_affine[:, :2, 2] = centre - (inverse_affine[:, :2, :2] @ shift[:, :, None])[:, :, 0]
    to_source[:, 0, 0] = torch.where(flip, -width, width) / size
    to_source[:, 0, 2] = left + torch.where(flip, width, torch.zeros_like(width))
    to_source[:, 1, 1] = height / size
    to_source[:, 1, 2] = top
    return inverse_affine, to_source


def _normalised_coords(size_x: float, size_y: float) -> torch.Tensor:
    """The 3x3 map from pixel coordinates of a size_x x size_y image to grid_sample's [-1, 1]."""
    return torch.tensor([[2 / size_x, 0, -1], [0, 2 / size_y, -1], [0, 0, 1]], dtype=torch.float64)


class BatchAugmentation:
    """The device executor: the same augmentation (parameters from sample_augmentation) applied to
    a batch of uint8 images on any device. The crop, flip, rotation and affine compose into one
    2x3 matrix per image and are resampled once (F.affine_grid + F.grid_sample, bilinear); the
    colour jitter is one 3x4 matrix per image (a batched matmul); then normalisation. No host sync:
    the matrices are built on the host and copied ahead of the kernels that use them.

    The images come in a fixed canvas (N, 3, H, W): image i fills the top-left of its canvas,
    transposed when `transposed[i]` (portrait photos are stored lying down, so one
    canvas shape fits both orientations). Differences from the PIL executor: bilinear resampling
    in one step instead of an antialiased resize then a nearest-neighbour warp, and colours not
    rounded to uint8 in between (see tests/test_device_pipeline.py for the measured tolerance)."""

    def __init__(self, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last: bool = True):
        self.image_size, self.normalise = image_size, DeviceNormalise(mean, std, channels_last)

    PLAN_COLUMNS = 20  # per image: two 2x3 sampling matrices, the colour steps' order and factors

    def plan(self, canvas_size: tuple[int, int], transposed: torch.Tensor, params: list[AugmentParams]) -> torch.Tensor:
        """The host's part of a batch, as float32 rows (N, PLAN_COLUMNS) to be copied to the device
        in one piece: the grid of the crop and of the canvas (canvas_size: width, height) as 2x3
        matrices, the colour jitter's order and factors (all exact in float32)."""
        n, size = len(params), self.image_size
        inverse_affine, to_source = _warp_matrices(params, size)
        out_to_crop = inverse_affine @ torch.linalg.inv(_normalised_coords(size, size))
        swap = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
        lying = transposed.cpu()[:, None, None]
        source_to_canvas = torch.where(lying, swap, torch.eye(3, dtype=torch.float64))
        to_canvas = _normalised_coords(*canvas_size) @ source_to_canvas @ to_source @ out_to_crop
        crop_grid_theta = (_normalised_coords(size, size) @ out_to_crop)[:, :2]
        thetas = torch.stack([crop_grid_theta, to_canvas[:, :2]], dim=1).float().reshape(n, 12)
        colour = torch.tensor([(*p.colour_order, *p.colour_factors) for p in params], dtype=torch.float32)
        return torch.cat([thetas, colour.reshape(n, 8)], dim=1)

    def apply(self, canvas: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        """The device's part: `canvas` (N, 3, H, W) augmented as `plan` (on its device) says."""
        n, size = len(plan), self.image_size
        thetas = plan[:, :12].reshape(n, 2, 2, 3)
        shape = [n, 3, size, size]
        # outside the crop the PIL executor's warp fills black: so does this one, not the photo around the crop
        in_crop = F.affine_grid(thetas[:, 0], shape, align_corners=False).abs().amax(dim=-1) <= 1
        grid = F.affine_grid(thetas[:, 1], shape, align_corners=False)
        pixels = F.grid_sample(canvas.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        pixels = pixels * in_crop[:, None]
        colour = colour_matrices(plan[:, 12:16].long(), plan[:, 16:20], pixels.mean(dim=(2, 3)))
        pixels = torch.baddbmm(colour[:, :, 3:], colour[:, :, :3], pixels.flatten(2)).clamp_(0, 255)
        return self.normalise(pixels.view(shape))

    def __call__(self, canvas: torch.Tensor, transposed: torch.Tensor, params: list[AugmentParams]) -> torch.Tensor:
        plan = self.plan((canvas.shape[-1], canvas.shape[-2]), transposed, params)
        return self.apply(canvas, upload(plan, canvas.device))


class DeviceNormalise:
    """uint8 (or 0-255 float) pixels (N, 3, H, W) -> normalised float32 on their device, with the
    same float operations as ToNormalisedTensor, so evaluation pixels are identical on both paths.
    Written channels-last (the model's layout, see --channels-last) unless `channels_last` is
    False; the scale and shift are copied to each device once, without a host sync."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last: bool = True):
        self.scale = (1 / (255 * torch.tensor(std)))[:, None, None]
        self.shift = (-torch.tensor(mean) / torch.tensor(std))[:, None, None]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        device = pixels.device
        if device not in self._on_device:
            self._on_device[device] = (upload(self.scale, device), upload(self.shift, device))
        scale, shift = self._on_device[device]
        out = torch.empty(pixels.shape, dtype=torch.float32, device=device, memory_format=self.memory_format)
        return torch.mul(pixels, scale, out=out).add_(shift)


def eval_size(image_size: int) -> int:
    """Short side before the centre crop, in the usual 256/224 ratio."""
    return int(round(image_size * 256 / 224))


def short_side_resize(short_side: int) -> v2.Resize:
    """Scale an image so its short side is `short_side`: evaluation's first step, and what
    --cache-resized stores (so evaluation on the cache sees the same pixels)."""
    return v2.Resize(short_side, antialias=True)


def eval_pixels(image_size: int) -> v2.Compose:
    """Evaluation's uint8 steps: resize (short side eval_size) and centre crop."""
    return v2.Compose([short_side_resize(eval_size(image_size)), v2.CenterCrop(image_size)])


def eval_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    return v2.Compose([eval_pixels(image_size), ToNormalisedTensor(mean, std)])

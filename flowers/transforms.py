"""Image pipelines: the report's augmentation for training, resize + centre crop for evaluation.

Training augmentation has one parameter sampler (sample_augmentation: an image's parameters from
its row of uniform draws, draws_for_epoch / draws_for_image) and two executors of those parameters:
augment_pil on one PIL image (DataLoader workers, --pipeline workers) and BatchAugmentation on a
batch of uint8 tensors on any device (--pipeline device). Both work on uint8 pixels and normalise
last."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace
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

# The report's augmentation (besides JITTER): torchvision's RandomResizedCrop, RandomHorizontalFlip
# and RandomAffine with these settings.
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
ROTATION, TRANSLATE, SCALE = 15.0, 0.1, (0.9, 1.1)  # degrees; fraction of the side; zoom range


@dataclass(frozen=True)
class AugmentStrength:
    """How strong the training augmentation is (--crop-scale, --affine, --colour-jitter): the
    smallest area RandomResizedCrop keeps, and whether the RandomAffine warp and the colour jitter
    are drawn. The default is the report's. Only the distributions change, never the draws an image
    uses, so a weaker augmentation resumes exactly like the report's."""
    crop_scale: float = CROP_SCALE[0]
    affine: bool = True
    colour_jitter: bool = True


REPORT_STRENGTH = AugmentStrength()


# ---- the random draws ----------------------------------------------------------------------------
# Every random number of an image's training augmentation is one of its row of DRAW_COLUMNS uniform
# draws in [0, 1). Row i of epoch e comes from one PCG64 stream seeded by (seed, e), at offset
# i * DRAW_COLUMNS: a function of (seed, epoch, index) alone, so an epoch's images are the same for
# any number of workers or ranks and a resumed run sees exactly what it would have seen. The device
# pipeline draws a whole epoch at once (a few ms for the flower set); a DataLoader worker jumps to
# its image's row. Version 1 (before AUGMENTATION_DRAWS) drew each image from a torch.Generator of its
# own, ~67 us an image on the host: the GPU pipeline's host budget is ~30 us an image in all.
AUGMENTATION_DRAWS = 2  # recorded in checkpoints: a run saved with other draws cannot resume exactly
CROP_TRIES = 10  # RandomResizedCrop's tries at a box inside the image, then the central crop
_AREA, _RATIO, _TOP, _LEFT = (slice(k * CROP_TRIES, (k + 1) * CROP_TRIES) for k in range(4))
_FLIP, _ANGLE, _SHIFT_X, _SHIFT_Y, _SCALE = range(4 * CROP_TRIES, 4 * CROP_TRIES + 5)
_ORDER = slice(4 * CROP_TRIES + 5, 4 * CROP_TRIES + 9)
_FACTORS = slice(4 * CROP_TRIES + 9, 4 * CROP_TRIES + 13)
DRAW_COLUMNS = 4 * CROP_TRIES + 13


def _stream(seed: int, epoch: int) -> np.random.PCG64:
    return np.random.PCG64(np.random.SeedSequence((seed, epoch)))


def _unit(raw: np.ndarray) -> np.ndarray:
    """uint64 words -> float64 in [0, 1) from their top 53 bits (the bit generator's raw stream is
    stable across numpy versions; its Generator methods need not be)."""
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53


def draws_for_epoch(seed: int, epoch: int, count: int) -> np.ndarray:
    """(count, DRAW_COLUMNS) uniform draws: row i is image i's in `epoch`."""
    return _unit(_stream(seed, epoch).random_raw(count * DRAW_COLUMNS)).reshape(count, DRAW_COLUMNS)


def draws_for_image(seed: int, epoch: int, index: int) -> np.ndarray:
    """(1, DRAW_COLUMNS): image `index`'s row of draws_for_epoch, without drawing the rows before it."""
    stream = _stream(seed, epoch)
    stream.advance(index * DRAW_COLUMNS)
    return _unit(stream.random_raw(DRAW_COLUMNS))[None]


def _between(u: np.ndarray, low: float, high: float) -> np.ndarray:
    return low + (high - low) * u


def jitter_from_draws(u_order: np.ndarray, u_factors: np.ndarray,
                      spread: tuple[float, float, float, float] = JITTER) -> tuple[np.ndarray, np.ndarray]:
    """Colour jitters from uniform draws (n, 4) and (n, 4): a random order of the four steps (the
    ranks of the first draws) and each step's factor by kind: brightness, contrast and saturation in
    [1 - s, 1 + s], the hue in [-s, s] of a turn."""
    spread_ = np.asarray(spread, dtype=np.float64)
    low = np.where(np.arange(4) == HUE, -spread_, 1 - spread_)
    return np.argsort(u_order, axis=1, kind="stable"), low + 2 * spread_ * u_factors


# ---- colour jitter as one affine map ---------------------------------------------------------------

def colour_maps(order: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A batch of colour jitters as affine maps of RGB (0-255 scale): pixel -> L @ pixel + K @ mean,
    where `mean` is the image's mean colour before the jitter. Returns L and K, (n, 3, 3) each.

    `order` (n, 4): the steps' order (BRIGHTNESS, CONTRAST, SATURATION, HUE); `factors` (n, 4): each
    step's factor by kind (the hue's as a fraction of a turn). Every step is linear except contrast,
    which blends with the mean grey of the image as it is at its turn: a linear function of the
    starting mean, so the whole jitter composes here, on the host, in float64, and the device only
    multiplies by its images' means (see BatchAugmentation.apply). Hue is a rotation about the grey
    axis, the usual linear stand-in for an HSV hue shift. One image or many: jitter_pil uses it too."""
    n = len(order)
    eye = np.eye(3)
    brightness, contrast, saturation, hue = np.asarray(factors, dtype=np.float64).T
    steps = np.empty((n, 4, 3, 3))
    steps[:, BRIGHTNESS] = brightness[:, None, None] * eye
    steps[:, CONTRAST] = contrast[:, None, None] * eye
    steps[:, SATURATION] = saturation[:, None, None] * eye + (1 - saturation)[:, None, None] * LUMA
    angle = 2 * math.pi * hue
    axis = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / math.sqrt(3)
    steps[:, HUE] = (np.cos(angle)[:, None, None] * eye + np.sin(angle)[:, None, None] * cross
                     + (1 - np.cos(angle))[:, None, None] * np.outer(axis, axis))
    linear, of_mean = np.broadcast_to(eye, (n, 3, 3)), np.zeros((n, 3, 3))
    rows = np.arange(n)
    for position in range(4):
        kind = order[:, position]
        step = steps[rows, kind]
        # contrast adds (1 - c) x the mean grey now, luma @ (linear + of_mean) @ mean, to every channel
        blend = np.where(kind == CONTRAST, 1 - contrast, 0.0)[:, None, None]
        grey_now = LUMA @ (linear + of_mean)  # (n, 3): the grey as a function of the starting mean
        linear, of_mean = step @ linear, step @ of_mean + blend * grey_now[:, None, :]
    return linear, of_mean


def jitter_pil(img: Image.Image, order: np.ndarray, factors: np.ndarray) -> Image.Image:
    """Apply one colour jitter (`order`, `factors`: (4,) each) as a single 3x4 matrix in one C pass
    of PIL over the uint8 pixels (far cheaper than the four steps of v2.ColorJitter, whose HSV hue
    shift alone costs more than all other augmentations together); values are clipped once, at the
    end."""
    mean_rgb = np.array(ImageStat.Stat(img.reduce(4) if min(img.size) >= 16 else img).mean[:3])
    linear, of_mean = colour_maps(np.asarray(order)[None], np.asarray(factors)[None])
    matrix = np.concatenate([linear[0], (of_mean[0] @ mean_rgb)[:, None]], axis=1)
    return img.convert("RGB", tuple(matrix.ravel().tolist()))


class ColorJitterMatrix:
    """Random brightness, contrast, saturation and hue, in random order, like v2.ColorJitter, as
    one colour matrix (see colour_maps and jitter_pil); draws from numpy's global generator."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float):
        self.spread = (brightness, contrast, saturation, hue)

    def __repr__(self) -> str:
        return "{}(brightness={}, contrast={}, saturation={}, hue={})".format(type(self).__name__, *self.spread)

    def __call__(self, img: Image.Image) -> Image.Image:
        order, factors = jitter_from_draws(np.random.random((1, 4)), np.random.random((1, 4)), self.spread)
        return jitter_pil(img, order[0], factors[0])


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



@dataclass(frozen=True)
class AugmentParams:
    """Training images' random draws, one row per image, which both executors apply: the crop
    (top, left, height, width) in the source image, resized to the output size; a horizontal flip;
    then an affine warp about the centre (degrees, pixels, zoom); then the colour jitter (the steps'
    order and their factors, see colour_maps)."""
    crop: np.ndarray  # (n, 4) int
    flip: np.ndarray  # (n,) bool
    angle: np.ndarray  # (n,)
    translate: np.ndarray  # (n, 2) int
    scale: np.ndarray  # (n,)
    colour_order: np.ndarray  # (n, 4) int
    colour_factors: np.ndarray  # (n, 4)

    def __len__(self) -> int:
        return len(self.flip)

    def __getitem__(self, rows) -> "AugmentParams":
        """The rows `rows` (an int keeps its row as a batch of one)."""
        rows = [rows] if isinstance(rows, (int, np.integer)) else rows
        return AugmentParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def replace(self, **changes) -> "AugmentParams":
        return replace(self, **{name: np.broadcast_to(value, getattr(self, name).shape).copy()
                                for name, value in changes.items()})


def _random_resized_crops(draws: np.ndarray, widths: np.ndarray, heights: np.ndarray,
                          crop_scale: float = CROP_SCALE[0]) -> np.ndarray:
    """RandomResizedCrop's boxes (n, 4: top, left, height, width), drawn from its distributions: up to
    CROP_TRIES boxes of a random area and aspect ratio, the first that fits, at a random place in
    the image; the central crop nearest in aspect ratio when none fits."""
    widths, heights = np.asarray(widths, dtype=np.int64)[:, None], np.asarray(heights, dtype=np.int64)[:, None]
    area = heights * widths * _between(draws[:, _AREA], crop_scale, CROP_SCALE[1])
    aspect = np.exp(_between(draws[:, _RATIO], *np.log(CROP_RATIO)))
    w = np.round(np.sqrt(area * aspect)).astype(np.int64)
    h = np.round(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths) & (h > 0) & (h <= heights)
    first, rows = fits.argmax(axis=1), np.arange(len(draws))
    w, h = w[rows, first], h[rows, first]
    widths, heights = widths[:, 0], heights[:, 0]
    top = np.floor(draws[rows, _TOP.start + first] * (heights - h + 1)).astype(np.int64)
    left = np.floor(draws[rows, _LEFT.start + first] * (widths - w + 1)).astype(np.int64)
    # no box fits: the central crop nearest in aspect ratio
    ratio = widths / heights
    central_w = np.where(ratio <= max(CROP_RATIO), widths, np.round(heights * max(CROP_RATIO)).astype(np.int64))
    central_h = np.where(ratio >= min(CROP_RATIO), heights, np.round(widths / min(CROP_RATIO)).astype(np.int64))
    none_fits = ~fits.any(axis=1)
    w, h = np.where(none_fits, central_w, w), np.where(none_fits, central_h, h)
    top = np.where(none_fits, (heights - h) // 2, top)
    left = np.where(none_fits, (widths - w) // 2, left)
    return np.stack([top, left, h, w], axis=1)


def sample_augmentation(draws: np.ndarray, widths: np.ndarray, heights: np.ndarray, size: int,
                        strength: AugmentStrength = REPORT_STRENGTH) -> AugmentParams:
    """The one parameter sampler of the training augmentation: images of widths x heights pixels,
    an output of size x size, each image's parameters from its row of uniform `draws` (n,
    DRAW_COLUMNS), with the distributions of torchvision's RandomResizedCrop, RandomHorizontalFlip
    and RandomAffine, then the colour jitter, as strong as `strength` says (a step turned off is
    the identity: no warp, or factors 1 and hue 0). Vectorised over the rows."""
    rotation, shift, zoom = (ROTATION, float(TRANSLATE * size), SCALE) if strength.affine else (0.0, 0.0, (1.0, 1.0))
    order, factors = jitter_from_draws(draws[:, _ORDER], draws[:, _FACTORS],
                                       JITTER if strength.colour_jitter else (0.0,) * 4)
    return AugmentParams(
        crop=_random_resized_crops(draws, widths, heights, strength.crop_scale),
        flip=draws[:, _FLIP] < 0.5,
        angle=_between(draws[:, _ANGLE], -rotation, rotation),
        translate=np.round(_between(draws[:, [_SHIFT_X, _SHIFT_Y]], -shift, shift)).astype(np.int64),
        scale=_between(draws[:, _SCALE], *zoom),
        colour_order=order, colour_factors=factors)


def augment_pil(img: Image.Image, params: AugmentParams, size: int) -> Image.Image:
    """The PIL executor (DataLoader workers): torchvision's own operations on the uint8 image,
    which in C on a small CPU are faster than the same steps on tensors. `params`: one image's."""
    img = TF.resized_crop(img, *params.crop[0].tolist(), size=[size, size], antialias=True)
    if params.flip[0]:
        img = TF.horizontal_flip(img)
    img = TF.affine(img, angle=float(params.angle[0]), translate=params.translate[0].tolist(),
                    scale=float(params.scale[0]), shear=[0.0, 0.0], interpolation=InterpolationMode.NEAREST, fill=0)
    return jitter_pil(img, params.colour_order[0], params.colour_factors[0])


class ReportAugmentation:
    """The report's augmentation (random resized crop, flip, rotation, affine, colour jitter; as
    strong as `strength`) of one PIL image, normalised to a float tensor: sample_augmentation +
    augment_pil."""

    def __init__(self, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 strength: AugmentStrength = REPORT_STRENGTH):
        self.image_size, self.to_tensor, self.strength = image_size, ToNormalisedTensor(mean, std), strength

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, {self.strength}, {self.to_tensor})"

    def __call__(self, img: Image.Image, draws: Optional[np.ndarray] = None, size: Optional[int] = None) -> torch.Tensor:
        """`draws`: the image's row (1, DRAW_COLUMNS) (draws_for_image); numpy's global generator's when
        None. `size`: this epoch's crop size (--resize-from), else image_size."""
        draws = np.random.random((1, DRAW_COLUMNS)) if draws is None else draws
        size = size or self.image_size
        params = sample_augmentation(draws, [img.width], [img.height], size, self.strength)
        return self.to_tensor(augment_pil(img, params, size))


def train_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    strength: AugmentStrength = REPORT_STRENGTH) -> ReportAugmentation:
    return ReportAugmentation(image_size, mean, std, strength)


def _warp_matrices(params: AugmentParams, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image, two 3x3 maps on homogeneous coordinates: output pixel -> crop pixel (the inverse
    of the affine warp about the centre, as torchvision's affine computes it) and crop pixel ->
    source pixel (undo the flip, then scale and shift into the crop box). Pixel coordinates are
    continuous, pixel k covering [k, k + 1), as PIL and grid_sample(align_corners=False) use them."""
    n, centre = len(params), size / 2
    angle, scale = np.deg2rad(params.angle), params.scale
    shift = params.translate + centre
    top, left, height, width = params.crop.astype(np.float64).T
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    inverse_affine, to_source = np.tile(np.eye(3), (2, n, 1, 1))
    inverse_affine[:, :2, :2] = np.stack([np.stack([cos, sin], 1), np.stack([-sin, cos], 1)], 1)
    inverse_affine[:, :2, 2] = centre - (inverse_affine[:, :2, :2] @ shift[:, :, None])[:, :, 0]
    to_source[:, 0, 0] = np.where(params.flip, -width, width) / size
    to_source[:, 0, 2] = left + np.where(params.flip, width, 0.0)
    to_source[:, 1, 1] = height / size
    to_source[:, 1, 2] = top
    return inverse_affine, to_source


def _normalised_coords(size_x: float, size_y: float) -> np.ndarray:
    """The 3x3 map from pixel coordinates of a size_x x size_y image to grid_sample's [-1, 1]."""
    return np.array([[2 / size_x, 0, -1], [0, 2 / size_y, -1], [0, 0, 1]])


@functools.lru_cache(maxsize=None)
def _output_grid(size: int, device: torch.device) -> torch.Tensor:
    """(size * size, 3): each output pixel's centre in grid_sample's [-1, 1] coordinates (x, y, 1),
    row by row, as F.affine_grid(align_corners=False) makes them; on `device`, made once."""
    centres = (2 * torch.arange(size, dtype=torch.float32) + 1) / size - 1
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return upload(torch.stack([x, y, torch.ones_like(x)], dim=-1).reshape(size * size, 3), device)


class BatchAugmentation:
    """The device executor: the same augmentation (parameters from sample_augmentation) applied to
    a batch of uint8 images on any device. The crop, flip, rotation and affine compose into one
    2x3 matrix per image and are resampled once (grid_sample, bilinear); the colour jitter is one
    affine map per image (a batched matmul); then normalisation. No host sync: everything that
    does not depend on the pixels is composed on the host (plan) and copied ahead of the kernels
    that use it (apply), about 15 device ops a batch.

    The images come in a fixed canvas (N, 3, H, W): image i fills the top-left of its canvas,
    transposed when `transposed[i]` (portrait photos are stored lying down, so one
    canvas shape fits both orientations). Differences from the PIL executor: bilinear resampling
    in one step instead of an antialiased resize then a nearest-neighbour warp, and colours not
    rounded to uint8 in between (see tests/test_device_pipeline.py for the measured tolerance)."""

    def __init__(self, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last: bool = True):
        self.image_size, self.normalise = image_size, DeviceNormalise(mean, std, channels_last)

    # per image: the sampling maps of the crop and of the canvas (2x3 each, transposed: 3x4), the
    # colour map's L and K (3x3 each)
    PLAN_COLUMNS = 30

    def plan(self, canvas_size: tuple[int, int], transposed: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """The host's part of a batch, as float32 rows (N, PLAN_COLUMNS) to be copied to the device
        in one piece: each output pixel's position in the crop (to tell the crop from the black fill
        around it) and in the canvas (canvas_size: width, height), and the colour map."""
        n, size = len(params), self.image_size
        inverse_affine, to_source = _warp_matrices(params, size)
        out_to_crop = inverse_affine @ np.linalg.inv(_normalised_coords(size, size))
        swap = np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]])
        lying = np.asarray(transposed.cpu())[:, None, None]
        source_to_canvas = np.where(lying, swap, np.eye(3))
        to_canvas = _normalised_coords(*canvas_size) @ source_to_canvas @ to_source @ out_to_crop
        crop_grid = (_normalised_coords(size, size) @ out_to_crop)[:, :2]
        # (n, 3, 4): output (x, y, 1) -> crop (x, y), canvas (x, y), for one matmul on the device
        sampling = np.concatenate([crop_grid, to_canvas[:, :2]], axis=1).transpose(0, 2, 1)
        linear, of_mean = colour_maps(params.colour_order, params.colour_factors)
        return torch.from_numpy(np.concatenate([sampling.reshape(n, 12), linear.reshape(n, 9), of_mean.reshape(n, 9)],
                                               axis=1)).float()

    def apply(self, canvas: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        """The device's part: `canvas` (N, 3, H, W) augmented as `plan` (on its device) says."""
        n, size = len(plan), self.image_size
        coords = _output_grid(size, plan.device) @ plan[:, :12].view(n, 3, 4)  # (n, size * size, 4)
        # outside the crop the PIL executor's warp fills black: so does this one, not the photo around the crop
        in_crop = coords[..., :2].abs().amax(dim=-1) <= 1
        pixels = F.grid_sample(canvas.float(), coords[..., 2:].view(n, size, size, 2), mode="bilinear",
                               padding_mode="zeros", align_corners=False).flatten(2) * in_crop[:, None]
        shift = torch.bmm(plan[:, 21:].view(n, 3, 3), pixels.mean(dim=2, keepdim=True))
        pixels = torch.baddbmm(shift, plan[:, 12:21].view(n, 3, 3), pixels).clamp_(0, 255)
        return self.normalise(pixels.view(n, 3, size, size))

    def __call__(self, canvas: torch.Tensor, transposed: torch.Tensor, params: AugmentParams) -> torch.Tensor:
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


def training_sizes(image_size: int, resize_from: int, epochs: int) -> tuple[int, ...]:
    """Each epoch's training crop size (0-based): --image-size throughout, or with --resize-from a
    linear ramp from resize_from at the first epoch to image_size at three quarters of the run,
    rounded to 16 px (few distinct shapes: cuDNN and torch.compile tune each once), then image_size."""
    if not resize_from or epochs <= 1:
        return (image_size,) * max(1, epochs)
    ramp = max(1, round(0.75 * (epochs - 1)))
    sizes = []
    for epoch in range(epochs):
        size = resize_from + (image_size - resize_from) * min(1.0, epoch / ramp)
        low, high = sorted((resize_from, image_size))
        sizes.append(min(high, max(low, int(round(size / 16)) * 16)))
    return tuple(sizes)


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

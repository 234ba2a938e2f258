"""Multi-crop augmentation for TIPSv2: one global crop for the teacher / masked student, M local crops.

Each crop is a random resized crop (the usual algorithm: area fraction uniform in `scale`, aspect ratio
log-uniform in `ratio`, up to 10 attempts, then a centre crop clamped to `ratio`), resized with PIL
(bicubic by default, antialiased when shrinking; bilinear on request), then a horizontal flip with
probability `flip_prob`. PIL, numpy and torch only: torchvision cannot load beside CPU torch here.

Every crop draws its box and then its flip coin, global crop first and local crops after, always the
same number of draws: two configs that differ only in `flip_prob` see the same boxes for the same rng.
Outputs are float RGB in [0, 1], channels first, no mean/std normalisation (the model expects that).
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np
import torch
from PIL import Image

PATCH_SIZE = 14          # pixels; every crop side must be a multiple of it
MAX_ATTEMPTS = 10        # random boxes tried before the centre-crop fallback


class Interpolation(enum.Enum):
    BICUBIC = Image.Resampling.BICUBIC
    BILINEAR = Image.Resampling.BILINEAR


def _check_range(name: str, value: tuple[float, float], *, low: float, high: float) -> None:
    if not (low < value[0] <= value[1] <= high):
        raise ValueError(f"{name} must satisfy {low} < min <= max <= {high}, got {value}")


def check_patch_multiple(name: str, size: int) -> None:
    if size <= 0 or size % PATCH_SIZE:
        raise ValueError(f"{name} must be a positive multiple of {PATCH_SIZE} pixels, got {size}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CropConfig:
    global_size: int = 224                       # pixels, side of the square global crop
    global_scale: tuple[float, float] = (0.32, 1.0)   # area fraction of the source image
    local_size: int = 98                         # pixels, side of each local crop
    local_scale: tuple[float, float] = (0.05, 0.32)   # area fraction of the source image
    local_crops: int = 6                         # M local crops per example (0 for distillation)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # width / height of the box, sampled log-uniformly
    flip_prob: float = 0.5                       # probability of a horizontal flip, per crop
    interpolation: Interpolation = Interpolation.BICUBIC

    def __post_init__(self) -> None:
        check_patch_multiple("global_size", self.global_size)
        check_patch_multiple("local_size", self.local_size)
        _check_range("global_scale", self.global_scale, low=0.0, high=1.0)
        _check_range("local_scale", self.local_scale, low=0.0, high=1.0)
        _check_range("ratio", self.ratio, low=0.0, high=math.inf)
        if self.local_crops < 0:
            raise ValueError(f"local_crops must be >= 0, got {self.local_crops}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")

    @classmethod
    def high_resolution(cls, **changes) -> CropConfig:
        """The high-resolution stage: 448 px global crop, 140 px local crops."""
        return cls(**({"global_size": 448, "local_size": 140} | changes))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CropBox:
    top: int             # pixels from the top edge of the source image
    left: int            # pixels from the left edge
    height: int          # pixels
    width: int           # pixels
    fallback: bool       # True when all attempts failed and the centre crop was used


@dataclasses.dataclass(frozen=True, kw_only=True)
class Crops:
    global_crop: torch.Tensor    # (3, G, G) float32 in [0, 1]
    local_crops: torch.Tensor    # (M, 3, L, L) float32 in [0, 1]


def sample_crop_box(width: int, height: int, *, scale: tuple[float, float], ratio: tuple[float, float],
                    rng: np.random.Generator) -> CropBox:
    """A random box of the source image (width x height pixels) for a random resized crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(MAX_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return CropBox(top=top, left=left, height=h, width=w, fallback=False)
    return _centre_box(width, height, ratio=ratio)


def _centre_box(width: int, height: int, *, ratio: tuple[float, float]) -> CropBox:
    """The largest centred box of the image whose aspect is clamped into `ratio`."""
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, max(1, min(height, round(width / ratio[0])))
    elif aspect > ratio[1]:
        w, h = max(1, min(width, round(height * ratio[1]))), height
    else:
        w, h = width, height
    return CropBox(top=(height - h) // 2, left=(width - w) // 2, height=h, width=w, fallback=True)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [0, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)          # (H, W, 3)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)


def resized_crop(image: Image.Image, box: CropBox, *, size: int, flip: bool,
                 interpolation: Interpolation = Interpolation.BICUBIC) -> torch.Tensor:
    """Cut `box` out of `image`, resize it to size x size pixels, optionally mirror it -> (3, size, size)."""
    pil_box = (box.left, box.top, box.left + box.width, box.top + box.height)
    crop = image.resize((size, size), resample=interpolation.value, box=pil_box)
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(crop)


def _random_crop(image: Image.Image, *, size: int, scale: tuple[float, float], cfg: CropConfig,
                 rng: np.random.Generator) -> torch.Tensor:
    box = sample_crop_box(image.width, image.height, scale=scale, ratio=cfg.ratio, rng=rng)
    flip = bool(rng.random() < cfg.flip_prob)        # always drawn, so boxes never depend on flip_prob
    return resized_crop(image, box, size=size, flip=flip, interpolation=cfg.interpolation)


def make_crops(image: Image.Image, *, rng: np.random.Generator, cfg: CropConfig) -> Crops:
    """One global crop (3, G, G) and cfg.local_crops local crops (M, 3, L, L) of an image."""
    image = image.convert("RGB")
    global_crop = _random_crop(image, size=cfg.global_size, scale=cfg.global_scale, cfg=cfg, rng=rng)
    locals_ = [_random_crop(image, size=cfg.local_size, scale=cfg.local_scale, cfg=cfg, rng=rng)
               for _ in range(cfg.local_crops)]
    local_crops = (torch.stack(locals_) if locals_
                   else torch.empty(0, 3, cfg.local_size, cfg.local_size))
    return Crops(global_crop=global_crop, local_crops=local_crops)


def resize_for_eval(image: Image.Image, size: int | tuple[int, int], *,
                    interpolation: Interpolation = Interpolation.BICUBIC) -> torch.Tensor:
    """Plain resize of the whole image (no crop, no randomness) -> (3, H, W) float in [0, 1].

    `size` is a side in pixels (square output) or (height, width); each a multiple of 14.
    """
    height, width = (size, size) if isinstance(size, int) else size
    check_patch_multiple("eval height", height)
    check_patch_multiple("eval width", width)
    return to_tensor(image.convert("RGB").resize((width, height), resample=interpolation.value))

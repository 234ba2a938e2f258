"""Patch masks for the masked student (iBOT / iBOT++): True = patch replaced by the mask token.

A mask is a flat bool array over the row-major patch grid, shape (h * w,), with exactly
round(ratio * h * w) True entries whatever the kind:
- RANDOM: a uniformly random subset of patches.
- BLOCK: BEiT-style rectangles (area uniform in [block_min_patches, remaining], aspect log-uniform in
  `block_aspect`, each adding at least one and at most `remaining` new patches) until the target is
  reached or 10 tries in a row add nothing; then topped up (or trimmed) at random to the exact count.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np

BLOCK_ATTEMPTS = 10      # rectangles tried per block before giving up on blocks


class MaskKind(enum.Enum):
    RANDOM = "random"
    BLOCK = "block"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaskingConfig:
    ratio: float = 0.75                              # fraction of patches masked
    kind: MaskKind = MaskKind.RANDOM
    block_min_patches: int = 4                       # smallest block area, in patches (BLOCK only)
    block_aspect: tuple[float, float] = (0.3, 1 / 0.3)   # block height / width range (BLOCK only)

    def __post_init__(self) -> None:
        _check_ratio(self.ratio)
        if self.block_min_patches < 1:
            raise ValueError(f"block_min_patches must be >= 1, got {self.block_min_patches}")
        if not 0.0 < self.block_aspect[0] <= self.block_aspect[1]:
            raise ValueError(f"block_aspect must satisfy 0 < min <= max, got {self.block_aspect}")


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")


def mask_count(grid: tuple[int, int], ratio: float) -> int:
    """Number of masked patches for a (h, w) patch grid."""
    _check_ratio(ratio)
    return int(round(ratio * grid[0] * grid[1]))


def random_mask(grid: tuple[int, int], ratio: float, rng: np.random.Generator) -> np.ndarray:
    """(h * w,) bool with exactly round(ratio * h * w) True at uniformly random positions."""
    n = grid[0] * grid[1]
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[:mask_count(grid, ratio)]] = True
    return mask


def _add_block(mask: np.ndarray, *, remaining: int, cfg: MaskingConfig, rng: np.random.Generator) -> int:
    """Mask one random rectangle of `mask` (h, w) adding 1..remaining new patches; return how many."""
    h, w = mask.shape
    log_aspect = (math.log(cfg.block_aspect[0]), math.log(cfg.block_aspect[1]))
    low = min(cfg.block_min_patches, remaining)
    for _ in range(BLOCK_ATTEMPTS):
        area = rng.uniform(low, remaining)
        aspect = math.exp(rng.uniform(*log_aspect))
        bh = round(math.sqrt(area * aspect))
        bw = round(math.sqrt(area / aspect))
        if not (0 < bh <= h and 0 < bw <= w):
            continue
        top = int(rng.integers(0, h - bh + 1))
        left = int(rng.integers(0, w - bw + 1))
        window = mask[top:top + bh, left:left + bw]
        added = bh * bw - int(window.sum())
        if 0 < added <= remaining:
            window[...] = True
            return added
    return 0


def _set_exact(mask: np.ndarray, target: int, rng: np.random.Generator) -> None:
    """Flip random entries of the flat `mask` in place until exactly `target` are True."""
    count = int(mask.sum())
    if count < target:
        mask[rng.choice(np.flatnonzero(~mask), target - count, replace=False)] = True
    elif count > target:
        mask[rng.choice(np.flatnonzero(mask), count - target, replace=False)] = False


def block_mask(grid: tuple[int, int], ratio: float, rng: np.random.Generator, *,
               cfg: MaskingConfig = MaskingConfig(kind=MaskKind.BLOCK)) -> np.ndarray:
    """(h * w,) bool with exactly round(ratio * h * w) True, mostly as rectangular blocks."""
    target = mask_count(grid, ratio)
    mask = np.zeros(grid, dtype=bool)              # (h, w)
    count = 0
    while count < target:
        added = _add_block(mask, remaining=target - count, cfg=cfg, rng=rng)
        if added == 0:
            break
        count += added
    flat = mask.reshape(-1)
    _set_exact(flat, target, rng)
    return flat


def make_mask(grid: tuple[int, int], cfg: MaskingConfig, rng: np.random.Generator) -> np.ndarray:
    """(h * w,) bool mask of the kind and ratio in `cfg`."""
    if cfg.kind is MaskKind.RANDOM:
        return random_mask(grid, cfg.ratio, rng)
    return block_mask(grid, cfg.ratio, rng, cfg=cfg)

"""Patch masks: exact counts, uniform random positions, block masks made of contiguous blocks."""

from __future__ import annotations

import numpy as np
import pytest

from tipsv2.config_tree import from_dict
from tipsv2.data.masking import MaskingConfig, MaskKind, block_mask, make_mask, mask_count, random_mask

GRIDS = [(16, 16), (8, 8), (7, 9), (1, 1), (2, 3), (32, 32)]
RATIOS = [0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 1.0]
BLOCK = MaskingConfig(kind=MaskKind.BLOCK)


def _components(mask2d: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of True cells (plain flood fill)."""
    h, w = mask2d.shape
    seen = np.zeros_like(mask2d)
    sizes = []
    for r in range(h):
        for c in range(w):
            if not mask2d[r, c] or seen[r, c]:
                continue
            stack, size = [(r, c)], 0
            seen[r, c] = True
            while stack:
                y, x = stack.pop()
                size += 1
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= ny < h and 0 <= nx < w and mask2d[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            sizes.append(size)
    return sizes


def test_mask_count_rounds():
    assert mask_count((16, 16), 0.75) == 192
    assert mask_count((7, 9), 0.5) == round(31.5)
    assert mask_count((8, 8), 0.1) == 6


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_exact_counts(grid, ratio):
    target = round(ratio * grid[0] * grid[1])
    for seed in range(5):
        rng = np.random.default_rng(seed)
        for mask in (random_mask(grid, ratio, rng), block_mask(grid, ratio, rng)):
            assert mask.shape == (grid[0] * grid[1],) and mask.dtype == np.bool_
            assert int(mask.sum()) == target


def test_random_positions_are_uniform():
    rng = np.random.default_rng(0)
    freq = np.mean([random_mask((8, 8), 0.25, rng) for _ in range(3000)], axis=0)
    assert np.all(np.abs(freq - 0.25) < 0.04)      # sd per cell about 0.008


def test_block_masks_are_made_of_blocks():
    rng = np.random.default_rng(0)
    block_parts, random_parts = [], []
    for _ in range(50):
        blocks = block_mask((14, 14), 0.4, rng).reshape(14, 14)
        sizes = _components(blocks)
        assert max(sizes) >= 4
        block_parts.append(len(sizes))
        random_parts.append(len(_components(random_mask((14, 14), 0.4, rng).reshape(14, 14))))
    # 78 masked cells: a handful of blocks versus dozens of scattered pieces
    assert np.mean(block_parts) < 0.3 * np.mean(random_parts)


def test_block_masks_cover_the_grid():
    rng = np.random.default_rng(1)
    freq = np.mean([block_mask((8, 8), 0.5, rng) for _ in range(2000)], axis=0).reshape(8, 8)
    # blocks favour the centre (corners about 0.17, centre about 0.63), but every cell is reachable and
    # placement is symmetric: an off-by-one in the offsets would starve the last row or column
    assert freq.min() > 0.1 and freq.max() < 0.8
    assert np.abs(freq - freq[::-1, :]).max() < 0.06
    assert np.abs(freq - freq[:, ::-1]).max() < 0.06


def test_block_min_patches_makes_large_blocks():
    # min 9 patches, target 50: blocks have about 9 patches or more (side rounding can shave a few)
    cfg = MaskingConfig(kind=MaskKind.BLOCK, block_min_patches=9, ratio=50 / 256)
    rng = np.random.default_rng(2)
    largest = [max(_components(block_mask((16, 16), cfg.ratio, rng, cfg=cfg).reshape(16, 16)))
               for _ in range(30)]
    assert min(largest) >= 9


def test_same_seed_same_mask():
    for kind in MaskKind:
        cfg = MaskingConfig(kind=kind)
        a = make_mask((16, 16), cfg, np.random.default_rng(3))
        b = make_mask((16, 16), cfg, np.random.default_rng(3))
        c = make_mask((16, 16), cfg, np.random.default_rng(4))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_make_mask_dispatches_on_kind():
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(make_mask((8, 8), MaskingConfig(ratio=0.3), rng_a),
                                  random_mask((8, 8), 0.3, rng_b))
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(make_mask((8, 8), MaskingConfig(ratio=0.3, kind=MaskKind.BLOCK), rng_a),
                                  block_mask((8, 8), 0.3, rng_b))


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="1.5"):
        MaskingConfig(ratio=1.5)
    with pytest.raises(ValueError, match="-0.1"):
        random_mask((4, 4), -0.1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="block_min_patches.*0"):
        MaskingConfig(block_min_patches=0)
    with pytest.raises(ValueError, match=r"\(2.0, 1.0\)"):
        MaskingConfig(block_aspect=(2.0, 1.0))


def test_config_from_dict():
    cfg = from_dict(MaskingConfig, {"ratio": "0.5", "kind": "block"})
    assert cfg == MaskingConfig(ratio=0.5, kind=MaskKind.BLOCK)

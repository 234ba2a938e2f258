"""Random resized crops and flips: box distribution, fallback by hand, pixels against numpy slicing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tipsv2.config_tree import from_dict
from tipsv2.data.crops import (CropBox, CropConfig, Interpolation, make_crops, resize_for_eval,
                               resized_crop, sample_crop_box, to_tensor)

SMALL = CropConfig(global_size=56, local_size=28, local_crops=3)


def _noise_image(height=120, width=160, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": None}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


@pytest.mark.parametrize("field", ["global_size", "local_size"])
@pytest.mark.parametrize("size", [225, 100, 0, -14])
def test_sizes_must_be_multiples_of_14(field, size):
    with pytest.raises(ValueError, match=f"{field}.*{size}"):
        CropConfig(**{field: size})


def test_other_bad_configs_name_the_value():
    with pytest.raises(ValueError, match="1.5"):
        CropConfig(flip_prob=1.5)
    with pytest.raises(ValueError, match=r"\(0.5, 0.2\)"):
        CropConfig(local_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="-1"):
        CropConfig(local_crops=-1)
    with pytest.raises(ValueError, match=r"\(0.0, 1.0\)"):
        CropConfig(ratio=(0.0, 1.0))


def test_defaults_high_resolution_and_from_dict():
    cfg = CropConfig()
    assert (cfg.global_size, cfg.local_size, cfg.local_crops, cfg.flip_prob) == (224, 98, 6, 0.5)
    assert cfg.global_scale == (0.32, 1.0) and cfg.local_scale == (0.05, 0.32)
    high = CropConfig.high_resolution()
    assert (high.global_size, high.local_size, high.local_crops) == (448, 140, 6)
    assert CropConfig.high_resolution(local_crops=2).local_crops == 2
    parsed = from_dict(CropConfig, {"global_size": "112", "ratio": [0.5, 2.0], "interpolation": "bilinear"})
    assert parsed.global_size == 112 and parsed.ratio == (0.5, 2.0)
    assert parsed.interpolation is Interpolation.BILINEAR


def test_box_area_and_aspect_follow_the_configured_ranges():
    # A square 1000 px image and the local scale: every first attempt fits, so no rejection bias and
    # the area fraction is uniform on (0.05, 0.32), log-aspect uniform on (log 3/4, log 4/3).
    rng = np.random.default_rng(0)
    scale, ratio = (0.05, 0.32), (3 / 4, 4 / 3)
    boxes = [sample_crop_box(1000, 1000, scale=scale, ratio=ratio, rng=rng) for _ in range(3000)]
    assert not any(b.fallback for b in boxes)
    area = np.array([b.width * b.height / 1e6 for b in boxes])
    log_aspect = np.log([b.width / b.height for b in boxes])
    # integer rounding of sides moves areas and aspects by < 1.5 %
    assert area.min() >= scale[0] * 0.985 and area.max() <= scale[1] * 1.015
    assert log_aspect.min() >= math.log(ratio[0]) - 0.015 and log_aspect.max() <= math.log(ratio[1]) + 0.015
    assert area.mean() == pytest.approx(sum(scale) / 2, abs=0.01)
    assert np.quantile(area, 0.25) == pytest.approx(scale[0] + 0.25 * (scale[1] - scale[0]), abs=0.01)
    assert log_aspect.mean() == pytest.approx(0.0, abs=0.01)
    for b in boxes:
        assert 0 <= b.top and b.top + b.height <= 1000 and 0 <= b.left and b.left + b.width <= 1000
    # positions cover the image: the box centre is uniform over the free range, mean near the middle
    centres = np.array([b.left + b.width / 2 for b in boxes])
    assert centres.mean() == pytest.approx(500, abs=15)


def test_box_on_a_wide_image_stays_inside_bounds():
    rng = np.random.default_rng(1)
    for _ in range(2000):
        b = sample_crop_box(160, 120, scale=(0.32, 1.0), ratio=(3 / 4, 4 / 3), rng=rng)
        assert 0 <= b.top and b.top + b.height <= 120 and 0 <= b.left and b.left + b.width <= 160
        if not b.fallback:
            frac = b.width * b.height / (160 * 120)
            assert 0.32 * 0.97 <= frac <= 1.0
            assert 3 / 4 * 0.97 <= b.width / b.height <= 4 / 3 * 1.03


def test_fallback_is_the_centre_crop_clamped_to_ratio():
    rng = np.random.default_rng(0)
    # 10 px wide, 1000 px tall: any box with >= 90 % of the area has aspect ~0.01, far below 3/4
    box = sample_crop_box(10, 1000, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), rng=rng)
    assert box == CropBox(top=(1000 - 13) // 2, left=0, height=13, width=10, fallback=True)  # 13 = round(10 / 0.75)
    box = sample_crop_box(1000, 10, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), rng=rng)
    assert box == CropBox(top=0, left=(1000 - 13) // 2, height=10, width=13, fallback=True)  # 13 = round(10 * 4/3)
    # 100 x 100 with a ratio that excludes 1 and a scale too large for it: centre crop within ratio
    box = sample_crop_box(100, 100, scale=(0.99, 1.0), ratio=(2.0, 3.0), rng=rng)
    assert box == CropBox(top=25, left=0, height=50, width=100, fallback=True)


def test_resized_crop_cuts_the_right_pixels():
    image = _noise_image(60, 80)
    pixels = np.asarray(image).astype(np.float32) / 255          # (H, W, 3)
    box = CropBox(top=10, left=30, height=28, width=28, fallback=False)
    crop = resized_crop(image, box, size=28, flip=False)        # no resampling at native size
    expected = pixels[10:38, 30:58].transpose(2, 0, 1)
    np.testing.assert_allclose(crop.numpy(), expected, atol=1e-6)
    flipped = resized_crop(image, box, size=28, flip=True)
    np.testing.assert_allclose(flipped.numpy(), np.flip(expected, axis=-1), atol=1e-6)


def test_interpolations_keep_constant_images_constant_and_differ_on_noise():
    flat = Image.new("RGB", (90, 70), (200, 10, 99))
    box = CropBox(top=5, left=7, height=50, width=61, fallback=False)
    noise = _noise_image(60, 80)
    outputs = []
    for interpolation in Interpolation:
        out = resized_crop(flat, box, size=28, flip=False, interpolation=interpolation)
        expected = torch.tensor([200, 10, 99], dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 28, 28)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
        outputs.append(resized_crop(noise, box, size=28, flip=False, interpolation=interpolation))
    assert not torch.equal(outputs[0], outputs[1])


def test_make_crops_shapes_range_and_determinism():
    image = _noise_image()
    crops = make_crops(image, rng=np.random.default_rng(5), cfg=SMALL)
    assert crops.global_crop.shape == (3, 56, 56) and crops.global_crop.dtype == torch.float32
    assert crops.local_crops.shape == (3, 3, 28, 28) and crops.local_crops.dtype == torch.float32
    for t in (crops.global_crop, crops.local_crops):
        assert t.min() >= 0.0 and t.max() <= 1.0
    again = make_crops(image, rng=np.random.default_rng(5), cfg=SMALL)
    assert torch.equal(crops.global_crop, again.global_crop) and torch.equal(crops.local_crops, again.local_crops)
    other = make_crops(image, rng=np.random.default_rng(6), cfg=SMALL)
    assert not torch.equal(crops.global_crop, other.global_crop)
    assert not torch.equal(crops.local_crops[0], crops.local_crops[1])   # each local crop is its own draw


def test_default_sizes_and_zero_local_crops():
    image = _noise_image(300, 400, mode="L")                     # grey input is converted to RGB
    crops = make_crops(image, rng=np.random.default_rng(0), cfg=CropConfig())
    assert crops.global_crop.shape == (3, 224, 224) and crops.local_crops.shape == (6, 3, 98, 98)
    assert torch.equal(crops.global_crop[0], crops.global_crop[1])
    none = make_crops(image, rng=np.random.default_rng(0), cfg=CropConfig(local_crops=0))
    assert none.local_crops.shape == (0, 3, 98, 98)


def test_flip_really_mirrors():
    image = _noise_image()
    never = make_crops(image, rng=np.random.default_rng(9), cfg=CropConfig(global_size=56, local_size=28,
                                                                           local_crops=3, flip_prob=0.0))
    always = make_crops(image, rng=np.random.default_rng(9), cfg=CropConfig(global_size=56, local_size=28,
                                                                            local_crops=3, flip_prob=1.0))
    np.testing.assert_array_equal(always.global_crop.numpy(), np.flip(never.global_crop.numpy(), axis=-1))
    np.testing.assert_array_equal(always.local_crops.numpy(), np.flip(never.local_crops.numpy(), axis=-1))
    assert not torch.equal(always.global_crop, never.global_crop)


def test_flip_probability_is_respected():
    # flip only: scale 1 and ratio exactly 4:3 on a 160 x 120 image give the full-image box, so a crop
    # is either the plain resize or its mirror
    cfg = CropConfig(global_size=28, global_scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), local_crops=0,
                     flip_prob=0.3)
    image = _noise_image()
    plain = resize_for_eval(image, 28)
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(500):
        out = make_crops(image, rng=rng, cfg=cfg).global_crop
        if not torch.equal(out, plain):
            assert torch.equal(out, plain.flip(-1))
            flips += 1
    assert flips / 500 == pytest.approx(0.3, abs=0.07)


def test_resize_for_eval():
    image = _noise_image(60, 80)
    out = resize_for_eval(image, (42, 56))
    assert out.shape == (3, 42, 56) and out.dtype == torch.float32
    assert torch.equal(out, resize_for_eval(image, (42, 56)))
    assert resize_for_eval(image, 28).shape == (3, 28, 28)
    same = resize_for_eval(_noise_image(56, 70), (56, 70))      # native size: exact pixels
    assert torch.allclose(same, to_tensor(_noise_image(56, 70)))
    with pytest.raises(ValueError, match="100"):
        resize_for_eval(image, 100)
    with pytest.raises(ValueError, match="57"):
        resize_for_eval(image, (56, 57))

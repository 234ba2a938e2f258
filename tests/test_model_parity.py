"""Parity with the released TIPS encoders: random weights in the released .npz format, our model
(float32) against the plain float64 reference in reference_tips.py. Relative error = max|ours - ref| /
max|ref|, required <= 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.reference_tips import random_text_arrays, random_vision_arrays, reference_text, reference_vision
from tipsv2.models import FFN, export_official, load_official
from tipsv2.models.vision import swiglu_hidden

TOLERANCE = 1e-5


def rel_err(ours: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(ours.detach().double().numpy() - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=["mlp", "swiglu"])
def vision_ckpt(request, tmp_path_factory):
    rng = np.random.default_rng(0)
    arrays = random_vision_arrays(rng, width=128, depth=3, mlp_dim=512, grid=4, swiglu=request.param == "swiglu")
    path = tmp_path_factory.mktemp("ckpt") / f"vision_{request.param}.npz"
    np.savez(path, **arrays)
    return request.param, arrays, path


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    arrays = random_text_arrays(np.random.default_rng(1), width=128, depth=2, mlp_dim=256, vocab=100)
    path = tmp_path_factory.mktemp("ckpt") / "text.npz"
    np.savez(path, **arrays)
    return arrays, path


def check_vision(model, arrays, images, masks=None, dense=False):
    with torch.no_grad():
        ours = model.encode_image(torch.from_numpy(images),
                                  None if masks is None else torch.from_numpy(masks), dense=dense)
    ref = reference_vision(arrays, images, heads=2, masks=masks, dense=dense)
    errors = {name: rel_err(getattr(ours, name), ref[name]) for name in ("cls1", "cls2", "patches")}
    assert max(errors.values()) <= TOLERANCE, errors
    return errors


def test_vision_infers_sizes(vision_ckpt):
    kind, _, path = vision_ckpt
    cfg = load_official(path).cfg.vision
    assert (cfg.width, cfg.depth, cfg.heads, cfg.image_size) == (128, 3, 2, 56)
    assert cfg.ffn == (FFN.SWIGLU if kind == "swiglu" else FFN.MLP)
    # SwiGLU stores its fused hidden width (2/3 of 512, rounded up to 8 = 344), the MLP its mlp_dim.
    assert (swiglu_hidden(cfg.mlp_dim) if kind == "swiglu" else cfg.mlp_dim) == (344 if kind == "swiglu" else 512)


def test_vision_parity_native_resolution(vision_ckpt):
    _, arrays, path = vision_ckpt
    images = np.random.default_rng(2).random((2, 3, 56, 56), dtype=np.float32)
    check_vision(load_official(path), arrays, images)


def test_vision_parity_larger_and_non_square_resolution(vision_ckpt):
    _, arrays, path = vision_ckpt
    model = load_official(path)
    rng = np.random.default_rng(3)
    check_vision(model, arrays, rng.random((2, 3, 112, 112), dtype=np.float32))   # 4x4 grid -> 8x8
    check_vision(model, arrays, rng.random((1, 3, 70, 98), dtype=np.float32))     # 4x4 grid -> 5x7


def test_vision_parity_with_mask(vision_ckpt):
    _, arrays, path = vision_ckpt
    rng = np.random.default_rng(4)
    images = rng.random((2, 3, 56, 56), dtype=np.float32)
    masks = rng.random((2, 16)) < 0.75
    model = load_official(path)
    check_vision(model, arrays, images, masks)
    with torch.no_grad():  # the mask really changes the output
        unmasked = model.encode_image(torch.from_numpy(images)).patches
        masked = model.encode_image(torch.from_numpy(images), torch.from_numpy(masks)).patches
    assert not torch.allclose(unmasked, masked)


def test_vision_parity_dense_value_attention(vision_ckpt):
    _, arrays, path = vision_ckpt
    images = np.random.default_rng(5).random((2, 3, 56, 56), dtype=np.float32)
    check_vision(load_official(path), arrays, images, dense=True)


def test_text_parity_with_padding(vision_ckpt, text_ckpt):
    _, _, vision_path = vision_ckpt
    arrays, text_path = text_ckpt
    model = load_official(vision_path, text_path)
    rng = np.random.default_rng(6)
    ids = rng.integers(2, 100, size=(4, 12))
    lengths = [12, 7, 3, 1]
    paddings = np.zeros((4, 12), dtype=np.float32)
    for row, n in enumerate(lengths):
        ids[row, n:] = 0
        paddings[row, n:] = 1.0
    with torch.no_grad():
        ours = model.encode_text(torch.from_numpy(ids), torch.from_numpy(paddings))
    ref = reference_text(arrays, ids, paddings, heads=2)
    assert rel_err(ours, ref) <= TOLERANCE
    assert float(model.temperature) == pytest.approx(0.01, rel=1e-6)


def test_round_trip_is_exact(vision_ckpt, text_ckpt, tmp_path):
    _, _, vision_path = vision_ckpt
    _, text_path = text_ckpt
    first = load_official(vision_path, text_path)
    export_official(first, tmp_path / "v.npz", tmp_path / "t.npz")
    second = load_official(tmp_path / "v.npz", tmp_path / "t.npz")
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with np.load(vision_path) as original, np.load(tmp_path / "v.npz") as exported:
        assert set(original.files) == set(exported.files)
        for key in original.files:
            np.testing.assert_array_equal(original[key], exported[key])

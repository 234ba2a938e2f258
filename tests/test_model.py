"""Model behaviour beyond parity: bad input, strict loading, presets, our own save format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.reference_tips import random_text_arrays, random_vision_arrays
from tipsv2.models import build_model, load_official, load_pretrained, model_config, save_pretrained


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny").eval()


def test_shapes_and_contract(tiny):
    images = torch.rand(2, 3, 112, 140)
    feats = tiny.encode_image(images)
    assert feats.cls1.shape == (2, 96) and feats.cls2.shape == (2, 96)
    assert feats.patches.shape == (2, 8 * 10, 96)
    ids = torch.randint(2, 1000, (2, 7))
    assert tiny.encode_text(ids, torch.zeros(2, 7)).shape == (2, 96)
    assert float(tiny.temperature.detach()) == pytest.approx(0.1)


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 112, 113), "multiples of 14"),
    ((1, 1, 112, 112), r"\(B, 3, H, W\)"),
    ((3, 112, 112), r"\(B, 3, H, W\)"),
])
def test_bad_images_name_the_shape(tiny, shape, message):
    with pytest.raises(ValueError, match=message):
        tiny.encode_image(torch.rand(*shape))


def test_bad_mask_shape(tiny):
    with pytest.raises(ValueError, match=r"masks must be bool \(B, N\) = \(1, 64\)"):
        tiny.encode_image(torch.rand(1, 3, 112, 112), torch.zeros(1, 63, dtype=torch.bool))


def test_bad_text_input(tiny):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 1024\)"):
        tiny.encode_text(torch.tensor([[5, 2000]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="must both be"):
        tiny.encode_text(torch.tensor([[5, 6]]), torch.zeros(1, 3))


def test_padding_does_not_change_the_embedding(tiny):
    ids = torch.tensor([[5, 9, 17]])
    short = tiny.encode_text(ids, torch.zeros(1, 3))
    padded_ids = torch.tensor([[5, 9, 17, 0, 0, 0]])
    padded = tiny.encode_text(padded_ids, torch.tensor([[0, 0, 0, 1, 1, 1.0]]))
    torch.testing.assert_close(short, padded, rtol=1e-5, atol=1e-6)


def test_drop_path_only_in_training():
    model = build_model(model_config("tiny", drop_path=0.5))
    images = torch.rand(4, 3, 56, 56)
    model.eval()
    torch.testing.assert_close(model.encode_image(images).cls1, model.encode_image(images).cls1)
    model.train()
    torch.manual_seed(1)
    a = model.encode_image(images).cls1
    torch.manual_seed(2)
    b = model.encode_image(images).cls1
    assert not torch.allclose(a, b)


def _write(tmp_path, arrays, name):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return (random_vision_arrays(rng, width=64, depth=2, mlp_dim=128, grid=2),
            random_text_arrays(rng, width=64, depth=1, mlp_dim=128, vocab=50))


def test_missing_array_is_named(tmp_path, arrays):
    vision, _ = arrays
    del vision["blocks.1.ls2.gamma"]
    with pytest.raises(ValueError, match=r"missing \['blocks.1.ls2.gamma'\]"):
        load_official(_write(tmp_path, vision, "v.npz"))


def test_unexpected_array_is_named(tmp_path, arrays):
    vision, _ = arrays
    vision["head.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"unexpected \['head.weight'\]"):
        load_official(_write(tmp_path, vision, "v.npz"))


def test_wrong_shape_is_named(tmp_path, arrays):
    vision, text = arrays
    text["transformer.resblocks.0.ln_1.weight"] = np.ones(63, np.float32)
    with pytest.raises(ValueError, match=r"ln_1.weight: got \(63,\), expected \(64,\)"):
        load_official(_write(tmp_path, vision, "v.npz"), _write(tmp_path, text, "t.npz"))


def test_missing_required_array_and_pickles_refused(tmp_path, arrays):
    vision, _ = arrays
    del vision["pos_embed"]
    with pytest.raises(ValueError, match=r"missing required arrays \['pos_embed'\]"):
        load_official(_write(tmp_path, vision, "v.npz"))
    path = tmp_path / "pickled.npz"
    np.savez(path, cls_token=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_official(path)


def test_save_and_load_pretrained_round_trip(tiny, tmp_path):
    save_pretrained(tiny, tmp_path / "m")
    again = load_pretrained(tmp_path / "m")
    for key, value in tiny.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert again.cfg == tiny.cfg


def vit_params(width: int, depth: int, mlp_hidden: int, *, swiglu: bool = False, grid: int = 16) -> int:
    """Hand count of a DINOv2-style ViT/14 with CLS1, CLS2 (register token), mask token, LayerScale."""
    d = width
    embed = 3 * 14 * 14 * d + d + 2 * d + (1 + grid * grid) * d + d
    ffn = (d * 2 * mlp_hidden + 2 * mlp_hidden + mlp_hidden * d + d) if swiglu else (2 * d * mlp_hidden + mlp_hidden + d)
    block = (3 * d * d + 3 * d) + (d * d + d) + ffn + 4 * d + 2 * d
    return embed + depth * block + 2 * d


@pytest.mark.parametrize("name, expected", [
    ("vit_s14", vit_params(384, 12, 1536)), ("vit_b14", vit_params(768, 12, 3072)),
    ("vit_l14", vit_params(1024, 24, 4096)), ("vit_so400m14", vit_params(1152, 27, 4304)),
    ("vit_g14", vit_params(1536, 40, 4096, swiglu=True)),
])
def test_paper_sizes(name, expected):
    with torch.device("meta"):
        model = build_model(name)
    assert sum(p.numel() for p in model.vision.parameters()) == expected

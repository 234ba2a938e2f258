"""Examples from stored rows and their collation: decoding, seeding, shapes, dtypes, masks, tokens."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tipsv2.data.batch import FALLBACK_INDEX, Batch, collate, decode_image, make_example
from tipsv2.data.captions import CaptionFallback, CaptionSamplingConfig, example_rng
from tipsv2.data.crops import CropConfig
from tipsv2.data.masking import MaskingConfig, MaskKind, make_mask
from tipsv2.data.schema import Granularity
from tipsv2.tokenizer import Tokenizer, train_tokenizer

S, M, L = Granularity.SHORT, Granularity.MEDIUM, Granularity.LONG
CROPS = CropConfig(global_size=56, local_size=28, local_crops=2)      # 4 x 4 patch grid
CAPTIONS = CaptionSamplingConfig(seed=11)
WORDS = "a an the red green blue dog cat bird tree house car on in under near big small photo of".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=6)) for _ in range(300)]
    path = train_tokenizer(texts, vocab_size=64, out_path=tmp_path_factory.mktemp("spm") / "spm.model")
    return Tokenizer(path, max_len=16)


def _png(mode="RGB", size=(90, 70), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _example(example_id="img-0", *, epoch=0, image=None, alt="a red dog", captions=None):
    captions = {S: "red dog", M: "a red dog on grass", L: "a small red dog near a big tree"} \
        if captions is None else captions
    return make_example(_png() if image is None else image, example_id=example_id, alt_text=alt,
                        captions=captions, epoch=epoch, crop_cfg=CROPS, caption_cfg=CAPTIONS)


def test_make_example_shapes_and_texts():
    ex = _example()
    assert ex.id == "img-0"
    assert ex.global_crop.shape == (3, 56, 56) and ex.global_crop.dtype == torch.float32
    assert ex.local_crops.shape == (2, 3, 28, 28)
    assert ex.alt_text == "a red dog" and ex.fallback is CaptionFallback.NONE
    assert ex.granularity in (S, M, L)
    assert (ex.seed, ex.epoch) == (11, 0)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA", "I;16"])
def test_any_image_mode_becomes_rgb(mode):
    ex = _example(image=_png(mode))
    assert ex.global_crop.shape == (3, 56, 56)
    assert 0.0 <= ex.global_crop.min() and ex.global_crop.max() <= 1.0


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (56, 56), (10, 20, 30, 0))
    assert decode_image(rgba, example_id="t").getpixel((5, 5)) == (255, 255, 255)
    opaque = Image.new("RGBA", (56, 56), (10, 20, 30, 255))
    assert decode_image(opaque, example_id="t").getpixel((5, 5)) == (10, 20, 30)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6                                  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), example_id="e").size == (20, 40)


def test_bytes_and_pil_inputs_agree():
    png = _png()
    from_bytes = _example(image=png)
    from_pil = _example(image=Image.open(io.BytesIO(png)))
    assert torch.equal(from_bytes.global_crop, from_pil.global_crop)


def test_undecodable_bytes_name_the_example():
    with pytest.raises(ValueError, match="broken-7"):
        _example("broken-7", image=b"definitely not an image")


def test_no_text_names_the_example():
    with pytest.raises(ValueError, match="silent-3"):
        _example("silent-3", alt=None, captions={S: None})


def test_same_seed_epoch_id_identical_and_order_independent():
    ids = [f"img-{i}" for i in range(6)]
    forward = {i: _example(i) for i in ids}
    backward = {i: _example(i) for i in reversed(ids)}
    for i in ids:
        a, b = forward[i], backward[i]
        assert torch.equal(a.global_crop, b.global_crop) and torch.equal(a.local_crops, b.local_crops)
        assert (a.alt_text, a.synthetic, a.granularity) == (b.alt_text, b.synthetic, b.granularity)
    assert not torch.equal(forward["img-0"].global_crop, forward["img-1"].global_crop)


def test_different_epoch_changes_the_draws():
    first = [_example(f"img-{i}", epoch=0) for i in range(12)]
    second = [_example(f"img-{i}", epoch=1) for i in range(12)]
    assert all(not torch.equal(a.global_crop, b.global_crop) for a, b in zip(first, second))
    assert any(a.granularity != b.granularity for a, b in zip(first, second))


def test_collate_shapes_and_dtypes(tokenizer):
    examples = [_example("img-0"), _example("img-1", captions={}), _example("img-2", alt=None)]
    batch = collate(examples, tokenizer=tokenizer, masking_cfg=MaskingConfig())
    assert isinstance(batch, Batch) and len(batch) == 3 and batch.ids == ["img-0", "img-1", "img-2"]
    assert batch.global_crop.shape == (3, 3, 56, 56) and batch.global_crop.dtype == torch.float32
    assert batch.local_crops.shape == (3, 2, 3, 28, 28)
    assert batch.masks.shape == (3, 16) and batch.masks.dtype == torch.bool
    assert batch.masks.sum(dim=1).tolist() == [12, 12, 12]          # round(0.75 * 16)
    for ids, pads in ((batch.alt_ids, batch.alt_paddings), (batch.syn_ids, batch.syn_paddings)):
        assert ids.shape == (3, 16) and ids.dtype == torch.long and pads.shape == (3, 16)
    assert batch.granularity.dtype == torch.long and batch.granularity.shape == (3,)
    index = {S: 0, M: 1, L: 2}
    assert batch.granularity[0].item() == index[examples[0].granularity]
    assert batch.granularity[1].item() == FALLBACK_INDEX                # no captions: alt-text for CLS2
    assert batch.granularity[2].item() == index[examples[2].granularity]
    assert examples[2].fallback is CaptionFallback.SYNTHETIC_FOR_ALT
    assert torch.equal(batch.global_crop[1], examples[1].global_crop)


def test_collate_tokenises_the_right_texts(tokenizer):
    examples = [_example(f"img-{i}") for i in range(3)]
    batch = collate(examples, tokenizer=tokenizer, masking_cfg=None)
    ids, pads = tokenizer([ex.synthetic for ex in examples])
    assert torch.equal(batch.syn_ids, ids) and torch.equal(batch.syn_paddings, pads)
    ids, _ = tokenizer([ex.alt_text for ex in examples])
    assert torch.equal(batch.alt_ids, ids)
    assert (batch.alt_paddings[0] == 0).sum() > 0                      # real tokens, not all padding


def test_masks_are_per_example_and_independent_of_batch_order(tokenizer):
    a, b = _example("img-a"), _example("img-b")
    for kind in MaskKind:
        cfg = MaskingConfig(kind=kind, ratio=0.5)
        ab = collate([a, b], tokenizer=tokenizer, masking_cfg=cfg).masks
        ba = collate([b, a], tokenizer=tokenizer, masking_cfg=cfg).masks
        assert torch.equal(ab[0], ba[1]) and torch.equal(ab[1], ba[0])
        expected = make_mask((4, 4), cfg, example_rng(seed=11, epoch=0, example_id="img-a", stream="mask"))
        assert torch.equal(ab[0], torch.from_numpy(expected))
    cfg = MaskingConfig(ratio=0.5)
    epoch0 = collate([a], tokenizer=tokenizer, masking_cfg=cfg).masks
    again = collate([_example("img-a", epoch=0)], tokenizer=tokenizer, masking_cfg=cfg).masks
    epoch1 = collate([_example("img-a", epoch=1)], tokenizer=tokenizer, masking_cfg=cfg).masks
    assert torch.equal(epoch0, again) and not torch.equal(epoch0, epoch1)


def test_explicit_rng_overrides_per_example_masks(tokenizer):
    examples = [_example("img-a"), _example("img-b")]
    cfg = MaskingConfig(ratio=0.25)
    batch = collate(examples, tokenizer=tokenizer, masking_cfg=cfg, rng=np.random.default_rng(4))
    reference = np.random.default_rng(4)
    expected = np.stack([make_mask((4, 4), cfg, reference) for _ in examples])
    assert torch.equal(batch.masks, torch.from_numpy(expected))


def test_distillation_masks_are_all_false(tokenizer):
    batch = collate([_example("img-0"), _example("img-1")], tokenizer=tokenizer, masking_cfg=None)
    assert batch.masks.shape == (2, 16) and not batch.masks.any()


def test_patch_size_and_empty_batch_are_checked(tokenizer):
    with pytest.raises(ValueError, match="56.*16"):
        collate([_example()], tokenizer=tokenizer, masking_cfg=None, patch_size=16)
    with pytest.raises(ValueError, match="empty"):
        collate([], tokenizer=tokenizer, masking_cfg=None)
    assert collate([_example()], tokenizer=tokenizer, masking_cfg=MaskingConfig(),
                   patch_size=8).masks.shape == (1, 49)


def test_batch_to_moves_every_tensor(tokenizer):
    batch = collate([_example("img-0")], tokenizer=tokenizer, masking_cfg=MaskingConfig())
    moved = batch.to("meta")
    for name in ("global_crop", "local_crops", "masks", "alt_ids", "alt_paddings", "syn_ids",
                 "syn_paddings", "granularity"):
        tensor = getattr(moved, name)
        assert tensor.device.type == "meta", name
        assert tensor.dtype == getattr(batch, name).dtype and tensor.shape == getattr(batch, name).shape
    assert moved.ids == batch.ids
    assert batch.global_crop.device.type == "cpu"                      # the original is untouched
    same = batch.to(torch.device("cpu"))
    assert torch.equal(same.masks, batch.masks)

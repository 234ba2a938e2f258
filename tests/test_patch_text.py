"""tipsv2.eval.patch_text against hand-computed cases."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tipsv2.eval.patch_text import (PatchTextConfig, auroc, chance, colour_oracle, patch_labels,
                                    patch_text_alignment, permutation_null)


def test_patch_labels_take_the_majority():
    mask = np.zeros((4, 6), np.uint8)     # patches of 2 px: a 2 x 3 grid
    mask[0:2, 0:2] = 1                    # patch 0: all 1
    mask[0, 2] = 2                        # patch 1: one pixel of 2, three background -> 0
    mask[2:4, 4:6] = [[3, 3], [3, 0]]     # patch 5: three of 3 -> 3
    mask[2:4, 2:4] = [[1, 2], [1, 2]]     # patch 4: a tie of 1 and 2 -> the smaller, 1
    assert patch_labels(mask, 2).tolist() == [1, 0, 0, 0, 1, 3]
    with pytest.raises(ValueError, match="whole number of 4 px patches"):
        patch_labels(mask, 4)


def test_auroc_matches_pairs_counted_by_hand():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3])
    positives = torch.tensor([True, False, True, False, False])
    pairs = [(p, n) for p, n in itertools.product(scores[positives], scores[~positives])]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert auroc(scores, positives) == pytest.approx(expected) == pytest.approx(5.5 / 6)
    assert np.isnan(auroc(scores, torch.zeros(5, dtype=torch.bool)))


def test_chance_is_uniform_and_majority():
    assert chance(np.array([0, 0, 0, 1]), 4) == {"uniform": 0.25, "majority": 0.75}


def scenes(size: int = 28):
    """Two 28 px images of 2 x 2 patches: left column red (class 1), right column blue (class 2) or background."""
    red, blue, grey = (220, 30, 30), (30, 60, 230), (100, 100, 100)
    items = []
    for right in (blue, grey):
        pixels = np.zeros((size, size, 3), np.uint8)
        pixels[:, :14], pixels[:, 14:] = red, right
        mask = np.zeros((size, size), np.uint8)
        mask[:, :14] = 1
        if right == blue:
            mask[:, 14:] = 2
        items.append((Image.fromarray(pixels), mask))
    return items


def colour_encoders():
    """A hand-made feature source (the evaluators take callables): a patch's token is its mean RGB, and
    'red' / 'blue' prompts embed as those colours, so every foreground patch is named right."""
    def encode_image(images, *, dense=False):
        b, _, h, w = images.shape
        grid = images.reshape(b, 3, h // 14, 14, w // 14, 14).mean((3, 5))        # (B, 3, h, w)
        return SimpleNamespace(patches=grid.flatten(2).transpose(1, 2))          # (B, N, 3)

    def encode_text(texts):
        return torch.tensor([[1.0, 0.1, 0.1] if "red" in t else [0.1, 0.2, 1.0] for t in texts])
    return encode_image, encode_text


def test_alignment_of_a_perfect_feature_source():
    encode_image, encode_text = colour_encoders()
    m = patch_text_alignment(encode_image, encode_text, ("red", "blue"), scenes())
    assert m["accuracy"] == 1.0 and m["num_foreground_patches"] == 6 and m["num_patches"] == 8
    assert m["auroc/red"] == 1.0 and m["auroc/blue"] == 1.0
    assert m["chance/uniform"] == 0.5 and m["chance/majority"] == pytest.approx(4 / 6) == m["chance"]


def test_alignment_of_swapped_prompts_is_zero():
    encode_image, encode_text = colour_encoders()
    m = patch_text_alignment(encode_image, encode_text, ("blue", "red"), scenes())   # names swapped
    assert m["accuracy"] == 0.0 and m["auroc"] < 0.5


def test_colour_oracle_and_bad_input():
    assert colour_oracle([(220, 30, 30), (30, 60, 230)], scenes()) == 1.0
    encode_image, encode_text = colour_encoders()
    empty = [(Image.new("RGB", (28, 28)), np.zeros((28, 28), np.uint8))]
    with pytest.raises(ValueError, match="no foreground patch"):
        patch_text_alignment(encode_image, encode_text, ("red",), empty)
    with pytest.raises(ValueError, match="no items"):
        patch_text_alignment(encode_image, encode_text, ("red",), [])
    assert PatchTextConfig().dense


def test_permutation_null_by_hand():
    # Two classes, perfectly grouped: 3 patches of class 0 predicted 0, 1 of class 1 predicted 1.
    null = permutation_null(np.array([[3, 0], [0, 1]]))
    assert sorted(null.tolist()) == [0.0, 1.0]      # identity: all right; swapped: all wrong
    # Three classes, 720 > 6 permutations: all of them; the mean is 1/3 for a balanced confusion.
    null = permutation_null(np.diag([2, 2, 2]))
    assert len(null) == 6 and null.mean() == pytest.approx(1 / 3)
    assert len(permutation_null(np.eye(8, dtype=int), samples=100)) == 100

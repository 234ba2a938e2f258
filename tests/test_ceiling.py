"""bench.ceiling: the supervised ceiling's metric, its flips, and that it learns what a patch shows."""

from __future__ import annotations

import torch

from bench.ceiling import BAR, flip, foreground_accuracy, supervised, foreground_chance
from bench.learning import Family


def test_foreground_accuracy_scores_object_classes_on_object_patches_only():
    # columns: background, class 1, class 2. Background patches never count; background is never predicted.
    logits = torch.tensor([[9.0, 1.0, 0.0],    # class 1 patch: background scores highest, class 1 beats 2: right
                           [0.0, 0.0, 1.0],    # class 1 patch predicted 2: wrong
                           [0.0, 0.0, 5.0],    # class 2 patch: right
                           [0.0, 5.0, 0.0]])   # background patch: ignored
    labels = torch.tensor([1, 1, 2, 0])
    assert foreground_accuracy(logits, labels) == 2 / 3


def test_flip_mirrors_the_patch_labels_with_the_image():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    labels = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])   # 2 x 2 grids, row-major
    out_images, out_labels = flip(images, labels, torch.tensor([True, False]), grid=2)
    assert torch.equal(out_images[0], images[0].flip(-1)) and torch.equal(out_images[1], images[1])
    assert out_labels.tolist() == [[2, 1, 4, 3], [1, 2, 3, 4]]


def test_the_ceiling_learns_colour_labels_in_twenty_steps():
    # Colour is what one patch shows: with the labels, 20 steps clear the 2x bar (seen: 0.74 vs chance 0.21).
    # Labels that did not follow their patches (a wrong flip, a wrong raster) would leave it near chance.
    torch.set_num_threads(1)
    rows = supervised(Family.COLOUR, 1, 20, (20,))
    assert [r["step"] for r in rows] == [20]
    assert rows[0]["accuracy"] >= BAR * foreground_chance(Family.COLOUR)

"""tipsv2.eval.baselines against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tipsv2.eval import metrics
from tipsv2.eval.baselines import (Standing, all_background_miou, constant_depth_rmse, majority_accuracy,
                                   proportion_noise, retrieval_chance, standing)


def test_majority_accuracy_guesses_the_most_frequent_class():
    test = np.array([0, 1, 1, 2, 1])
    assert majority_accuracy(test) == pytest.approx(3 / 5)                  # always 1
    assert majority_accuracy(test, train_labels=np.array([2, 2, 0])) == pytest.approx(1 / 5)   # always 2
    assert majority_accuracy(torch.tensor([3, 4])) == pytest.approx(1 / 2)   # a tie: the smaller label, 3
    with pytest.raises(ValueError, match="needs labels"):
        majority_accuracy(np.array([], dtype=np.int64))


def test_retrieval_chance_is_one_over_the_gallery():
    # 2 images, 3 texts each: an image finds one of its 3 texts among 6 with probability 1/2.
    assert retrieval_chance(np.array([0, 0, 0, 1, 1, 1])) == {"i2t_r1": 0.5, "t2i_r1": 0.5}
    # 4 images, one text each: 1/4 both ways; uneven counts average the images' shares.
    assert retrieval_chance(np.arange(4)) == {"i2t_r1": 0.25, "t2i_r1": 0.25}
    assert retrieval_chance(np.array([0, 0, 0, 1]))["i2t_r1"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    with pytest.raises(ValueError, match="every image needs a text"):
        retrieval_chance(np.array([0, 2]))


def test_all_background_miou_counts_by_hand():
    # 10 pixels: 6 background, 3 of class 1, 1 of class 2; class 3 absent.
    mask = np.array([[0, 0, 0, 0, 0], [0, 1, 1, 1, 2]])
    # Background IoU 6 / 10; classes 1 and 2 are in the label, so they count with IoU 0; class 3 is left out.
    assert all_background_miou(mask, num_classes=4) == pytest.approx((6 / 10 + 0 + 0) / 3)
    # Ignored pixels count nowhere.
    mask[1, 4] = metrics.IGNORE_INDEX
    assert all_background_miou(mask, num_classes=4) == pytest.approx((6 / 9 + 0) / 2)
    assert all_background_miou(np.zeros((2, 2), np.int64), num_classes=3) == 1.0


def test_constant_depth_rmse_predicts_the_training_mean():
    train = np.array([[2.0, 4.0], [0.0, 6.0]])      # the 0 is invalid: mean of valid depth 4
    test = np.array([[1.0, 7.0], [0.0, 4.0]])       # errors -3, +3, (invalid), 0
    assert constant_depth_rmse(train, test) == pytest.approx(np.sqrt((9 + 9 + 0) / 3))
    with pytest.raises(ValueError, match="no training depth"):
        constant_depth_rmse(np.zeros((2, 2)), test)


def test_proportion_noise_and_standing():
    assert proportion_noise(0.2, 100) == pytest.approx(0.04)
    assert proportion_noise(0.0, 5) == 0.0
    with pytest.raises(ValueError, match="n >= 1"):
        proportion_noise(0.5, 0)
    assert standing(0.60, 0.20, margin=0.08) is Standing.ABOVE
    assert standing(0.25, 0.20, margin=0.08) is Standing.AT
    assert standing(0.05, 0.20, margin=0.08) is Standing.BELOW
    # Lower is better (RMSE): beating the constant means a smaller value.
    assert standing(1.0, 2.0, margin=0.2, higher_is_better=False) is Standing.ABOVE
    assert standing(2.5, 2.0, margin=0.2, higher_is_better=False) is Standing.BELOW
    assert Standing.AT.value == "at chance"

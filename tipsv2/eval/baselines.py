"""What a model that learned nothing scores on the same data: the baseline to print beside every metric.

Each baseline is computed from the evaluated data's own labels (counts), never written down as a
number, so that a score can be read against what guessing gets on exactly those images:

| metric                                  | baseline                                                           |
|-----------------------------------------|--------------------------------------------------------------------|
| classification top-1 (zero-shot, kNN)   | always the most frequent class (`majority_accuracy`)               |
| retrieval R@1                           | a random ranking (`retrieval_chance`: 1 / images for text->image)  |
| segmentation mIoU (zero-shot, probe)    | every pixel background (`all_background_miou`), the evaluators' mIoU |
| depth RMSE                              | the training set's mean depth everywhere (`constant_depth_rmse`)   |
| foreground patch zero-shot accuracy     | `tipsv2.eval.patch_text.chance` (most frequent class of the patches) |

`standing` then says in one word where a score lies against its baseline, given a noise margin
(`proportion_noise` for accuracies over independent draws).
"""

from __future__ import annotations

import enum
import math

import numpy as np
import torch
from torch import Tensor

from tipsv2.eval import metrics


def majority_accuracy(test_labels: np.ndarray | Tensor, train_labels: np.ndarray | Tensor | None = None) -> float:
    """Top-1 accuracy on `test_labels` (N,) of always predicting the most frequent class of `train_labels`
    (of the test labels themselves when None: the constant guess that scores best). Ties: the smaller label."""
    test = np.asarray(test_labels, dtype=np.int64)
    source = test if train_labels is None else np.asarray(train_labels, dtype=np.int64)
    if test.size == 0 or source.size == 0:
        raise ValueError(f"majority_accuracy needs labels, got {test.size} test and {source.size} train labels")
    guess = int(np.bincount(source).argmax())
    return float((test == guess).mean())


def retrieval_chance(text_image: np.ndarray | Tensor) -> dict[str, float]:
    """Expected recall@1 of a random ranking, both ways. text_image (T,): the image index of each text
    (images 0..N-1, each with at least one text). image->text: an image's share of the texts, averaged
    over images; text->image: 1 / N."""
    owner = np.asarray(text_image, dtype=np.int64)
    counts = np.bincount(owner)
    if owner.size == 0 or (counts == 0).any():
        raise ValueError(f"every image needs a text; texts per image: {counts.tolist()}")
    return {"i2t_r1": float((counts / owner.size).mean()), "t2i_r1": 1.0 / len(counts)}


def all_background_miou(masks: np.ndarray | Tensor, num_classes: int, *,
                        ignore_index: int | None = metrics.IGNORE_INDEX) -> float:
    """mIoU of predicting label 0 (background) at every pixel of `masks` (any shape), with the evaluators'
    mIoU (mean over classes present in prediction or label): background's pixel share / classes present."""
    label = torch.as_tensor(np.asarray(masks)).long()
    confusion = metrics.confusion_matrix(torch.zeros_like(label), label, num_classes, ignore_index=ignore_index)
    return metrics.miou(confusion)


def constant_depth_rmse(train_depth: np.ndarray | Tensor, test_depth: np.ndarray | Tensor, *,
                        min_depth: float = 1e-3) -> float:
    """RMSE (depth units) on the test pixels above `min_depth` of predicting the mean valid training depth."""
    train, test = torch.as_tensor(np.asarray(train_depth)).double(), torch.as_tensor(np.asarray(test_depth)).double()
    valid = train > min_depth
    if not valid.any():
        raise ValueError(f"no training depth above min_depth {min_depth}")
    return metrics.rmse(torch.full_like(test, float(train[valid].mean())), test, test > min_depth)


def proportion_noise(p: float, n: int) -> float:
    """Binomial standard error of an accuracy p over n independent draws (objects or images, not pixels)."""
    if n < 1 or not 0.0 <= p <= 1.0:
        raise ValueError(f"proportion_noise needs 0 <= p <= 1 and n >= 1, got p={p}, n={n}")
    return math.sqrt(p * (1.0 - p) / n)


class Standing(str, enum.Enum):
    """Where a score lies against its baseline, in the words a report prints."""
    ABOVE = "above chance"
    AT = "at chance"
    BELOW = "below chance"


def standing(value: float, baseline: float, *, margin: float, higher_is_better: bool = True) -> Standing:
    """ABOVE when `value` beats `baseline` by more than `margin`, BELOW when it loses by more, else AT."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    gain = value - baseline if higher_is_better else baseline - value
    if gain > margin:
        return Standing.ABOVE
    return Standing.BELOW if gain < -margin else Standing.AT

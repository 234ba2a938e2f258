"""Metrics against plain-loop references and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tipsv2.eval import metrics


def loop_confusion(pred, label, num_classes, ignore_index):
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for p, t in zip(np.asarray(pred).ravel(), np.asarray(label).ravel()):
        if t != ignore_index:
            confusion[t, p] += 1
    return confusion


def loop_miou(pred, label, num_classes, ignore_index):
    ious = []
    for c in range(num_classes):
        inter = union = 0
        for p, t in zip(np.asarray(pred).ravel(), np.asarray(label).ravel()):
            if t == ignore_index:
                continue
            inter += (p == c) and (t == c)
            union += (p == c) or (t == c)
        if union:
            ious.append(inter / union)
    return sum(ious) / len(ious)


def test_two_class_hand_example():
    # label: 0 0 1 1, pred: 0 1 1 1 -> IoU(0) = 1/2, IoU(1) = 2/3, mIoU = 7/12
    confusion = metrics.confusion_matrix(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), 2)
    assert confusion.tolist() == [[1, 1], [0, 2]]
    assert metrics.miou(confusion) == pytest.approx(7 / 12)
    assert metrics.pixel_accuracy(confusion) == pytest.approx(3 / 4)


def test_confusion_and_miou_match_loop_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, size=(3, 17, 13))
    label[label == 4] = 255            # class 4 never labelled, and ignored pixels
    pred = rng.integers(0, 6, size=label.shape)
    pred[pred == 5] = 1                # class 5 never predicted, never labelled: excluded
    confusion = metrics.confusion_matrix(torch.from_numpy(pred), label, 6, ignore_index=255)
    np.testing.assert_array_equal(confusion.numpy(), loop_confusion(pred, label, 6, 255))
    assert metrics.miou(confusion) == pytest.approx(loop_miou(pred, label, 6, 255))
    assert math.isnan(float(metrics.iou_per_class(confusion)[5]))


def test_perfect_prediction_gives_miou_one_and_out_of_range_fails():
    label = np.array([[0, 1], [2, 255]])
    pred = np.array([[0, 1], [2, 0]])
    assert metrics.miou(metrics.confusion_matrix(pred, label, 3)) == 1.0
    with pytest.raises(ValueError, match=r"label values must be in \[0, 3\)"):
        metrics.confusion_matrix(pred, np.array([[0, 1], [3, 0]]), 3)
    with pytest.raises(ValueError, match="empty"):
        metrics.miou(torch.zeros(3, 3, dtype=torch.long))


def loop_recall(similarity, positives, k):
    hits = 0
    for row, pos in zip(similarity, positives):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        hits += any(pos[j] for j in order[:k])
    return hits / len(similarity)


def test_recall_at_k_matches_loop():
    rng = np.random.default_rng(1)
    similarity = rng.normal(size=(20, 30))
    positives = rng.random((20, 30)) < 0.1
    positives[np.arange(20), rng.integers(0, 30, 20)] = True
    got = metrics.recall_at_k(similarity, positives, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert got[f"r{k}"] == pytest.approx(loop_recall(similarity, positives, k))


def test_recall_needs_a_positive_per_query():
    with pytest.raises(ValueError, match="query 1 has no positive"):
        metrics.recall_at_k(np.eye(2), np.array([[True, False], [False, False]]))


def test_topk_accuracy_matches_loop():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(50, 8))
    labels = rng.integers(0, 8, 50)
    got = metrics.topk_accuracy(logits, labels, ks=(1, 3))
    for k in (1, 3):
        expected = np.mean([labels[i] in np.argsort(-logits[i])[:k] for i in range(50)])
        assert got[f"top{k}"] == pytest.approx(expected)


def test_rmse_matches_loop_and_respects_valid_mask():
    rng = np.random.default_rng(3)
    pred, target = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    valid = rng.random((4, 6)) > 0.3
    errors = [(p - t) ** 2 for p, t, v in zip(pred.ravel(), target.ravel(), valid.ravel()) if v]
    assert metrics.rmse(pred, target, valid) == pytest.approx(math.sqrt(sum(errors) / len(errors)))
    assert metrics.rmse(np.array([1.0, 3.0]), np.array([0.0, 0.0])) == pytest.approx(math.sqrt(5.0))
    with pytest.raises(ValueError, match="no valid"):
        metrics.rmse(pred, target, np.zeros_like(valid))

"""Evaluation metrics on plain tensors: confusion-matrix mIoU, top-k accuracy, recall@k, RMSE.

Every function accepts numpy arrays or torch tensors and returns Python floats (or a torch tensor for
the confusion matrix), so the evaluators can accumulate over batches on any device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = 255


def _tensor(x: np.ndarray | Tensor) -> Tensor:
    return x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))


def confusion_matrix(pred: np.ndarray | Tensor, label: np.ndarray | Tensor, num_classes: int, *,
                     ignore_index: int | None = IGNORE_INDEX) -> Tensor:
    """(C, C) int64 counts, rows = label, columns = prediction. Pixels whose label is `ignore_index`
    are skipped; any other label or prediction outside [0, C) is an error."""
    pred, label = _tensor(pred).long().flatten(), _tensor(label).long().flatten()
    if pred.shape != label.shape:
        raise ValueError(f"pred and label must have the same number of elements, "
                         f"got {pred.numel()} and {label.numel()}")
    if ignore_index is not None:
        keep = label != ignore_index
        pred, label = pred[keep], label[keep]
    for name, values in (("label", label), ("pred", pred)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} values must be in [0, {num_classes}) or the ignore index {ignore_index}, "
                             f"got range [{int(values.min())}, {int(values.max())}]")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def iou_per_class(confusion: Tensor) -> Tensor:
    """(C,) float64 IoU; NaN for classes absent from both prediction and label."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = intersection / union
    iou[union == 0] = float("nan")
    return iou


def miou(confusion: Tensor) -> float:
    """Mean IoU over the classes present in prediction or label (others are excluded, not counted as 0)."""
    iou = iou_per_class(confusion)
    present = ~torch.isnan(iou)
    if not present.any():
        raise ValueError("the confusion matrix is empty: no labelled pixels were evaluated")
    return float(iou[present].mean())


def pixel_accuracy(confusion: Tensor) -> float:
    total = confusion.sum()
    if total == 0:
        raise ValueError("the confusion matrix is empty: no labelled pixels were evaluated")
    return float(confusion.diag().sum().double() / total)


def segmentation_metrics(confusion: Tensor) -> dict[str, float]:
    return {"miou": miou(confusion), "pixel_accuracy": pixel_accuracy(confusion)}


def topk_accuracy(logits: np.ndarray | Tensor, labels: np.ndarray | Tensor, ks: Sequence[int] = (1, 5)
                  ) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest logits. logits (N, C), labels (N,).
    k larger than C counts every row as correct."""
    logits, labels = _tensor(logits), _tensor(labels).long()
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    order = logits.argsort(dim=1, descending=True)
    rank = (order == labels[:, None]).float().argmax(dim=1)   # 0-based rank of the true class
    return {f"top{k}": float((rank < k).float().mean()) for k in ks}


def recall_at_k(similarity: np.ndarray | Tensor, positives: np.ndarray | Tensor, ks: Sequence[int] = (1, 5)
                ) -> dict[str, float]:
    """Retrieval recall: the fraction of queries with at least one positive among their k most similar
    gallery items. similarity (Q, G); positives (Q, G) bool, at least one True per row."""
    similarity, positives = _tensor(similarity).float(), _tensor(positives).bool()
    if similarity.shape != positives.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and positives {tuple(positives.shape)} differ")
    if not positives.any(dim=1).all():
        bad = int((~positives.any(dim=1)).nonzero()[0])
        raise ValueError(f"query {bad} has no positive gallery item")
    # Rank of the best positive = number of gallery items scored strictly higher than it.
    best_positive = similarity.masked_fill(~positives, float("-inf")).max(dim=1).values
    rank = (similarity > best_positive[:, None]).sum(dim=1)
    return {f"r{k}": float((rank < k).float().mean()) for k in ks}


def squared_error_sum(pred: np.ndarray | Tensor, target: np.ndarray | Tensor,
                      valid: np.ndarray | Tensor | None = None) -> tuple[float, int]:
    """(sum of squared errors, number of valid elements): accumulate these over batches for RMSE."""
    pred, target = _tensor(pred).double(), _tensor(target).double()
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    valid_t = torch.ones_like(target, dtype=torch.bool) if valid is None else _tensor(valid).bool()
    return float(((pred - target)[valid_t] ** 2).sum()), int(valid_t.sum())


def rmse(pred: np.ndarray | Tensor, target: np.ndarray | Tensor, valid: np.ndarray | Tensor | None = None) -> float:
    """Root mean squared error over the valid elements (all when `valid` is None), in target units."""
    total, count = squared_error_sum(pred, target, valid)
    if count == 0:
        raise ValueError("no valid elements to compute RMSE over")
    return (total / count) ** 0.5

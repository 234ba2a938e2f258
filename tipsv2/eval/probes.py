"""Frozen-feature probes: linear segmentation (mIoU), linear depth (RMSE), kNN classification.

All three take precomputed features (tipsv2.eval.features.extract_features) so that one extraction
serves every probe. They run on the CPU in seconds for the synthetic suites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tipsv2.eval import metrics
from tipsv2.eval.features import normalize


# ---------------------------------------------------------------- linear segmentation


@dataclass(frozen=True, kw_only=True)
class LinearSegmentationConfig:
    epochs: int = 20
    batch_size: int = 16             # images per step
    lr: float = 1e-2                 # AdamW
    weight_decay: float = 1e-4
    ignore_index: int = metrics.IGNORE_INDEX
    seed: int = 0


class LinearProbe(nn.Module):
    """Standardise features with fixed train statistics, then one linear layer."""

    def __init__(self, mean: Tensor, std: Tensor, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)   # (D,)
        self.register_buffer("std", std)     # (D,)
        self.linear = nn.Linear(mean.shape[0], out_dim)

    def forward(self, features: Tensor) -> Tensor:   # (..., D) -> (..., out_dim)
        return self.linear((features - self.mean) / self.std)


def _standardiser(features: Tensor) -> tuple[Tensor, Tensor]:
    flat = features.reshape(-1, features.shape[-1]).float()
    return flat.mean(0), flat.std(0).clamp_min(1e-6)


def segmentation_logits(probe: LinearProbe, features: Tensor, size: tuple[int, int]) -> Tensor:
    """features (B, h, w, D) -> logits (B, C, H, W), bilinearly upsampled from the patch grid."""
    logits = probe(features.float()).permute(0, 3, 1, 2)   # (B, C, h, w)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def train_linear_segmentation(features: Tensor, labels: Tensor, num_classes: int,
                              cfg: LinearSegmentationConfig = LinearSegmentationConfig()) -> LinearProbe:
    """features (N, h, w, D) frozen patch tokens, labels (N, H, W) long (ignore_index = unlabelled).
    Cross-entropy at label resolution on the upsampled patch logits, AdamW, `cfg.epochs` epochs."""
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} feature maps but {labels.shape[0]} label maps")
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)   # the nn.Linear initialisation
    probe = LinearProbe(*_standardiser(features), num_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    labels = labels.long()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(features.shape[0], generator=generator).split(cfg.batch_size):
            logits = segmentation_logits(probe, features[idx], tuple(labels.shape[-2:]))
            loss = F.cross_entropy(logits, labels[idx], ignore_index=cfg.ignore_index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe.eval()


@torch.no_grad()
def evaluate_linear_segmentation(probe: LinearProbe, features: Tensor, labels: Tensor, num_classes: int, *,
                                 ignore_index: int = metrics.IGNORE_INDEX, batch_size: int = 32) -> dict[str, float]:
    """mIoU and pixel accuracy of `probe` on features (N, h, w, D) against labels (N, H, W)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for idx in torch.arange(features.shape[0]).split(batch_size):
        pred = segmentation_logits(probe, features[idx], tuple(labels.shape[-2:])).argmax(dim=1)
        confusion += metrics.confusion_matrix(pred, labels[idx], num_classes, ignore_index=ignore_index)
    return metrics.segmentation_metrics(confusion)


def linear_segmentation(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                        num_classes: int, cfg: LinearSegmentationConfig = LinearSegmentationConfig()
                        ) -> dict[str, float]:
    probe = train_linear_segmentation(train_features, train_labels, num_classes, cfg)
    return evaluate_linear_segmentation(probe, test_features, test_labels, num_classes, ignore_index=cfg.ignore_index)


# ---------------------------------------------------------------- linear depth


@dataclass(frozen=True, kw_only=True)
class LinearDepthConfig:
    ridge: float = 1e-3        # L2 penalty of the closed-form least squares (on standardised features)
    min_depth: float = 1e-3    # m; target pixels at or below it are invalid (no depth measured)


def depth_at_patches(depth: Tensor, grid: tuple[int, int], min_depth: float) -> tuple[Tensor, Tensor]:
    """depth (N, H, W) -> (mean valid depth per patch (N, h, w), patch has any valid pixel (N, h, w))."""
    valid = (depth > min_depth).float()[:, None]
    total = F.adaptive_avg_pool2d(depth.float()[:, None] * valid, grid)[:, 0]
    share = F.adaptive_avg_pool2d(valid, grid)[:, 0]
    return total / share.clamp_min(1e-12), share > 0


class LinearDepthProbe(nn.Module):
    def __init__(self, mean: Tensor, std: Tensor, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)       # (D,)
        self.register_buffer("std", std)         # (D,)
        self.register_buffer("weight", weight)   # (D + 1,), last entry the bias

    def forward(self, features: Tensor) -> Tensor:   # (..., D) -> (...,) depth in target units
        x = (features.float() - self.mean) / self.std
        return x @ self.weight[:-1] + self.weight[-1]


def train_linear_depth(features: Tensor, depth: Tensor, cfg: LinearDepthConfig = LinearDepthConfig()
                       ) -> LinearDepthProbe:
    """Ridge regression from each patch token (N, h, w, D) to the mean valid depth under the patch."""
    grid = tuple(features.shape[1:3])
    target, valid = depth_at_patches(depth, grid, cfg.min_depth)
    if not valid.any():
        raise ValueError(f"no depth above min_depth {cfg.min_depth} in the training targets")
    mean, std = _standardiser(features)
    x = ((features[valid].double() - mean.double()) / std.double())                      # (P, D)
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)                  # (P, D + 1)
    penalty = cfg.ridge * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype)
    penalty[-1, -1] = 0.0                                                                # no penalty on the bias
    weight = torch.linalg.solve(x.T @ x + penalty, x.T @ target[valid].double())
    return LinearDepthProbe(mean, std, weight.float())


@torch.no_grad()
def evaluate_linear_depth(probe: LinearDepthProbe, features: Tensor, depth: Tensor,
                          cfg: LinearDepthConfig = LinearDepthConfig()) -> dict[str, float]:
    """Predict at patch resolution, upsample bilinearly to (H, W), RMSE over valid pixels (target units)."""
    pred = F.interpolate(probe(features)[:, None], size=tuple(depth.shape[-2:]), mode="bilinear",
                         align_corners=False)[:, 0]
    return {"rmse": metrics.rmse(pred, depth, depth > cfg.min_depth)}


def linear_depth(train_features: Tensor, train_depth: Tensor, test_features: Tensor, test_depth: Tensor,
                 cfg: LinearDepthConfig = LinearDepthConfig()) -> dict[str, float]:
    return evaluate_linear_depth(train_linear_depth(train_features, train_depth, cfg), test_features, test_depth, cfg)


# ---------------------------------------------------------------- kNN


@dataclass(frozen=True, kw_only=True)
class KnnConfig:
    k: int = 20
    temperature: float = 0.07   # votes weighted by exp(cosine / temperature), as in DINO
    chunk_size: int = 1024      # test rows per similarity block


@torch.no_grad()
def knn_classification(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                       num_classes: int, cfg: KnnConfig = KnnConfig(), ks: tuple[int, ...] = (1, 5)
                       ) -> dict[str, float]:
    """Weighted kNN on cosine similarity: each of the k nearest training samples votes for its label
    with weight exp(cos / T). Returns top-k accuracy of the vote totals."""
    train, labels = normalize(train_features), train_labels.long()
    k = min(cfg.k, train.shape[0])
    votes = []
    for block in normalize(test_features).split(cfg.chunk_size):
        similarity, index = (block @ train.T).topk(k, dim=1)                    # (B, k)
        weights = (similarity / cfg.temperature).exp()
        scores = torch.zeros(block.shape[0], num_classes)
        scores.scatter_add_(1, labels[index], weights)                           # (B, C)
        votes.append(scores)
    return metrics.topk_accuracy(torch.cat(votes), test_labels, ks)

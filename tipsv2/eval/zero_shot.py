"""Zero-shot classification and segmentation from frozen image and text embeddings.

Class text embeddings are prompt ensembles (tipsv2.eval.features.class_embeddings). Classification
compares one CLS embedding with them; segmentation compares every patch token (by default the
MaskCLIP value-attention tokens, `dense=True`) and upsamples the cosine maps to label resolution,
following the official TIPS zero-shot segmentation protocol (whole image or TCL-style sliding window).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from tipsv2.eval import metrics
from tipsv2.eval.features import (Embedding, ImageEncoder, TextEncoder, batched, class_embeddings, normalize,
                                  patch_grid, resize_center_crop, resize_short_side, to_tensor)

# The 9 templates of the TCL paper, used by the official TIPS zero-shot segmentation evaluation.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "a photo of many {}.",
    "a photo of {}s.",
)


# ---------------------------------------------------------------- classification


@dataclass(frozen=True, kw_only=True)
class ZeroShotClassificationConfig:
    embedding: Embedding = Embedding.CLS1     # which CLS is compared with the class prompts
    templates: tuple[str, ...] = PROMPT_TEMPLATES
    image_size: int = 224                      # px, short-side resize + centre crop
    batch_size: int = 32
    ks: tuple[int, ...] = (1, 5)


def classification_metrics(image_embeddings: Tensor, labels: Tensor, class_text: Tensor,
                           ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """image_embeddings (N, D), labels (N,) long, class_text (C, D) L2-normalised -> top-k accuracy."""
    logits = normalize(image_embeddings) @ class_text.T   # (N, C) cosine
    return metrics.topk_accuracy(logits, labels, ks)


def zero_shot_classification(encode_image: ImageEncoder, encode_text: TextEncoder, class_names: Sequence[str],
                             items: Iterable[tuple[Image.Image, int]],
                             cfg: ZeroShotClassificationConfig = ZeroShotClassificationConfig(), *,
                             patch_size: int = 14) -> dict[str, float]:
    """items: (image, class index) pairs. Returns {top1, top5, num_images}."""
    class_text = class_embeddings(encode_text, class_names, cfg.templates)
    size = -(-cfg.image_size // patch_size) * patch_size
    embeddings, labels = [], []
    for batch in batched(items, cfg.batch_size):
        pixels = torch.stack([to_tensor(resize_center_crop(image, size)) for image, _ in batch])
        embeddings.append(getattr(encode_image(pixels), Embedding(cfg.embedding).value).float().cpu())
        labels += [int(label) for _, label in batch]
    if not labels:
        raise ValueError("zero_shot_classification got no items")
    result = classification_metrics(torch.cat(embeddings), torch.tensor(labels), class_text, cfg.ks)
    return {**result, "num_images": len(labels)}


# ---------------------------------------------------------------- segmentation


class SegMode(str, enum.Enum):
    WHOLE = "whole"   # one forward pass over the resized image
    SLIDE = "slide"   # overlapping windows, softmax of the cosine averaged where windows overlap (TCL)


class Background(str, enum.Enum):
    LABELLED = "labelled"     # every label value has a class name (a 'background' name may be one of them)
    THRESHOLD = "threshold"   # label 0 is background and has no prompt: predicted where the best cosine is low


@dataclass(frozen=True, kw_only=True)
class ZeroShotSegmentationConfig:
    mode: SegMode = SegMode.WHOLE
    short_side: int = 448                 # px, images are resized to this short side before encoding
    window: int = 448                     # px, square window of SegMode.SLIDE
    stride: int = 336                     # px, between windows of SegMode.SLIDE
    dense: bool = True                    # MaskCLIP value-attention patch tokens (encode_image(dense=True))
    templates: tuple[str, ...] = PROMPT_TEMPLATES
    ignore_index: int = metrics.IGNORE_INDEX
    background: Background = Background.LABELLED
    background_threshold: float = 0.0     # cosine; Background.THRESHOLD predicts 0 below it
    patch_size: int = 14                  # px

    def __post_init__(self) -> None:
        if self.mode is SegMode.SLIDE and not 0 < self.stride <= self.window:
            raise ValueError(f"slide mode needs 0 < stride <= window, got stride {self.stride}, window {self.window}")


def whole_scores(encode_image: ImageEncoder, image: Tensor, class_text: Tensor, *, dense: bool,
                 patch_size: int) -> Tensor:
    """image (3, H, W) -> cosine of each patch with each class, (C, h, w)."""
    grid = patch_grid(encode_image, image[None], patch_size=patch_size, dense=dense)[0]   # (h, w, D)
    return torch.einsum("cd,hwd->chw", class_text.to(grid.device), normalize(grid)).float().cpu()


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): the last window is shifted back to end at `length`."""
    count = max(length - window + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + window, length) - window, 0) for i in range(count)})


def slide_scores(encode_image: ImageEncoder, image: Tensor, class_text: Tensor, *, window: int, stride: int,
                 dense: bool, patch_size: int) -> tuple[Tensor, Tensor]:
    """image (3, H, W) -> (softmax of cosine, cosine), each (C, H, W), averaged over overlapping windows."""
    _, height, width = image.shape
    num_classes = class_text.shape[0]
    probs = torch.zeros(num_classes, height, width)
    cosine = torch.zeros(num_classes, height, width)
    counts = torch.zeros(height, width)
    for top in _window_starts(height, window, stride):
        for left in _window_starts(width, window, stride):
            crop = image[:, top:top + window, left:left + window]
            cos = whole_scores(encode_image, crop, class_text, dense=dense, patch_size=patch_size)
            cos = F.interpolate(cos[None], size=crop.shape[-2:], mode="bilinear", align_corners=False)[0]
            probs[:, top:top + window, left:left + window] += cos.softmax(dim=0)
            cosine[:, top:top + window, left:left + window] += cos
            counts[top:top + window, left:left + window] += 1
    return probs / counts, cosine / counts


def predict_segmentation(encode_image: ImageEncoder, image: Image.Image, class_text: Tensor,
                         label_size: tuple[int, int], cfg: ZeroShotSegmentationConfig) -> Tensor:
    """(H_label, W_label) long prediction for one image: class index, or with Background.THRESHOLD
    0 for background and i + 1 for class i."""
    pixels = to_tensor(resize_short_side(image, cfg.short_side))
    if cfg.mode is SegMode.WHOLE:
        scores = whole_scores(encode_image, pixels, class_text, dense=cfg.dense, patch_size=cfg.patch_size)
        cosine = scores
    else:
        scores, cosine = slide_scores(encode_image, pixels, class_text, window=cfg.window, stride=cfg.stride,
                                      dense=cfg.dense, patch_size=cfg.patch_size)
    scores = F.interpolate(scores[None], size=label_size, mode="bilinear", align_corners=False)[0]
    pred = scores.argmax(dim=0)
    if cfg.background is Background.THRESHOLD:
        cosine = F.interpolate(cosine[None], size=label_size, mode="bilinear", align_corners=False)[0]
        pred = torch.where(cosine.max(dim=0).values < cfg.background_threshold, 0, pred + 1)
    return pred


def zero_shot_segmentation(encode_image: ImageEncoder, encode_text: TextEncoder, class_names: Sequence[str],
                           items: Iterable[tuple[Image.Image, np.ndarray]],
                           cfg: ZeroShotSegmentationConfig = ZeroShotSegmentationConfig()) -> dict[str, float]:
    """items: (image, label map (H, W) with values in the label space, `ignore_index` for unlabelled).

    Label space: class i of `class_names` is label i (Background.LABELLED), or label i + 1 with label 0
    the background (Background.THRESHOLD). Returns {miou, pixel_accuracy, num_images}.
    """
    class_text = class_embeddings(encode_text, class_names, cfg.templates)
    num_labels = len(class_names) + (1 if cfg.background is Background.THRESHOLD else 0)
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    count = 0
    for image, label in items:
        label = torch.as_tensor(np.asarray(label)).long()
        pred = predict_segmentation(encode_image, image, class_text, tuple(label.shape), cfg)
        confusion += metrics.confusion_matrix(pred, label, num_labels, ignore_index=cfg.ignore_index)
        count += 1
    if count == 0:
        raise ValueError("zero_shot_segmentation got no items")
    return {**metrics.segmentation_metrics(confusion), "num_images": count}

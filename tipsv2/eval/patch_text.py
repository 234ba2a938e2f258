"""Patch-text alignment: does each patch token, compared with class prompts, name what it shows?

The primary metric of `bench/learning.py`. For every image, each patch gets the majority label of the
pixels it covers; patches whose majority is an object class (not background, label 0) are the
foreground patches. Each foreground patch's token (MaskCLIP value-attention tokens by default, as in
the official zero-shot segmentation protocol) is compared by cosine with one prompt-ensemble embedding
per class, and the best class is its prediction:

- accuracy: fraction of foreground patches predicted right (chance is printed beside it);
- auroc: per class, the area under the ROC curve of the patch-text cosine for telling that class's
  patches from every other patch (background included), averaged over the classes present;
- null/mean, null/p95: the accuracy of the same predictions with the class names shuffled over the
  predicted classes (`permutation_null`): what grouping patches by colour scores without naming them.

Both read the features as they are: nothing is trained. `colour_oracle` says how well a rule that sees
only one patch's pixels can do, so that a score can be read between chance and what a patch allows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tipsv2.eval.features import ImageEncoder, TextEncoder, class_embeddings, normalize, patch_grid, to_tensor

BACKGROUND = 0


@dataclass(frozen=True, kw_only=True)
class PatchTextConfig:
    # Prompts made of words that synthetic captions use, so that a tokenizer trained on them knows each one.
    templates: tuple[str, ...] = ("{}", "a {} shape", "a large {} shape", "a small {} shape")
    dense: bool = True        # MaskCLIP value-attention tokens (the official zero-shot segmentation features)
    patch_size: int = 14      # px


def patch_labels(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W) integer labels -> (h * w,) majority label of each patch, row-major (ties: the smaller label).
    H and W must be multiples of `patch_size`."""
    h, w = mask.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"mask of {h}x{w} px is not a whole number of {patch_size} px patches")
    rows, cols = h // patch_size, w // patch_size
    blocks = mask.reshape(rows, patch_size, cols, patch_size).transpose(0, 2, 1, 3).reshape(rows * cols, -1)
    counts = np.stack([np.bincount(b, minlength=int(mask.max()) + 1) for b in blocks])   # (h * w, L)
    return counts.argmax(axis=1)


def auroc(scores: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of `scores` (N,) for `positives` (N,) bool: the probability that a random
    positive scores above a random negative (ties count one half). NaN if either class is empty."""
    pos, neg = scores[positives].double(), scores[~positives].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def chance(labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy of guessing without looking: uniform over classes, and always the most frequent class."""
    counts = np.bincount(labels, minlength=num_classes)
    return {"uniform": 1.0 / num_classes, "majority": float(counts.max() / max(counts.sum(), 1))}


def permutation_null(confusion: np.ndarray, *, samples: int = 5040, seed: int = 0) -> np.ndarray:
    """Accuracies the same predictions would score if the class names were assigned to the predicted
    classes at random: for each permutation p of the C classes, sum_k confusion[p(k), k] / total, where
    confusion[t, k] counts patches of true class t predicted as k. Every permutation when C! <= `samples`,
    else `samples` random ones. Features that group patches by class (as self-distillation makes them)
    but name the groups arbitrarily score along this distribution, not along a binomial around chance."""
    c, total = confusion.shape[0], confusion.sum()
    if math.factorial(c) <= samples:
        perms = np.array(list(itertools.permutations(range(c))))
    else:
        rng = np.random.default_rng(seed)
        perms = np.stack([rng.permutation(c) for _ in range(samples)])
    return confusion[perms, np.arange(c)].sum(axis=1) / max(total, 1)


def patch_cosines(encode_image: ImageEncoder, class_text: Tensor, image: Image.Image,
                  cfg: PatchTextConfig = PatchTextConfig()) -> Tensor:
    """(h * w, C) cosine of each patch token (row-major, as `patch_labels`) with each class embedding (C, D);
    its argmax over C is the patch's zero-shot prediction."""
    grid = patch_grid(encode_image, to_tensor(image)[None], patch_size=cfg.patch_size, dense=cfg.dense)[0]
    tokens = normalize(grid.reshape(-1, grid.shape[-1])).cpu()                     # (h * w, D)
    return tokens @ class_text.T


def patch_text_alignment(encode_image: ImageEncoder, encode_text: TextEncoder, class_names: Sequence[str],
                         items: Iterable[tuple[Image.Image, np.ndarray]],
                         cfg: PatchTextConfig = PatchTextConfig()) -> dict[str, float]:
    """items: (image, mask) with mask (H, W) labels, 0 background and i + 1 for class_names[i], images of
    the mask's size (sides multiples of the patch size). Returns accuracy, auroc, chance and counts."""
    class_text = class_embeddings(encode_text, class_names, cfg.templates)          # (C, D)
    cosines, labels = [], []
    for image, mask in items:
        cosines.append(patch_cosines(encode_image, class_text, image, cfg))       # (h * w, C)
        labels.append(patch_labels(np.asarray(mask), cfg.patch_size))
    if not labels:
        raise ValueError("patch_text_alignment got no items")
    cosine, label = torch.cat(cosines), torch.from_numpy(np.concatenate(labels))
    foreground = label != BACKGROUND
    if not foreground.any():
        raise ValueError("patch_text_alignment found no foreground patch (every patch is mostly background)")
    predicted = cosine[foreground].argmax(dim=1) + 1
    per_class = [auroc(cosine[:, c], label == c + 1) for c in range(len(class_names))]
    present = [a for a in per_class if not np.isnan(a)]
    guess = chance(label[foreground].numpy() - 1, len(class_names))
    c = len(class_names)
    confusion = np.bincount((label[foreground].numpy() - 1) * c + (predicted.numpy() - 1), minlength=c * c)
    null = permutation_null(confusion.reshape(c, c))
    return {"accuracy": float((predicted == label[foreground]).double().mean()),
            "null/mean": float(null.mean()), "null/p95": float(np.quantile(null, 0.95)),
            "auroc": float(np.mean(present)),
            **{f"auroc/{name}": a for name, a in zip(class_names, per_class) if not np.isnan(a)},
            "chance": max(guess.values()), "chance/uniform": guess["uniform"], "chance/majority": guess["majority"],
            "num_foreground_patches": float(foreground.sum()), "num_patches": float(len(label))}


def colour_oracle(palette: Sequence[tuple[int, int, int]], items: Iterable[tuple[Image.Image, np.ndarray]], *,
                  patch_size: int = 14) -> float:
    """Foreground patch accuracy of a rule that sees one patch's pixels: the palette colour (class i is
    palette[i]) nearest to the patch's median RGB. What a patch allows, when the class is a colour."""
    colours = torch.tensor(palette, dtype=torch.float32)                            # (C, 3)
    right = total = 0
    for image, mask in items:
        label = patch_labels(np.asarray(mask), patch_size)
        pixels = to_tensor(image) * 255                                              # (3, H, W)
        rows, cols = pixels.shape[1] // patch_size, pixels.shape[2] // patch_size
        blocks = pixels.reshape(3, rows, patch_size, cols, patch_size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, -1)
        median = blocks.median(dim=2).values                                         # (h * w, 3)
        predicted = torch.cdist(median, colours).argmin(dim=1).numpy() + 1
        foreground = label != BACKGROUND
        right += int((predicted[foreground] == label[foreground]).sum())
        total += int(foreground.sum())
    if total == 0:
        raise ValueError("colour_oracle found no foreground patch")
    return right / total

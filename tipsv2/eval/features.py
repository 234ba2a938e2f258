"""Frozen-feature extraction for the evaluators.

The evaluators never touch a model directly: they take two callables, so that any feature source
(a TIPSModel, a released checkpoint, a hand-made stand-in in a test) can be evaluated the same way.

    encode_image(images, *, dense=False) -> object with .cls1 (B, D), .cls2 (B, D), .patches (B, N, D)
        images: float RGB in [0, 1], (B, 3, H, W), H and W multiples of the patch size
    encode_text(texts) -> (B, D)

`model_image_encoder(model)` and `model_text_encoder(model, tokenizer)` make them from a TIPSModel.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


class Embedding(str, enum.Enum):
    """Which image embedding is compared with text: CLS1 (trained on alt-text) or CLS2 (on synthetic captions)."""
    CLS1 = "cls1"
    CLS2 = "cls2"


class ImageEncoder(Protocol):
    def __call__(self, images: Tensor, *, dense: bool = False) -> Any: ...


TextEncoder = Callable[[Sequence[str]], Tensor]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_image_encoder(model: torch.nn.Module) -> ImageEncoder:
    """Frozen `model.encode_image` on the model's device, without gradients."""
    device = _device(model)

    @torch.no_grad()
    def encode(images: Tensor, *, dense: bool = False) -> Any:
        return model.encode_image(images.to(device), dense=dense)

    return encode


def model_text_encoder(model: torch.nn.Module, tokenizer: Callable[[Sequence[str]], tuple[Tensor, Tensor]], *,
                       batch_size: int = 256) -> TextEncoder:
    """Frozen `model.encode_text` behind `tokenizer` (texts -> ids, paddings), in batches of `batch_size` texts."""
    device = _device(model)

    @torch.no_grad()
    def encode(texts: Sequence[str]) -> Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            ids, paddings = tokenizer(list(texts[start:start + batch_size]))
            out.append(model.encode_text(ids.to(device), paddings.to(device)).float())
        return torch.cat(out)

    return encode


def normalize(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def embed_texts(encode_text: TextEncoder, texts: Sequence[str], *, batch_size: int = 256) -> Tensor:
    """(T, D) L2-normalised text embeddings, on the CPU."""
    if not texts:
        raise ValueError("embed_texts needs at least one text")
    chunks = [normalize(encode_text(list(texts[i:i + batch_size]))).cpu() for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks)


def class_embeddings(encode_text: TextEncoder, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
    """(C, D) per-class text embeddings: each template embedding L2-normalised, averaged over templates,
    renormalised (the CLIP / TIPS prompt-ensemble protocol)."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates must be a non-empty list of strings with a '{{}}' slot, got {templates!r}")
    texts = [t.format(name) for name in class_names for t in templates]
    per_template = embed_texts(encode_text, texts).reshape(len(class_names), len(templates), -1)   # (C, T, D)
    return normalize(per_template.mean(dim=1))


# ---------------------------------------------------------------- image preprocessing


def to_tensor(image: Image.Image) -> Tensor:
    """PIL image -> (3, H, W) float RGB in [0, 1] (TIPS takes no mean/std normalisation)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` px (bicubic), then crop the central size x size square."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def resize_center_crop_target(target: np.ndarray, size: int) -> np.ndarray:
    """The same geometry as `resize_center_crop` for a label or depth map (H, W), nearest neighbour so
    that no label is invented and invalid depth (0) is not blended into valid depth."""
    h, w = target.shape
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = np.asarray(Image.fromarray(target).resize((new_w, new_h), Image.NEAREST))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return resized[top:top + size, left:left + size]


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so that the short side is `size` px, keeping the aspect ratio (bicubic)."""
    w, h = image.size
    scale = size / min(w, h)
    return image.convert("RGB").resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BICUBIC)


def to_patch_multiple(images: Tensor, patch_size: int) -> Tensor:
    """(B, 3, H, W) -> (B, 3, H', W') with H', W' rounded up to multiples of `patch_size` (bicubic)."""
    h, w = images.shape[-2:]
    new_h, new_w = math.ceil(h / patch_size) * patch_size, math.ceil(w / patch_size) * patch_size
    if (new_h, new_w) == (h, w):
        return images
    return F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False).clamp(0, 1)


def patch_grid(encode_image: ImageEncoder, images: Tensor, *, patch_size: int = 14, dense: bool = False) -> Tensor:
    """(B, 3, H, W) -> (B, h, w, D) patch tokens, h = ceil(H / patch_size), on the encoder's device."""
    images = to_patch_multiple(images, patch_size)
    h, w = images.shape[-2] // patch_size, images.shape[-1] // patch_size
    patches = encode_image(images, dense=dense).patches   # (B, h * w, D)
    if patches.shape[1] != h * w:
        raise ValueError(f"encoder returned {patches.shape[1]} patch tokens for a {h} x {w} grid "
                         f"(patch_size {patch_size}); is patch_size right?")
    return patches.reshape(patches.shape[0], h, w, -1)


# ---------------------------------------------------------------- batched extraction


@dataclass(frozen=True, kw_only=True)
class FeatureSet:
    """Frozen features of N images, on the CPU, as float32."""
    cls1: Tensor                  # (N, D)
    cls2: Tensor                  # (N, D)
    patches: Tensor | None        # (N, h, w, D), None unless requested

    def embedding(self, which: Embedding | str) -> Tensor:
        return {Embedding.CLS1: self.cls1, Embedding.CLS2: self.cls2}[Embedding(which)]


def batched(items: Iterable[Any], batch_size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def extract_features(encode_image: ImageEncoder, images: Iterable[Image.Image], *, image_size: int,
                     batch_size: int = 32, patch_size: int = 14, keep_patches: bool = False,
                     dense: bool = False) -> FeatureSet:
    """Encode every image after `resize_center_crop(image, image_size)`; image_size is rounded up to a
    multiple of `patch_size`. keep_patches=True also returns the (N, h, w, D) patch grids."""
    size = math.ceil(image_size / patch_size) * patch_size
    cls1, cls2, patches = [], [], []
    for batch in batched(images, batch_size):
        pixels = torch.stack([to_tensor(resize_center_crop(im, size)) for im in batch])   # (B, 3, S, S)
        feats = encode_image(pixels, dense=dense)
        cls1.append(feats.cls1.float().cpu())
        cls2.append(feats.cls2.float().cpu())
        if keep_patches:
            grid = size // patch_size
            patches.append(feats.patches.float().cpu().reshape(len(batch), grid, grid, -1))
    if not cls1:
        raise ValueError("extract_features got no images")
    return FeatureSet(cls1=torch.cat(cls1), cls2=torch.cat(cls2),
                      patches=torch.cat(patches) if keep_patches else None)


@torch.no_grad()
def patch_text_similarity(model: torch.nn.Module, tokenizer: Callable[[Sequence[str]], tuple[Tensor, Tensor]],
                          image: Tensor, texts: Sequence[str]) -> Tensor:
    """Cosine of every value-attention (MaskCLIP) patch token of `image` (3, H, W) with each text: (T, h, w)."""
    model.eval()
    device = _device(model)
    patches = normalize(model.encode_image(image[None].to(device), dense=True).patches[0])   # (N, D)
    ids, paddings = tokenizer(list(texts))
    text = normalize(model.encode_text(ids.to(device), paddings.to(device)))                # (T, D)
    rows, cols = image.shape[-2] // model.patch_size, image.shape[-1] // model.patch_size
    return (text @ patches.T).reshape(len(texts), rows, cols).float().cpu()

"""Image-text retrieval (COCO / Flickr style): image->text and text->image recall@k.

Each image may have several captions. Image->text: a hit when any of the image's captions is in the
top k. Text->image: each caption has exactly one correct image.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from tipsv2.eval import metrics
from tipsv2.eval.features import (Embedding, ImageEncoder, TextEncoder, batched, embed_texts, normalize,
                                  resize_center_crop, to_tensor)


@dataclass(frozen=True, kw_only=True)
class RetrievalConfig:
    embedding: Embedding = Embedding.CLS2   # which CLS is compared with the captions
    image_size: int = 224                    # px, short-side resize + centre crop
    batch_size: int = 32
    ks: tuple[int, ...] = (1, 5)


def retrieval_metrics(image_embeddings: Tensor, text_embeddings: Tensor, text_image: Tensor,
                      ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """image_embeddings (N, D), text_embeddings (T, D), text_image (T,) long: the image of each text.
    Returns {i2t_r1, i2t_r5, t2i_r1, t2i_r5} (for ks = (1, 5))."""
    text_image = text_image.long()
    n = image_embeddings.shape[0]
    if text_image.numel() and (text_image.min() < 0 or text_image.max() >= n):
        raise ValueError(f"text_image values must index the {n} images, got range "
                         f"[{int(text_image.min())}, {int(text_image.max())}]")
    similarity = normalize(image_embeddings) @ normalize(text_embeddings).T   # (N, T)
    positives = text_image[None, :] == torch.arange(n)[:, None]               # (N, T)
    i2t = metrics.recall_at_k(similarity, positives, ks)
    t2i = metrics.recall_at_k(similarity.T, positives.T, ks)
    return {**{f"i2t_{k}": v for k, v in i2t.items()}, **{f"t2i_{k}": v for k, v in t2i.items()}}


def image_text_retrieval(encode_image: ImageEncoder, encode_text: TextEncoder,
                         items: Iterable[tuple[Image.Image, Sequence[str]]],
                         cfg: RetrievalConfig = RetrievalConfig(), *, patch_size: int = 14) -> dict[str, float]:
    """items: (image, its captions). Returns recall@k both ways plus num_images and num_texts."""
    size = -(-cfg.image_size // patch_size) * patch_size
    embeddings, texts, text_image = [], [], []
    num_images = 0
    for batch in batched(items, cfg.batch_size):
        pixels = torch.stack([to_tensor(resize_center_crop(image, size)) for image, _ in batch])
        embeddings.append(getattr(encode_image(pixels), Embedding(cfg.embedding).value).float().cpu())
        for _, captions in batch:
            if not captions:
                raise ValueError(f"image {num_images} has no captions; every image needs at least one")
            text_image += [num_images] * len(captions)
            texts += list(captions)
            num_images += 1
    if not texts:
        raise ValueError("image_text_retrieval got no items")
    image_embeddings = torch.cat(embeddings)
    result = retrieval_metrics(image_embeddings, embed_texts(encode_text, texts), torch.tensor(text_image), cfg.ks)
    return {**result, "num_images": image_embeddings.shape[0], "num_texts": len(texts)}

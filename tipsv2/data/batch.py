"""From one stored row to a training example, and from examples to a typed batch.

`make_example` runs per row on a CPU worker (Ray Data map): decode the image bytes, convert to RGB,
draw the crops and pick the texts. Every draw comes from `example_rng(seed, epoch, id, stream)`, so an
example is the same whichever worker makes it. `collate` stacks examples, tokenises both texts and
draws one patch mask per example (also per-example seeded unless an explicit generator is passed).
With `masking_cfg=None` (distillation) every mask is False.

Granularity index in `Batch.granularity`: position in `Granularity` (short 0, medium 1, long 2);
-1 when CLS2 fell back to the alt-text.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from tipsv2.data.captions import (CaptionFallback, CaptionSamplingConfig, example_rng,
                                  sample_caption)
from tipsv2.data.crops import PATCH_SIZE, CropConfig, make_crops
from tipsv2.data.masking import MaskingConfig, make_mask, random_mask
from tipsv2.data.schema import Granularity, Slot

GRANULARITY_INDEX: dict[Granularity, int] = {g: i for i, g in enumerate(Granularity)}
FALLBACK_INDEX = -1      # `Batch.granularity` when CLS2 trains on the alt-text


class TextTokenizer(Protocol):
    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (ids (B, L) long, paddings (B, L) with 1 at pads)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Example:
    id: str
    global_crop: torch.Tensor            # (3, G, G) float in [0, 1]
    local_crops: torch.Tensor            # (M, 3, L, L) float in [0, 1]
    alt_text: str                        # CLS1 target text
    synthetic: str                       # CLS2 target text
    granularity: Granularity | None      # of `synthetic`; None when it is the alt-text
    fallback: CaptionFallback = CaptionFallback.NONE
    source: str | None = None            # caption source of `synthetic`; None when it is the alt-text
    seed: int = 0                        # (seed, epoch) this example was drawn with; seeds its mask
    epoch: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Batch:
    ids: list[str]
    global_crop: torch.Tensor            # (B, 3, G, G) float
    local_crops: torch.Tensor            # (B, M, 3, L, L) float
    masks: torch.Tensor                  # (B, N) bool, N = (G / 14) ** 2, True = masked patch
    alt_ids: torch.Tensor                # (B, Lt) long
    alt_paddings: torch.Tensor           # (B, Lt), 1 at pads
    syn_ids: torch.Tensor                # (B, Lt) long
    syn_paddings: torch.Tensor           # (B, Lt), 1 at pads
    granularity: torch.Tensor            # (B,) long, index into Granularity, -1 for the alt fallback

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    def __len__(self) -> int:
        return len(self.ids)


def decode_image(image: bytes | Image.Image, *, example_id: str) -> Image.Image:
    """Encoded bytes or a PIL image -> upright RGB PIL image (transparency composited over white)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(image))
            image.load()
        except Exception as err:   # PIL raises several types for corrupt data
            raise ValueError(f"example {example_id!r}: cannot decode image: {err}") from err
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def make_example(image: bytes | Image.Image, *, example_id: str, alt_text: str | None,
                 captions: dict[Slot | Granularity, str | None], epoch: int, crop_cfg: CropConfig,
                 caption_cfg: CaptionSamplingConfig) -> Example:
    """Decode, crop and pick texts for one row; seeded by (caption_cfg.seed, epoch, example_id).

    Raises ValueError naming the id for undecodable bytes or a row with no text at all.
    """
    rgb = decode_image(image, example_id=example_id)
    seed = caption_cfg.seed
    crops = make_crops(rgb, cfg=crop_cfg,
                       rng=example_rng(seed=seed, epoch=epoch, example_id=example_id, stream="crops"))
    texts = sample_caption(alt_text, captions, cfg=caption_cfg, example_id=example_id,
                           rng=example_rng(seed=seed, epoch=epoch, example_id=example_id, stream="caption"))
    return Example(id=example_id, global_crop=crops.global_crop, local_crops=crops.local_crops,
                   alt_text=texts.alt_text, synthetic=texts.synthetic, granularity=texts.granularity,
                   fallback=texts.fallback, source=texts.source, seed=seed, epoch=epoch)


def _masks(examples: list[Example], *, grid: tuple[int, int], masking_cfg: MaskingConfig | None,
           rng: np.random.Generator | None) -> torch.Tensor:
    """(B, N) bool; one mask per example, per-example seeded when `rng` is None."""
    if masking_cfg is None:
        return torch.zeros(len(examples), grid[0] * grid[1], dtype=torch.bool)
    masks = [make_mask(grid, masking_cfg,
                       rng if rng is not None else
                       example_rng(seed=ex.seed, epoch=ex.epoch, example_id=ex.id, stream="mask"))
             for ex in examples]
    return torch.from_numpy(np.stack(masks))


def collate(examples: list[Example], *, tokenizer: TextTokenizer, masking_cfg: MaskingConfig | None,
            patch_size: int = PATCH_SIZE, rng: np.random.Generator | None = None) -> Batch:
    """Stack examples into a Batch, tokenise their texts and draw their patch masks.

    `masking_cfg=None` gives all-False masks (distillation). `rng=None` (the default) seeds each mask
    from (seed, epoch, id) so masks do not depend on batch composition; pass a generator to override.
    """
    if not examples:
        raise ValueError("collate needs at least one example, got an empty list")
    size = examples[0].global_crop.shape[-1]
    if size % patch_size:
        raise ValueError(f"global crop side {size} px is not a multiple of patch_size {patch_size}")
    alt_ids, alt_paddings = tokenizer([ex.alt_text for ex in examples])
    syn_ids, syn_paddings = tokenizer([ex.synthetic for ex in examples])
    granularity = [FALLBACK_INDEX if ex.granularity is None else GRANULARITY_INDEX[ex.granularity]
                   for ex in examples]
    grid = (size // patch_size, size // patch_size)
    return Batch(
        ids=[ex.id for ex in examples],
        global_crop=torch.stack([ex.global_crop for ex in examples]),
        local_crops=torch.stack([ex.local_crops for ex in examples]),
        masks=_masks(examples, grid=grid, masking_cfg=masking_cfg, rng=rng),
        alt_ids=alt_ids.long(), alt_paddings=alt_paddings,
        syn_ids=syn_ids.long(), syn_paddings=syn_paddings,
        granularity=torch.tensor(granularity, dtype=torch.long),
    )


def random_batch(*, batch_size: int, crops: CropConfig, mask_ratio: float, vocab_size: int, text_len: int,
                 patch_size: int = PATCH_SIZE, seed: int = 0) -> Batch:
    """A Batch of uniform random pixels and token ids, with `mask_ratio` of each global crop's patches
    masked: the shapes of a training batch without decoding, cropping or tokenising (benchmarks, tests)."""
    gen = torch.Generator().manual_seed(seed)
    grid = (crops.global_size // patch_size,) * 2
    rng = np.random.default_rng(seed)
    ids = [torch.randint(1, vocab_size, (batch_size, text_len), generator=gen) for _ in range(2)]
    paddings = torch.zeros(batch_size, text_len)
    return Batch(ids=[f"random-{i}" for i in range(batch_size)],
                 global_crop=torch.rand(batch_size, 3, crops.global_size, crops.global_size, generator=gen),
                 local_crops=torch.rand(batch_size, crops.local_crops, 3, crops.local_size, crops.local_size,
                                        generator=gen),
                 masks=torch.from_numpy(np.stack([random_mask(grid, mask_ratio, rng) for _ in range(batch_size)])),
                 alt_ids=ids[0], alt_paddings=paddings, syn_ids=ids[1], syn_paddings=paddings.clone(),
                 granularity=torch.zeros(batch_size, dtype=torch.long))

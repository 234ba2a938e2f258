"""Patch-text similarity heatmaps: one figure function for the export's heatmaps and the demo report's.

    rows = [HeatmapRow(image, title="scene 0", panels=[Panel("teacher", teacher, "a red circle")])]
    plot_heatmaps(rows, Path("heatmaps.png"), tokenizer=tokenizer)   # per row: the image, one overlay per panel
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tipsv2.eval.features import patch_text_similarity
from tipsv2.models.model import TIPSModel


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (workers and CI have no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@torch.no_grad()
def upsampled_similarity(model: TIPSModel, tokenizer, image, prompt: str) -> np.ndarray:
    """(H, W) cosine of each value-attention patch token with the prompt's embedding, bilinearly upsampled."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    cos = patch_text_similarity(model, tokenizer, pixels, [prompt])                # (1, h, w)
    return F.interpolate(cos[None], size=pixels.shape[-2:], mode="bilinear", align_corners=False)[0, 0].numpy()


@dataclass(frozen=True)
class Panel:
    title: str
    model: TIPSModel
    prompt: str


@dataclass(frozen=True)
class HeatmapRow:
    image: object                 # PIL image or (H, W, 3) uint8 array
    title: str
    panels: Sequence[Panel]


def plot_heatmaps(rows: Sequence[HeatmapRow], path: Path, *, tokenizer, dpi: int = 90, size: float = 2.6) -> Path:
    """Per row: the image (titled), then each panel's model's similarity to its prompt over the image."""
    plt = pyplot()
    columns = 1 + max(len(row.panels) for row in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(size * columns, size * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row.image)
        axes[r, 0].set_title(row.title, fontsize=7)
        for c, panel in enumerate(row.panels, start=1):
            axes[r, c].imshow(row.image)
            axes[r, c].imshow(upsampled_similarity(panel.model, tokenizer, row.image, panel.prompt), cmap="jet",
                              alpha=0.5)
            axes[r, c].set_title(panel.title[:30], fontsize=8)
        for axis in axes[r]:
            axis.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path

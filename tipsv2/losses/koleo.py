"""KoLeo regulariser (Kozachenko-Leonenko entropy estimate; Sablayrolles et al. 2018), as in DINOv2.

Spreads a batch of embeddings over the sphere by penalising small nearest-neighbour distances. Computed
on the local batch only (DINOv2 does the same); off by default in TIPSv2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class KoLeoConfig:
    weight: float = 0.0  # 0 turns the term off; DINOv2 uses 0.1 on the student's global-crop CLS

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"koleo weight must be >= 0, got {self.weight}")


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """mean_i -log(||x_i - x_nn(i)|| + eps) over L2-normalised rows of x (B, D), B >= 2.

    The nearest neighbour of each row (excluding itself) is picked without gradient; the distance to it
    carries the gradient.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo needs embeddings (B, D) with B >= 2, got shape {tuple(x.shape)}")
    x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.T                                   # (B, B); max cosine = nearest neighbour
        similarity.fill_diagonal_(-2.0)                        # below any cosine: never pick yourself
        neighbour = similarity.argmax(dim=1)                   # (B,)
    distances = (x - x[neighbour]).norm(dim=-1)                # (B,)
    return -torch.log(distances + eps).mean()

"""The DINO / iBOT projection head: MLP, L2 normalisation, weight-normalised prototypes.

DINOv2's head with the prototype layer's weight norm fixed to 1, written without torch's weight_norm
parametrisation: the raw weight V (K, bottleneck) is a plain parameter and each forward uses V / ||V||_row.
Plain parameters are what DeepSpeed ZeRO-3 partitions and gathers, and EMA copies of the head are a
plain state-dict average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True, kw_only=True)
class DinoHeadConfig:
    prototypes: int = 32768  # K, output logits
    hidden: int = 2048
    bottleneck: int = 256
    layers: int = 3          # linear layers before the prototypes (1: a single Linear to the bottleneck)

    def __post_init__(self) -> None:
        for name in ("prototypes", "hidden", "bottleneck", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"dino head {name} must be >= 1, got {getattr(self, name)}")


def _mlp(in_dim: int, cfg: DinoHeadConfig) -> nn.Sequential:
    """Linear-GELU x (layers - 1), then Linear to the bottleneck."""
    widths = [in_dim] + [cfg.hidden] * (cfg.layers - 1) + [cfg.bottleneck]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        modules.append(nn.Linear(a, b))
        if i < cfg.layers - 1:
            modules.append(nn.GELU())
    return nn.Sequential(*modules)


class DinoHead(nn.Module):
    """(..., in_dim) features -> (..., K) prototype logits, each a cosine in [-1, 1]."""

    def __init__(self, in_dim: int, cfg: DinoHeadConfig) -> None:
        super().__init__()
        self.mlp = _mlp(in_dim, cfg)
        self.prototypes = nn.Parameter(torch.empty(cfg.prototypes, cfg.bottleneck))  # V (K, bottleneck)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                # Truncated at +-2 std (DINOv2 passes torch's default bounds +-2 absolute, i.e. no truncation).
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(module.bias)
        # DINOv2 leaves its prototype layer at nn.Linear's default init, U(-1/sqrt(bottleneck), +); only the
        # direction of each row matters, the scale sets the step size of V under the row normalisation.
        bound = 1.0 / math.sqrt(self.prototypes.shape[1])
        nn.init.uniform_(self.prototypes, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(self.mlp(x), dim=-1)              # (..., bottleneck)
        weight = F.normalize(self.prototypes, dim=-1)     # (K, bottleneck), unit rows
        return z @ weight.T                               # (..., K)

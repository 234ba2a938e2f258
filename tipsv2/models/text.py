"""The TIPS text tower: pre-LN bidirectional transformer over SentencePiece ids.

Token embedding x sqrt(width) + fixed sinusoidal positions (timescales 1 to 1e4); blocks with a ReLU MLP
whose hidden and output activations are zeroed at pads; final LayerNorm; mean over non-pad tokens.
Parameter names follow the released PyTorch checkpoints (`transformer.resblocks.N.*`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tipsv2.models.config import TextConfig


def sinusoidal_positions(length: int, width: int, *, min_timescale: float = 1.0,
                         max_timescale: float = 1.0e4) -> Tensor:
    """(1, L, D) fixed position signal: sines of geometric timescales, then cosines, zero-padded if D is odd."""
    half = width // 2
    step = math.log(max_timescale / min_timescale) / max(half - 1, 1)
    inv = min_timescale * torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    signal = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(signal, (0, width % 2))[None]


class TextAttention(nn.Module):
    """Multi-head self-attention with the packed in_proj layout of the released checkpoints."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x (B, L, D); valid (B, L) bool, False at pads (pads are never attended to)."""
        b, length, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(b, length, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).flatten(2))


class MaskedMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """keep (B, L, 1) float: 1 at tokens, 0 at pads."""
        return self.c_proj(F.relu(self.c_fc(x)) * keep) * keep


class ResidualBlock(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = TextAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = MaskedMlp(cfg.width, cfg.mlp_dim)

    def forward(self, x: Tensor, valid: Tensor, keep: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), valid)
        return x + self.mlp(self.ln_2(x), keep)


class Transformer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(cfg) for _ in range(cfg.depth))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=cfg.width ** -0.5)

    def forward(self, ids: Tensor, paddings: Tensor) -> Tensor:
        """ids long (B, L), paddings (B, L) with 1 at pads -> (B, D) mean over non-pad tokens."""
        if ids.dim() != 2 or ids.shape != paddings.shape:
            raise ValueError(f"ids and paddings must both be (B, L); got {tuple(ids.shape)} and "
                             f"{tuple(paddings.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}); got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        valid = paddings == 0                                             # (B, L) bool
        keep = valid.unsqueeze(-1).to(self.token_embedding.weight.dtype)  # (B, L, 1)
        x = self.token_embedding(ids) * math.sqrt(self.cfg.width)
        x = x + sinusoidal_positions(ids.shape[1], self.cfg.width).to(x)
        # A row of only pads would attend to nothing (NaN); let it attend everywhere, its output is masked.
        attend = valid | ~valid.any(dim=1, keepdim=True)
        for block in self.transformer.resblocks:
            x = block(x, attend, keep)
        x = self.ln_final(x)
        counts = keep.sum(dim=1) + 1e-8                                   # (B, 1)
        return (x * keep).sum(dim=1) / counts

"""The TIPS vision tower: a DINOv2-style ViT/14 with two CLS tokens.

Token layout `[CLS1, CLS2, patches]`. CLS1 and the patches get the learned position embedding; CLS2
(stored as `register_tokens`, as in the released checkpoints) is inserted after the position embedding is
added and gets none. Module and parameter names follow the released PyTorch checkpoints, so a state dict
from `official.py` loads without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tipsv2.models.config import FFN, VisionConfig

LN_EPS = 1e-6


@dataclass
class ImageFeatures:
    """Vision outputs after the final norm, not L2-normalised."""
    cls1: Tensor     # (B, D)
    cls2: Tensor     # (B, D)
    patches: Tensor  # (B, N, D), row-major over the (H/14, W/14) grid


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, N, D)


class LayerScale(nn.Module):
    def __init__(self, width: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def qkv_heads(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv_heads(x)                      # each (B, heads, N, d_head)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))

    def values(self, x: Tensor) -> Tensor:
        """MaskCLIP: the value vectors stand in for the attention output (attention = identity)."""
        v = self.qkv_heads(x)[2]
        return self.proj(v.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def swiglu_hidden(mlp_dim: int) -> int:
    """DINOv2's fused SwiGLU width: 2/3 of the MLP size, rounded up to a multiple of 8."""
    return (int(mlp_dim * 2 / 3) + 7) // 8 * 8


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""
    if rate == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype) >= rate
    return x * keep / (1.0 - rate)


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.attn = Attention(cfg.width, cfg.heads)
        self.ls1 = LayerScale(cfg.width, cfg.layerscale_init)
        self.norm2 = nn.LayerNorm(cfg.width, eps=LN_EPS)
        if cfg.ffn == FFN.SWIGLU:
            self.mlp: nn.Module = SwiGLU(cfg.width, swiglu_hidden(cfg.mlp_dim))
        else:
            self.mlp = Mlp(cfg.width, cfg.mlp_dim)
        self.ls2 = LayerScale(cfg.width, cfg.layerscale_init)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor, *, dense: bool = False, stochastic_depth: bool = True) -> Tensor:
        attn = self.attn.values if dense else self.attn
        drop = self.training and stochastic_depth
        x = x + drop_path(self.ls1(attn(self.norm1(x))), self.drop_rate, drop)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_rate, drop)


class VisionTransformer(nn.Module):
    num_register_tokens = 1  # CLS2

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.register_tokens = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, cfg.width))
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.width))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB in [0, 1]; got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image sides must be multiples of {self.patch_size}; got {h}x{w} "
                             f"(nearest valid: {h // self.patch_size * self.patch_size}x"
                             f"{w // self.patch_size * self.patch_size})")

    def interpolate_pos_encoding(self, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        """Position embedding for a rows x cols patch grid: (1, 1 + rows*cols, D)."""
        n_stored = self.pos_embed.shape[1] - 1
        side = math.isqrt(n_stored)
        if rows == side and cols == side:
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        grid = F.interpolate(grid, size=(rows, cols), mode=self.cfg.pos_interpolation, antialias=True,
                             align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)

    def prepare_tokens(self, images: Tensor, masks: Tensor | None) -> Tensor:
        """(B, 3, H, W) -> (B, 2 + N, D): mask, add position embedding, then insert CLS2."""
        self.check_images(images)
        b, _, h, w = images.shape
        x = self.patch_embed(images)                                     # (B, N, D)
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(f"masks must be bool (B, N) = {tuple(x.shape[:2])}; got {tuple(masks.shape)}")
            x = torch.where(masks.bool().unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(h // self.patch_size, w // self.patch_size, x.dtype)
        return torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)

    def forward(self, images: Tensor, masks: Tensor | None = None, *, dense: bool = False,
                stochastic_depth: bool = True) -> ImageFeatures:
        """stochastic_depth=False runs without drop path even in training mode (teacher targets)."""
        x = self.prepare_tokens(images, masks)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, dense=dense and i == last, stochastic_depth=stochastic_depth)
        x = self.norm(x)
        return ImageFeatures(cls1=x[:, 0], cls2=x[:, 1], patches=x[:, 2:])

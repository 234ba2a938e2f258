"""Plain reference implementations of the released TIPS encoders, for parity tests only.

Written from the released PyTorch code's algorithm (google-deepmind/tips `pytorch/image_encoder.py`,
a DINOv2 ViT with one register token as CLS2, and `pytorch/text_encoder.py`), deliberately in a
different style from tipsv2.models: explicit softmax attention, functional ops on a flat dict of
arrays, the text tower through torch.nn.MultiheadAttention in (L, N, D) layout with additive -inf
masks exactly as the official text encoder does. Float64 throughout, so differences measure our model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

Arrays = dict[str, np.ndarray]


def _t(arrays: Arrays, key: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(arrays[key], dtype=np.float64))


def _layer_norm(x, arrays, prefix, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * _t(arrays, prefix + ".weight") + _t(arrays, prefix + ".bias")


def _linear(x, arrays, prefix):
    return x @ _t(arrays, prefix + ".weight").T + _t(arrays, prefix + ".bias")


@torch.no_grad()
def reference_vision(arrays: Arrays, images: np.ndarray, heads: int, masks: np.ndarray | None = None,
                     dense: bool = False) -> dict[str, np.ndarray]:
    x_img = torch.from_numpy(images.astype(np.float64))
    b, _, h, w = x_img.shape
    weight = _t(arrays, "patch_embed.proj.weight")
    p = weight.shape[-1]
    x = F.conv2d(x_img, weight, _t(arrays, "patch_embed.proj.bias"), stride=p)   # (B, D, h, w)
    x = x.flatten(2).transpose(1, 2)
    if masks is not None:
        m = torch.from_numpy(masks)[..., None]
        x = torch.where(m, _t(arrays, "mask_token")[None], x)
    x = torch.cat([_t(arrays, "cls_token").expand(b, 1, -1), x], dim=1)
    pos = _t(arrays, "pos_embed")
    side = int(math.isqrt(pos.shape[1] - 1))
    rows, cols = h // p, w // p
    if (rows, cols) != (side, side):
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bilinear", antialias=True, align_corners=False)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)
    x = x + pos
    x = torch.cat([x[:, :1], _t(arrays, "register_tokens").expand(b, 1, -1), x[:, 1:]], dim=1)
    depth = len({k.split(".")[1] for k in arrays if k.startswith("blocks.")})
    d = x.shape[-1]
    for i in range(depth):
        pre = f"blocks.{i}"
        y = _layer_norm(x, arrays, pre + ".norm1", 1e-6)
        qkv = _linear(y, arrays, pre + ".attn.qkv").reshape(b, -1, 3, heads, d // heads)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))            # (B, H, N, dh)
        if dense and i == depth - 1:
            out = v
        else:
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
            out = att @ v
        out = _linear(out.transpose(1, 2).reshape(b, -1, d), arrays, pre + ".attn.proj")
        x = x + out * _t(arrays, pre + ".ls1.gamma")
        y = _layer_norm(x, arrays, pre + ".norm2", 1e-6)
        if pre + ".mlp.w12.weight" in arrays:
            a, g = _linear(y, arrays, pre + ".mlp.w12").chunk(2, dim=-1)
            y = _linear(a * torch.sigmoid(a) * g, arrays, pre + ".mlp.w3")
        else:
            y = _linear(y, arrays, pre + ".mlp.fc1")
            y = _linear(0.5 * y * (1 + torch.erf(y / math.sqrt(2))), arrays, pre + ".mlp.fc2")
        x = x + y * _t(arrays, pre + ".ls2.gamma")
    x = _layer_norm(x, arrays, "norm", 1e-6)
    return {"cls1": x[:, 0].numpy(), "cls2": x[:, 1].numpy(), "patches": x[:, 2:].numpy()}


@torch.no_grad()
def reference_text(arrays: Arrays, ids: np.ndarray, paddings: np.ndarray, heads: int) -> np.ndarray:
    ids_t = torch.from_numpy(ids)
    pad = torch.from_numpy(paddings.astype(np.float64))
    emb = _t(arrays, "token_embedding.weight")
    d = emb.shape[1]
    length = ids.shape[1]
    # Sinusoids: geometric timescales from 1 to 1e4, sin then cos.
    n = d // 2
    inc = math.log(1e4) / max(n - 1, 1)
    inv = torch.exp(torch.arange(n, dtype=torch.float64) * -inc)
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv[None]
    pos = torch.cat([ang.sin(), ang.cos()], dim=1)
    x = emb[ids_t] * math.sqrt(d) + pos[None]
    keep = (pad == 0).double()                                            # (B, L)
    x = x.permute(1, 0, 2)                                                # (L, B, D)
    depth = len({k.split(".")[2] for k in arrays if k.startswith("transformer.resblocks.")})
    for i in range(depth):
        pre = f"transformer.resblocks.{i}"
        mha = torch.nn.MultiheadAttention(d, heads, dtype=torch.float64)
        mha.load_state_dict({"in_proj_weight": _t(arrays, pre + ".attn.in_proj_weight"),
                             "in_proj_bias": _t(arrays, pre + ".attn.in_proj_bias"),
                             "out_proj.weight": _t(arrays, pre + ".attn.out_proj.weight"),
                             "out_proj.bias": _t(arrays, pre + ".attn.out_proj.bias")})
        mask = keep[:, None, None, :].repeat(1, heads, length, 1).flatten(0, 1)
        mask = torch.zeros_like(mask).masked_fill(mask == 0, float("-inf"))
        y = _layer_norm(x, arrays, pre + ".ln_1", 1e-5)
        x = x + mha(y, y, y, need_weights=False, attn_mask=mask)[0]
        y = _layer_norm(x, arrays, pre + ".ln_2", 1e-5)
        y = torch.relu(_linear(y, arrays, pre + ".mlp.c_fc")) * keep.T[..., None]
        x = x + _linear(y, arrays, pre + ".mlp.c_proj") * keep.T[..., None]
    x = _layer_norm(x.permute(1, 0, 2), arrays, "ln_final", 1e-5)
    x = torch.where(pad[..., None] > 0, torch.zeros_like(x), x)
    return (x.sum(1) / ((1 - pad).sum(1, keepdim=True) + 1e-8)).numpy()


def random_vision_arrays(rng: np.random.Generator, *, width: int, depth: int, mlp_dim: int, grid: int,
                         swiglu: bool = False, patch: int = 14) -> Arrays:
    """Random arrays in the released vision layout (scaled so activations stay O(1))."""
    def n(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)
    a = {"cls_token": n(1, 1, width, scale=1.0), "register_tokens": n(1, 1, width, scale=1.0),
         "pos_embed": n(1, 1 + grid * grid, width, scale=1.0), "mask_token": n(1, width, scale=1.0),
         "patch_embed.proj.weight": n(width, 3, patch, patch, scale=0.05), "patch_embed.proj.bias": n(width),
         "norm.weight": 1 + n(width, scale=0.1), "norm.bias": n(width, scale=0.1)}
    hidden = (int(mlp_dim * 2 / 3) + 7) // 8 * 8
    for i in range(depth):
        p = f"blocks.{i}."
        a |= {p + "norm1.weight": 1 + n(width, scale=0.1), p + "norm1.bias": n(width, scale=0.1),
              p + "attn.qkv.weight": n(3 * width, width, scale=width ** -0.5), p + "attn.qkv.bias": n(3 * width),
              p + "attn.proj.weight": n(width, width, scale=width ** -0.5), p + "attn.proj.bias": n(width),
              p + "ls1.gamma": n(width, scale=0.5), p + "norm2.weight": 1 + n(width, scale=0.1),
              p + "norm2.bias": n(width, scale=0.1), p + "ls2.gamma": n(width, scale=0.5)}
        if swiglu:
            a |= {p + "mlp.w12.weight": n(2 * hidden, width, scale=width ** -0.5), p + "mlp.w12.bias": n(2 * hidden),
                  p + "mlp.w3.weight": n(width, hidden, scale=hidden ** -0.5), p + "mlp.w3.bias": n(width)}
        else:
            a |= {p + "mlp.fc1.weight": n(mlp_dim, width, scale=width ** -0.5), p + "mlp.fc1.bias": n(mlp_dim),
                  p + "mlp.fc2.weight": n(width, mlp_dim, scale=mlp_dim ** -0.5), p + "mlp.fc2.bias": n(width)}
    return a


def random_text_arrays(rng: np.random.Generator, *, width: int, depth: int, mlp_dim: int, vocab: int,
                       temperature: float = 0.01) -> Arrays:
    def n(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)
    a = {"token_embedding.weight": n(vocab, width, scale=width ** -0.5), "ln_final.weight": 1 + n(width, scale=0.1),
         "ln_final.bias": n(width, scale=0.1), "temperature": np.asarray(temperature, dtype=np.float32)}
    for i in range(depth):
        p = f"transformer.resblocks.{i}."
        a |= {p + "attn.in_proj_weight": n(3 * width, width, scale=width ** -0.5),
              p + "attn.in_proj_bias": n(3 * width), p + "attn.out_proj.weight": n(width, width, scale=width ** -0.5),
              p + "attn.out_proj.bias": n(width), p + "ln_1.weight": 1 + n(width, scale=0.1),
              p + "ln_1.bias": n(width, scale=0.1), p + "ln_2.weight": 1 + n(width, scale=0.1),
              p + "ln_2.bias": n(width, scale=0.1), p + "mlp.c_fc.weight": n(mlp_dim, width, scale=width ** -0.5),
              p + "mlp.c_fc.bias": n(mlp_dim), p + "mlp.c_proj.weight": n(width, mlp_dim, scale=mlp_dim ** -0.5),
              p + "mlp.c_proj.bias": n(width)}
    return a

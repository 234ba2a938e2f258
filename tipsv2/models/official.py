"""Read and write the released TIPS/TIPSv2 PyTorch checkpoints (`*_vision.npz`, `*_text.npz`).

Vision arrays use DINOv2 names (`cls_token`, `register_tokens` = CLS2, `pos_embed`, `mask_token`,
`patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.*,ls2.gamma}`, `norm.*`);
text arrays use `token_embedding.weight`, `transformer.resblocks.N.*`, `ln_final.*` and a scalar
`temperature` (logits = cosine / temperature). Every size is inferred from the arrays. Head counts are
not stored in the format: they follow the released models (64 per head; So400m, width 1152, has 16
heads) unless given explicitly. Files are read with `allow_pickle=False`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from tipsv2.models.config import FFN, ModelConfig, TextConfig, VisionConfig
from tipsv2.models.model import TIPSModel, load_strict
from tipsv2.models.vision import swiglu_hidden

_RELEASED_HEADS = {1152: 16}  # So400m's width is not a multiple of 64 heads of 64


def default_heads(width: int) -> int:
    if width in _RELEASED_HEADS:
        return _RELEASED_HEADS[width]
    if width % 64:
        raise ValueError(f"cannot infer the head count for width {width} (not a multiple of 64); "
                         "pass vision_heads= / text_heads= to load_official")
    return width // 64


def _read_npz(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _require(arrays: dict[str, np.ndarray], keys: list[str], *, source: str) -> None:
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"{source} is missing required arrays {missing}; "
                         f"found {sorted(arrays)[:8]}{'...' if len(arrays) > 8 else ''}")


def _count_blocks(arrays: dict[str, np.ndarray], pattern: str) -> int:
    indices = {int(m.group(1)) for k in arrays if (m := re.match(pattern, k))}
    if indices != set(range(len(indices))):
        raise ValueError(f"block indices are not contiguous from 0: {sorted(indices)}")
    return len(indices)


def vision_config_from_arrays(arrays: dict[str, np.ndarray], *, heads: int | None = None,
                              source: str = "vision checkpoint") -> VisionConfig:
    _require(arrays, ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"],
             source=source)
    width, _, patch, _ = arrays["patch_embed.proj.weight"].shape
    n_pos = arrays["pos_embed"].shape[1] - 1
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise ValueError(f"{source}: pos_embed has {n_pos} patch positions, expected a square grid")
    if "blocks.0.mlp.w12.weight" in arrays:
        ffn, hidden = FFN.SWIGLU, arrays["blocks.0.mlp.w12.weight"].shape[0] // 2
        mlp_dim = math.ceil(hidden * 3 / 2)
        if swiglu_hidden(mlp_dim) != hidden:
            raise ValueError(f"{source}: SwiGLU hidden size {hidden} is not a multiple of 8")
    else:
        _require(arrays, ["blocks.0.mlp.fc1.weight"], source=source)
        ffn, mlp_dim = FFN.MLP, arrays["blocks.0.mlp.fc1.weight"].shape[0]
    ls = arrays.get("blocks.0.ls1.gamma")
    return VisionConfig(width=int(width), depth=_count_blocks(arrays, r"blocks\.(\d+)\."),
                        heads=heads or default_heads(int(width)), mlp_dim=int(mlp_dim), ffn=ffn,
                        patch_size=int(patch), image_size=int(side * patch),
                        layerscale_init=float(ls.flat[0]) if ls is not None else 1.0)


def text_config_from_arrays(arrays: dict[str, np.ndarray], *, heads: int | None = None, max_len: int = 64,
                            source: str = "text checkpoint") -> TextConfig:
    _require(arrays, ["token_embedding.weight", "transformer.resblocks.0.mlp.c_fc.weight"], source=source)
    vocab, width = arrays["token_embedding.weight"].shape
    return TextConfig(width=int(width), depth=_count_blocks(arrays, r"transformer\.resblocks\.(\d+)\."),
                      heads=heads or default_heads(int(width)),
                      mlp_dim=int(arrays["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                      vocab_size=int(vocab), max_len=max_len)


def load_official(vision_npz: str | Path, text_npz: str | Path | None = None, *, vision_heads: int | None = None,
                  text_heads: int | None = None, max_len: int = 64) -> TIPSModel:
    """Build a TIPSModel from released checkpoints. Without `text_npz` the text tower is random."""
    vision_arrays = _read_npz(vision_npz)
    vision_cfg = vision_config_from_arrays(vision_arrays, heads=vision_heads, source=str(vision_npz))
    text_arrays = _read_npz(text_npz) if text_npz is not None else None
    temperature = 0.07
    if text_arrays is not None:
        _require(text_arrays, ["temperature"], source=str(text_npz))
        temperature = float(np.asarray(text_arrays.pop("temperature"), dtype=np.float64).reshape(()))
        if not temperature > 0:
            raise ValueError(f"{text_npz}: temperature must be > 0, got {temperature}")
        text_cfg = text_config_from_arrays(text_arrays, heads=text_heads, max_len=max_len, source=str(text_npz))
    else:
        text_cfg = TextConfig(width=vision_cfg.width, heads=vision_cfg.heads, mlp_dim=vision_cfg.mlp_dim,
                              max_len=max_len)
    cfg = ModelConfig(vision=vision_cfg, text=text_cfg, temperature_init=temperature,
                      temperature_min=min(0.01, temperature), temperature_max=max(1.0, temperature))
    model = TIPSModel(cfg)
    load_strict(model.vision, {k: torch.from_numpy(v) for k, v in vision_arrays.items()}, source=str(vision_npz))
    if text_arrays is not None:
        load_strict(model.text, {k: torch.from_numpy(v) for k, v in text_arrays.items()}, source=str(text_npz))
    with torch.no_grad():
        model.log_temperature.fill_(math.log(temperature))
    return model


def export_official(model: TIPSModel, vision_npz: str | Path, text_npz: str | Path) -> None:
    """Write the model in the released format (float32 arrays, no pickled objects)."""
    def arrays(module: torch.nn.Module) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().float().numpy() for k, v in module.state_dict().items()}

    temperature = math.exp(float(model.log_temperature.detach().double()))
    np.savez(vision_npz, **arrays(model.vision))
    np.savez(text_npz, **arrays(model.text), temperature=np.asarray(temperature, dtype=np.float32))

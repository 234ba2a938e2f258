"""Model configs and the paper's sizes.

Sizes follow the released TIPS/TIPSv2 encoders (S, B, L, So400m, g at patch 14); the text tower shares
the vision width, heads and MLP size and has 12 layers (27 for So400m). `tiny` is our CPU size.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace


class FFN(str, enum.Enum):
    MLP = "mlp"        # Linear-GELU-Linear (fc1, fc2)
    SWIGLU = "swiglu"  # fused SwiGLU (w12, w3), hidden = round_up_8(mlp_dim * 2/3)


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    ffn: FFN = FFN.MLP
    patch_size: int = 14
    image_size: int = 224            # px; the learned position grid is image_size / patch_size per side
    layerscale_init: float = 1e-5    # LayerScale gamma at init (released checkpoints carry their own)
    drop_path: float = 0.0           # stochastic depth rate of the last block (linear from 0), training only
    pos_interpolation: str = "bilinear"  # torch interpolate mode for the position grid, antialiased

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    vocab_size: int = 32000
    max_len: int = 64                # tokens

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    temperature_init: float = 0.07   # softmax temperature: logits = cosine / temperature
    temperature_min: float = 0.01
    temperature_max: float = 1.0

    def __post_init__(self) -> None:
        if self.vision.width != self.text.width:
            raise ValueError(f"vision width {self.vision.width} != text width {self.text.width}: "
                             "TIPS compares both towers without projection heads, so they must match")


def _sized(width: int, depth: int, heads: int, mlp_dim: int, *, ffn: FFN = FFN.MLP,
           text_depth: int = 12) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, ffn=ffn),
        text=TextConfig(width=width, depth=text_depth, heads=heads, mlp_dim=mlp_dim),
    )


MODEL_PRESETS = {
    "tiny": lambda: ModelConfig(
        vision=VisionConfig(width=96, depth=4, heads=3, mlp_dim=384, image_size=112, layerscale_init=1.0),
        text=TextConfig(width=96, depth=2, heads=3, mlp_dim=384, vocab_size=1024, max_len=32),
        temperature_init=0.1,
    ),
    "vit_s14": lambda: _sized(384, 12, 6, 1536),
    "vit_b14": lambda: _sized(768, 12, 12, 3072),
    "vit_l14": lambda: _sized(1024, 24, 16, 4096),
    "vit_so400m14": lambda: _sized(1152, 27, 16, 4304, text_depth=27),
    "vit_g14": lambda: _sized(1536, 40, 24, 6144, ffn=FFN.SWIGLU),
}


def model_config(name: str, **vision_overrides) -> ModelConfig:
    """The named preset (`tiny`, `vit_s14`, `vit_b14`, `vit_l14`, `vit_so400m14`, `vit_g14`)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(MODEL_PRESETS)}")
    cfg = MODEL_PRESETS[name]()
    return replace(cfg, vision=replace(cfg.vision, **vision_overrides)) if vision_overrides else cfg

"""Optimiser construction: parameter groups, layer-wise LR decay, AdamW or Adafactor, warm-up + cosine.

Pure functions of the parameter names, so the local loop and the DeepSpeed engine build the same groups.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from tipsv2.models.config import ModelConfig


class Tower(str, enum.Enum):
    VISION = "vision"
    TEXT = "text"


class Optimizer(str, enum.Enum):
    ADAMW = "adamw"
    ADAFACTOR = "adafactor"


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    optimizer: Optimizer = Optimizer.ADAMW
    lr: float = 1e-3                 # peak, after warm-up
    min_lr: float = 1e-6             # at the end of the cosine
    warmup_steps: int = 10
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)   # AdamW's; Adafactor keeps torch's defaults
    layer_decay: float = 1.0         # lr scale per block below the top of its tower (1.0: off; DINOv2 uses 0.9 for large models)
    layer_decay_text: bool = True    # False: the text tower trains at the full lr (layer decay on the vision tower only)
    clip_grad: float = 3.0           # max global gradient norm (0: off)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim needs 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim layer_decay must be in (0, 1], got {self.layer_decay}")


NO_DECAY = re.compile(r"(\.bias$|norm|ln_|\.gamma$|cls_token|register_tokens|mask_token|pos_embed|"
                      r"log_temperature|sigmoid_bias|token_embedding)")


@dataclass(frozen=True)
class TowerDepths:
    """Blocks per tower: layer-wise lr decay runs over each tower's own depth."""
    vision: int
    text: int

    @classmethod
    def of(cls, model: ModelConfig) -> TowerDepths:
        return cls(vision=model.vision.depth, text=model.text.depth)


def tower(name: str) -> Tower | None:
    """Which encoder tower a parameter belongs to (None: heads, temperature, anything above both)."""
    if match := re.search(r"(?:^|\.)(vision|text)\.", name):
        return Tower(match.group(1))
    return None


def layer_id(name: str, depth: int) -> int:
    """Within a tower of `depth` blocks: 0 for embeddings and tokens, i + 1 for block i, depth + 1 above."""
    if match := re.search(r"(?:blocks|resblocks)\.(\d+)\.", name):
        return int(match.group(1)) + 1
    if re.search(r"(patch_embed|cls_token|register_tokens|mask_token|pos_embed|token_embedding)", name):
        return 0
    return depth + 1


def lr_scale(name: str, cfg: OptimConfig, depths: TowerDepths) -> float:
    """layer_decay ** (blocks between the parameter and the top of its own tower); 1 outside the towers."""
    which = tower(name)
    if which is None or (which == Tower.TEXT and not cfg.layer_decay_text):
        return 1.0
    depth = depths.vision if which == Tower.VISION else depths.text
    return cfg.layer_decay ** (depth + 1 - layer_id(name, depth))


def param_groups(named: list[tuple[str, nn.Parameter]], cfg: OptimConfig, *, depths: TowerDepths) -> list[dict]:
    """Groups keyed by (decay?, lr scale); each carries `lr_scale` and `weight_decay` for the scheduler."""
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and not NO_DECAY.search(name)
        scale = lr_scale(name, cfg, depths)
        key = (decay, scale)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                           "lr_scale": scale}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def learning_rate(step: int, *, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up from 0 to lr over warmup_steps, then cosine to min_lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimiser on `param_groups`' groups: the one function the local loop (tipsv2.loop) and
    the DeepSpeed worker (pipelines/train/worker.py) both call.

    Adafactor is torch.optim.Adafactor: no first moment; for a parameter of 2 or more dimensions, second
    moments factored over its last two (a row and a column vector), else one full vector; its step is lr x the
    parameter's RMS, and it decays weights by lr x weight_decay per step. Under DeepSpeed ZeRO 1-3 it is handed
    DeepSpeed's flat float32 partitions (one 1-D tensor per group and rank), so there it keeps one unfactored
    second-moment vector per partition (4 bytes per parameter, sharded) and takes the RMS over the partition,
    not per parameter: the same optimiser, not the same numbers as the local loop (tipsv2.memory counts both).
    """
    torch_groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if cfg.optimizer == Optimizer.ADAFACTOR:
        return torch.optim.Adafactor(torch_groups, lr=cfg.lr)
    return torch.optim.AdamW(torch_groups, lr=cfg.lr, betas=cfg.betas)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

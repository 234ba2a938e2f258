"""TIPSModel: the vision and text towers plus the learned temperature."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tipsv2 import config_tree
from tipsv2.models.config import ModelConfig, model_config
from tipsv2.models.text import TextEncoder
from tipsv2.models.vision import ImageFeatures, VisionTransformer


class TIPSModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.text = TextEncoder(cfg.text)
        # Log-parametrised so the optimiser moves it multiplicatively; clamped on read.
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature_init)))

    @property
    def width(self) -> int:
        return self.cfg.vision.width

    @property
    def patch_size(self) -> int:
        return self.cfg.vision.patch_size

    @property
    def temperature(self) -> Tensor:
        """Softmax temperature (logits = cosine / temperature), clamped to the configured bounds."""
        return self.log_temperature.exp().clamp(self.cfg.temperature_min, self.cfg.temperature_max)

    def encode_image(self, images: Tensor, masks: Tensor | None = None, *, dense: bool = False,
                     stochastic_depth: bool = True) -> ImageFeatures:
        """images float RGB in [0, 1], (B, 3, H, W) with H, W multiples of 14; masks bool (B, N), True = masked.

        dense=True replaces the last block's attention output by its value vectors (MaskCLIP), the
        patch representation the official zero-shot segmentation evaluation uses. stochastic_depth=False
        turns drop path off in training mode too (teacher targets must not depend on it).
        """
        return self.vision(images, masks, dense=dense, stochastic_depth=stochastic_depth)

    def encode_text(self, ids: Tensor, paddings: Tensor) -> Tensor:
        """ids long (B, L), paddings (B, L) with 1 at pads -> (B, D), not L2-normalised."""
        return self.text(ids, paddings)


def build_model(name_or_cfg: str | ModelConfig) -> TIPSModel:
    """A randomly initialised model from a preset name (`tiny`, `vit_b14`, ...) or a ModelConfig."""
    cfg = model_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    return TIPSModel(cfg)


def save_pretrained(model: TIPSModel, directory: str | Path) -> None:
    """Write `model.safetensors` and `config.json` (our own format; see official.py for the released one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config_tree.to_dict(model.cfg), indent=2))


def load_pretrained(directory: str | Path) -> TIPSModel:
    """Inverse of save_pretrained; strict (missing or unexpected tensors raise ValueError)."""
    directory = Path(directory)
    cfg = config_tree.from_dict(ModelConfig, json.loads((directory / "config.json").read_text()))
    model = TIPSModel(cfg)
    state = load_file(str(directory / "model.safetensors"))
    load_strict(model, state, source=str(directory / "model.safetensors"))
    return model


def load_strict(module: nn.Module, state: dict[str, Tensor], *, source: str) -> None:
    """load_state_dict that names every missing, unexpected or wrongly shaped tensor in one ValueError."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: got {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {unexpected}"] if unexpected else [])
    problems += [f"wrong shape {s}" for s in shapes]
    if problems:
        raise ValueError(f"cannot load {source}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)

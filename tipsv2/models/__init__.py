"""TIPS/TIPSv2 model: ViT/14 with two CLS tokens, text transformer, learned temperature."""

from tipsv2.models.config import FFN, ModelConfig, TextConfig, VisionConfig, model_config
from tipsv2.models.model import TIPSModel, build_model, load_pretrained, save_pretrained
from tipsv2.models.hf import export_hf, load_hf
from tipsv2.models.official import export_official, load_official
from tipsv2.models.vision import ImageFeatures

__all__ = [
    "FFN", "ImageFeatures", "ModelConfig", "TIPSModel", "TextConfig", "VisionConfig", "build_model",
    "export_hf", "export_official", "load_hf", "load_official", "load_pretrained", "model_config", "save_pretrained",
]

"""<output>/export: the trained model as float32 CPU modules, written in every format we ship, with
patch-text similarity heatmaps of a few validation images (rank 0, or the local loop)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from pipelines import data, storage
from pipelines.heatmaps import HeatmapRow, Panel, plot_heatmaps
from pipelines.tracking import MetricsSink
from tipsv2.checkpoint import save_export
from tipsv2.models.config import ModelConfig
from tipsv2.models.heads import DinoHead, DinoHeadConfig
from tipsv2.models.hf import export_hf
from tipsv2.models.model import TIPSModel, load_strict
from tipsv2.models.official import export_official
from tipsv2.tokenizer import Tokenizer

EXPORT_DIR = "export"
HF_DIR = "hf"                          # <output>/export/hf: the same model as a transformers Tipsv2Model directory
HEATMAP_IMAGES = 3


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict in float32 on CPU (its parameters gathered first, under ZeRO-3)."""
    return {k: v.detach().float().cpu() for k, v in module.state_dict().items()}


def cpu_copies(model_state: dict[str, torch.Tensor], dino_state: dict[str, torch.Tensor],
               patch_state: dict[str, torch.Tensor], *, model_cfg: ModelConfig,
               head_cfg: DinoHeadConfig) -> tuple[TIPSModel, DinoHead, DinoHead]:
    """Fresh float32 CPU modules holding the exported weights."""
    fresh_model = TIPSModel(model_cfg)
    load_strict(fresh_model, model_state, source="the trained model")
    heads = []
    for state in (dino_state, patch_state):
        fresh = DinoHead(fresh_model.width, head_cfg)
        load_strict(fresh, state, source="a head")
        heads.append(fresh)
    return fresh_model, heads[0], heads[1]


def validation_row(model: TIPSModel, record, image_size: int) -> HeatmapRow:
    """A validation image at the training size, with a panel for each of (up to 3 of) its alt-text's phrases."""
    from tipsv2.data.batch import decode_image
    from tipsv2.eval.features import resize_center_crop

    image = resize_center_crop(decode_image(record.image, example_id=record.id), image_size)
    texts = [t.strip() for t in (record.alt_text or "an object").split(",") if t.strip()][:3]
    return HeatmapRow(image, title=record.id[:12], panels=[Panel(text, model, text) for text in texts])


def write_export(output: str, model: TIPSModel, dino_head: DinoHead, patch_head: DinoHead, *,
                 head_cfg: DinoHeadConfig, sink: MetricsSink, tokenizer: Tokenizer, source: data.Source,
                 image_size: int) -> str:
    """<output>/export: model.safetensors + config.json + heads, the official .npz pair, the transformers
    directory `hf/` (tipsv2.models.hf), heatmap PNGs."""
    with tempfile.TemporaryDirectory(prefix="tipsv2-export-") as tmp:
        root = Path(tmp) / EXPORT_DIR
        save_export(root, model=model, dino_head=dino_head, patch_head=patch_head, head_cfg=head_cfg)
        export_official(model, root / "official_vision.npz", root / "official_text.npz")
        export_hf(model, tokenizer, root / HF_DIR)
        heatmaps = Path(tmp) / "heatmaps"
        heatmaps.mkdir()
        for index, record in enumerate(data.read_validation(source, HEATMAP_IMAGES)):
            plot_heatmaps([validation_row(model, record, image_size)], heatmaps / f"heatmap_{index}.png",
                          tokenizer=tokenizer, dpi=80, size=3.0)
        target = storage.join(output, EXPORT_DIR)
        for path in sorted(root.rglob("*")):
            if path.is_file():
                storage.write_bytes(storage.join(target, str(path.relative_to(root))), path.read_bytes())
        for path in sorted(heatmaps.iterdir()):
            storage.write_bytes(storage.join(output, "heatmaps", path.name), path.read_bytes())
        sink.log_artifact(root, EXPORT_DIR)
        sink.log_artifact(heatmaps, "heatmaps")
    return target

"""The exported model: what training writes for evaluation, distillation and release.

A directory with `model.safetensors` + `config.json` (tipsv2.models.save_pretrained) and, when the
task has them, `heads.safetensors` holding the teacher's DINO and patch heads (what distillation
reuses) + `heads.json` (their DinoHeadConfig). The official .npz format is written beside it by
`export_official` when asked, and a Hugging Face directory by `tipsv2.models.hf.export_hf`.

`ModelSource` names any of the three by one string (a teacher, a student init, a checkpoint to evaluate):

    ModelSource.parse("outputs/tiny/export")          # our exported directory (heads included when there)
    ModelSource.parse("hf:outputs/tiny/export/hf")    # a transformers Tipsv2Model directory (ours or the Hub's)
    ModelSource.parse("s3://b/vision.npz,s3://b/text.npz")   # released VISION.npz[,TEXT.npz]
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file, save_file

from tipsv2 import config_tree
from tipsv2.models.heads import DinoHead, DinoHeadConfig
from tipsv2.models.hf import load_hf
from tipsv2.models.model import TIPSModel, load_pretrained, load_strict, save_pretrained
from tipsv2.models.official import load_official

HF_PREFIX = "hf:"
Loaded = tuple[TIPSModel, DinoHead | None, DinoHead | None]   # (model, teacher DINO head, teacher patch head)


def save_export(directory: str | Path, *, model: TIPSModel, dino_head: DinoHead | None = None,
                patch_head: DinoHead | None = None, head_cfg: DinoHeadConfig | None = None) -> Path:
    directory = Path(directory)
    save_pretrained(model, directory)
    if dino_head is not None and patch_head is not None and head_cfg is not None:
        state = {f"dino.{k}": v.detach().contiguous().cpu() for k, v in dino_head.state_dict().items()}
        state |= {f"patch.{k}": v.detach().contiguous().cpu() for k, v in patch_head.state_dict().items()}
        save_file(state, str(directory / "heads.safetensors"))
        (directory / "heads.json").write_text(json.dumps(config_tree.to_dict(head_cfg), indent=2))
    return directory


def load_export(directory: str | Path) -> Loaded:
    """(model, teacher DINO head, teacher patch head); the heads are None when none were exported."""
    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        raise ValueError(f"{str(directory)!r} is not an exported model (no model.safetensors)")
    config = directory / "config.json"
    if config.is_file() and "model_type" in json.loads(config.read_text()):
        raise ValueError(f"{str(directory)!r} is a Hugging Face directory: pass it as {HF_PREFIX}{directory}")
    model = load_pretrained(directory)
    if not (directory / "heads.safetensors").is_file():
        return model, None, None
    head_cfg = config_tree.from_dict(DinoHeadConfig, json.loads((directory / "heads.json").read_text()))
    state = load_file(str(directory / "heads.safetensors"))
    heads = []
    for prefix in ("dino.", "patch."):
        head = DinoHead(model.width, head_cfg)
        load_strict(head, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                    source=f"{directory}/heads.safetensors[{prefix}]")
        heads.append(head)
    return model, heads[0], heads[1]


class Format(str, enum.Enum):
    EXPORT = "export"       # our exported directory: model.safetensors + config.json (+ heads)
    OFFICIAL = "official"   # released VISION.npz[,TEXT.npz]
    HF = "hf"               # "hf:DIR", a transformers Tipsv2Model directory


@dataclass(frozen=True)
class ModelSource:
    """A model named by one string: "DIR" (exported), "hf:DIR" or "VISION.npz[,TEXT.npz]"; local or s3://."""
    format: Format
    paths: tuple[str, ...]

    @staticmethod
    def parse(spec: str) -> ModelSource:
        if spec.startswith(HF_PREFIX):
            if not spec[len(HF_PREFIX):].strip():
                raise ValueError(f"model {spec!r}: expected {HF_PREFIX}DIR, a Hugging Face Tipsv2Model directory")
            return ModelSource(Format.HF, (spec[len(HF_PREFIX):].strip(),))
        parts = tuple(p.strip() for p in spec.split(",") if p.strip())
        if not parts:
            raise ValueError("no model given: expected DIR, hf:DIR or VISION.npz[,TEXT.npz]")
        if len(parts) > 1 or parts[0].lower().endswith(".npz"):
            if len(parts) > 2 or not all(p.lower().endswith(".npz") for p in parts):
                raise ValueError(f"model {spec!r}: expected VISION.npz[,TEXT.npz], got {len(parts)} paths")
            return ModelSource(Format.OFFICIAL, parts)
        return ModelSource(Format.EXPORT, parts)

    @property
    def directory(self) -> str:
        """The directory that holds the model (where a tokenizer.model beside it would be)."""
        if self.format != Format.OFFICIAL:
            return self.paths[0]
        return self.paths[0].rsplit("/", 1)[0] if "/" in self.paths[0] else "."


def load_source(source: ModelSource, *, fetch: Callable[[str], str] = str, vision_heads: int | None = None,
                text_heads: int | None = None, max_len: int = 64) -> Loaded:
    """The model (and exported heads, if any) of `source`; `fetch` turns each path into a local one (the
    pipelines download s3:// there). Heads and max_len apply to released .npz files only: the other
    formats store their sizes."""
    paths = [fetch(p) for p in source.paths]
    if source.format == Format.HF:
        return load_hf(paths[0]), None, None
    if source.format == Format.OFFICIAL:
        return load_official(*paths, vision_heads=vision_heads, text_heads=text_heads, max_len=max_len), None, None
    return load_export(paths[0])

"""The exported model: what training writes for evaluation, distillation and release.

A directory with `model.safetensors` + `config.json` (tipsv2.models.save_pretrained) and, when the
task has them, `heads.safetensors` holding the teacher's DINO and patch heads (what distillation
reuses) + `heads.json` (their DinoHeadConfig). The official .npz format is written beside it by
`export_official` when asked.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from tipsv2 import config_tree
from tipsv2.models.heads import DinoHead, DinoHeadConfig
from tipsv2.models.model import TIPSModel, load_pretrained, load_strict, save_pretrained


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


def load_export(directory: str | Path) -> tuple[TIPSModel, DinoHead | None, DinoHead | None]:
    """(model, teacher DINO head, teacher patch head); the heads are None when none were exported."""
    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        raise ValueError(f"{str(directory)!r} is not an exported model (no model.safetensors)")
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

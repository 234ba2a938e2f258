r"""Patch-level distillation: a frozen teacher teaches a randomly initialised student (Ray Train + DeepSpeed).

    python -m pipelines.distill --config tiny --teacher outputs/tiny/export --output outputs/tiny_distill
    python -m pipelines.distill --config tiny --set teacher=outputs/tiny/export --output DIR --local
    python -m pipelines.distill --config vit_b14 --teacher hf:/data/tipsv2-b14 --set task.teacher_heads=random \
        --output s3://b/runs/distill_b14_hub
    python -m pipelines.distill --config vit_b14 --teacher s3://b/tips/vision.npz,s3://b/tips/text.npz \
        --set task.teacher_heads=random --output s3://b/runs/distill_b14

The teacher is an exported model directory (pipelines.pretrain's `<output>/export`, local or s3://),
`hf:DIR`, a transformers Tipsv2Model directory (the export's `hf/`, or one downloaded from the Hub), or the
released `VISION.npz[,TEXT.npz]` checkpoints; the last two ship without heads (use task.teacher_heads=random).
`student_init` takes the same forms.
`--teacher X` is the same as `--set teacher=X`. With `--output ROOT/distill` (a run root, pipelines/layout.py)
an unset teacher is ROOT/pretrain/export (with pretrain's tokenizer) and the data ROOT/ingest + ROOT/caption. Same engine, outputs and resume rules as pipelines.pretrain.
"""

from __future__ import annotations

import sys
from typing import Any

from pipelines import cli
from pipelines.pretrain import split_local
from pipelines.train import Job, run
from pipelines.train.config import DISTILL_PRESETS

STAGE_PRESETS = {**DISTILL_PRESETS, "default": DISTILL_PRESETS["tiny"]}


def split_teacher(argv: list[str]) -> list[str]:
    """`--teacher X` / `--teacher=X` -> `--set teacher=X`."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--teacher" and i + 1 < len(argv):
            out += ["--set", f"teacher={argv[i + 1]}"]
            i += 2
            continue
        if argv[i].startswith("--teacher="):
            out += ["--set", "teacher=" + argv[i].split("=", 1)[1]]
        else:
            out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv, local = split_local(split_teacher(list(sys.argv[1:] if argv is None else argv)))
    return cli.stage_main(argv, STAGE_PRESETS, lambda cfg, output: run(Job.DISTILL, cfg, output, local=local),
                          description=__doc__, show=None, stage="distill")


if __name__ == "__main__":
    main()

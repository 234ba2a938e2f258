r"""TIPSv2 pretraining on Ray Train + DeepSpeed ZeRO (or one local process), tracked in MLflow.

    python -m pipelines.pretrain --config tiny --output outputs/tiny               # Ray Train, engine.workers ranks
    python -m pipelines.pretrain --config tiny --output outputs/tiny --local       # tipsv2.loop.train_local
    python -m pipelines.pretrain --config vit_b14 --set engine.workers=8 --set engine.use_gpu=true \
        --set engine.precision=bf16 --set data.images=s3://b/root/images --set data.captions_uri=s3://b/root/captions \
        --output s3://b/runs/b14                                                    # e.g. through `ray job submit`

Joins the Ray cluster in RAY_ADDRESS when set, else starts a local one. With `--output ROOT/pretrain` (a run
root, pipelines/layout.py) unset `data.images` / `data.captions_uri` are ROOT/ingest/images and
ROOT/caption/captions; elsewhere, without `data.images` it trains on synthetic scenes written first under
`<output>/data/synthetic`. Rerunning the same command resumes from
the latest checkpoint under `<output>/ray/train`, or does nothing when the run finished. Writes
`<output>/export/` (model.safetensors, config.json, heads, official_{vision,text}.npz, and hf/: the model
as a transformers Tipsv2Model directory), history.jsonl, heatmaps/, config.json and summary.json. See pipelines/train/ for the engine.
"""

from __future__ import annotations

import sys
from typing import Any

from pipelines import cli
from pipelines.train import Job, run
from pipelines.train.config import PRESETS

STAGE_PRESETS = {**PRESETS, "default": PRESETS["tiny"]}


def split_local(argv: list[str]) -> tuple[list[str], bool]:
    """Remove `--local` (train in this process, no Ray or DeepSpeed) from the shared stage flags."""
    return [a for a in argv if a != "--local"], "--local" in argv


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv, local = split_local(list(sys.argv[1:] if argv is None else argv))
    return cli.stage_main(argv, STAGE_PRESETS, lambda cfg, output: run(Job.PRETRAIN, cfg, output, local=local),
                          description=__doc__, show=None, stage="pretrain")


if __name__ == "__main__":
    main()

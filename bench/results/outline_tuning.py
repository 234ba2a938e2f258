"""The scratch run behind E8 (learning_shape_exploration.md; issue 25): the ibot_pp arm of `learning_outline`
with one change (`--set`, a nested dict merged into the preset), one schedule of `--steps`, read by the bench's
own `evaluate` at the steps of `--at` (probe and retrieval at the end only). One thread; one JSON row per reading,
printed and appended to `--out`. Kept as the record of how `outline_tuning.jsonl` was made. Its rows were made
while the preset's masking ratio was 0.75 (E8 then moved it to 0.3): to rerun a row, add
`"data": {"masking": {"ratio": 0.75}}` to its change unless the change sets the ratio.

    PYTHONPATH=. python bench/results/outline_tuning.py --name mask_0.3 --seed 1000 --set '{"data": {"masking": {"ratio": 0.3}}}' \
        --out bench/results/outline_tuning.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from bench.learning import PRIMARY, evaluate
from tipsv2 import config_tree
from tipsv2.configs import PretrainConfig, preset
from tipsv2.loop import TowerDepths, build_pretrain_task, endless, fit, fit_tokenizer, synthetic_records
from tipsv2.tokenizer import Tokenizer


def append(row: dict, out: Path) -> None:
    """Print one JSON row and append it to `out`."""
    print(json.dumps(row), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def train_and_read(cfg: PretrainConfig, *, at: set[int], read: Callable[[torch.nn.Module, Tokenizer, int], None]
                   ) -> None:
    """Train the ibot_pp arm of `cfg` for `cfg.steps` as the bench does, calling `read(model, tokenizer, step)`
    after each step in `at` and at the end (in eval mode; training resumes in train mode)."""
    records = synthetic_records(cfg.data.synthetic)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = fit_tokenizer(records, cfg.data.tokenizer_vocab, Path(tmp) / "spm.model",
                                  max_len=cfg.task.model.text.max_len)
        task = build_pretrain_task(cfg)

        def reading(step: int) -> None:
            task.model.eval()
            read(task.model, tokenizer, step)
            task.model.train()

        early = at - {cfg.steps}
        stream = endless(records, data=cfg.data, seed=cfg.seed, patch_size=cfg.task.model.vision.patch_size,
                         tokenizer=tokenizer)
        fit(task, stream=stream, optim=cfg.optim, steps=cfg.steps, depths=TowerDepths.of(cfg.task.model),
            on_step=lambda step, _: reading(step + 1) if step + 1 in early else None)
        reading(cfg.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--set", default="{}", help="JSON: the change, merged into `learning_outline`")
    parser.add_argument("--at", default="500,1000", help="the steps to read, comma-separated")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    change = json.loads(args.set)
    cfg = dataclasses.replace(config_tree.merge(preset("learning_outline"), change), steps=args.steps, seed=args.seed)
    start = time.perf_counter()

    def read(model: torch.nn.Module, tokenizer: Tokenizer, step: int) -> None:
        m = evaluate(model, tokenizer, cfg, probe=step == args.steps)
        row = {"name": args.name, "set": change, "seed": args.seed, "step": step, "of": args.steps,
               "acc": m[PRIMARY], "chance": m["patch/chance"], "noise": m["patch/chance_noise"],
               "auroc": m["patch/auroc"], "r1": m.get("retrieval/i2t_r1"), "probe": m.get("linear_probe/miou"),
               "wall_s": time.perf_counter() - start}
        append(row, args.out)

    train_and_read(cfg, at={int(x) for x in args.at.split(",")}, read=read)


if __name__ == "__main__":
    main()

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

import torch

from bench.learning import PRIMARY, evaluate
from tipsv2 import config_tree
from tipsv2.configs import preset
from tipsv2.loop import TowerDepths, build_pretrain_task, endless, fit, fit_tokenizer, synthetic_records


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
    records = synthetic_records(cfg.data.synthetic)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = fit_tokenizer(records, cfg.data.tokenizer_vocab, Path(tmp) / "spm.model",
                                  max_len=cfg.task.model.text.max_len)
        task = build_pretrain_task(cfg)

        def read(step: int) -> None:
            m = evaluate(task.model, tokenizer, cfg, probe=step == args.steps)
            task.model.train()
            row = {"name": args.name, "set": change, "seed": args.seed, "step": step, "of": args.steps,
                   "acc": m[PRIMARY], "chance": m["patch/chance"], "noise": m["patch/chance_noise"],
                   "auroc": m["patch/auroc"], "r1": m.get("retrieval/i2t_r1"), "probe": m.get("linear_probe/miou"),
                   "wall_s": time.perf_counter() - start}
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")

        at = {int(x) for x in args.at.split(",")} - {args.steps}
        stream = endless(records, data=cfg.data, seed=cfg.seed, patch_size=cfg.task.model.vision.patch_size,
                         tokenizer=tokenizer)
        fit(task, stream=stream, optim=cfg.optim, steps=cfg.steps, depths=TowerDepths.of(cfg.task.model),
            on_step=lambda step, _: read(step + 1) if step + 1 in at else None)
        read(args.steps)


if __name__ == "__main__":
    main()

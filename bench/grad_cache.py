"""Feature-cached accumulation: memory and time of one pretraining step, batch 32 at once vs 4 micro-batches of 8
with the contrastive loss over all 32 (tipsv2.task.cache_contrastive), beside batch 8 alone.

    .venv/bin/python -m bench.grad_cache                     # tiny at 112 px and S/14 at 112 px (~2 min on 2 cores)
    .venv/bin/python -m bench.grad_cache --models tiny --repeats 1

Memory is what a step saves for backward (activations: the bytes of every tensor autograd packs, peak over the
step), counted with torch.autograd.graph.saved_tensors_hooks: on a GPU this is what decides whether a batch fits,
and it needs no GPU to count. The model, gradients and optimiser state are the same in every arm. Time is one
step's forward and backward (no optimiser), median of `repeats`. Writes bench/results/grad_cache.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from bench.common import machine, print_table, write_json
from tipsv2.configs import tiny
from tipsv2.models import model_config
from tipsv2.task import TIPSv2Task, cache_contrastive
from tests.test_task import make_batch


class SavedBytes:
    """Bytes of the tensors autograd holds for backward: now, and the peak since the last reset."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        size = tensor.untyped_storage().nbytes()
        self.now += size
        self.peak = max(self.peak, self.now)
        return tensor, size

    def unpack(self, packed):
        return packed[0]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.now = 0   # the graph is freed with its saved tensors


def task_for(name: str, size: int) -> TIPSv2Task:
    cfg = tiny().task
    if name != "tiny":
        cfg = replace(cfg, model=model_config(name, image_size=size))
    torch.manual_seed(0)
    return TIPSv2Task(cfg)


def step(task: TIPSv2Task, batch, parts: int, saved: SavedBytes) -> None:
    size = len(batch) // parts
    micro = [type(batch)(**{k: v[i * size:(i + 1) * size] for k, v in vars(batch).items()}) for i in range(parts)]
    cache = cache_contrastive([task(b, 0, embed=True) for b in micro], cfg=task.cfg.contrastive) if parts > 1 else None
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        for i, b in enumerate(micro):
            losses = task(b, 0, cache.part(i)) if cache else task(b, 0)
            saved.backward(losses["loss/total"] / parts)


def measure(name: str, size: int, batch: int, parts: int, repeats: int) -> dict:
    task = task_for(name, size)
    data = make_batch(batch, size=size, local=size // 2, seed=0)
    seconds, saved = [], SavedBytes()
    for _ in range(repeats + 1):   # the first is a warm-up
        task.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step(task, data, parts, saved)
        seconds.append(time.perf_counter() - start)
    return {"model": name, "image_px": size, "step_batch": batch, "micro_batches": parts,
            "contrastive_pairs": batch, "saved_mb": saved.peak / 2 ** 20, "step_s": statistics.median(seconds[1:])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.grad_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "vit_s14"])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for name in args.models:
        arms = [measure(name, args.size, b, k, args.repeats) for b, k in ((8, 1), (32, 1), (32, 4))]
        for row in arms:
            row["saved_vs_batch8"] = row["saved_mb"] / arms[0]["saved_mb"]
            row["time_vs_batch32"] = row["step_s"] / arms[1]["step_s"]
        rows += arms
    print_table(rows, ["model", "step_batch", "micro_batches", "contrastive_pairs", "saved_mb", "saved_vs_batch8",
                       "step_s", "time_vs_batch32"])
    payload = {"machine": machine(), "rows": rows}
    write_json("grad_cache", payload)
    return payload


if __name__ == "__main__":
    main()

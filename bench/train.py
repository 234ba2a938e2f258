"""Distributed-path overhead and ZeRO sharding, on CPU: Ray Train + DeepSpeed vs the plain loop.

    .venv/bin/python -m bench.train                         # both parts (~10-20 min on 2 busy cores)
    .venv/bin/python -m bench.train --skip-memory           # only the overhead ratio (~3 min)

1. Overhead, in one run: steps/s of the tiny preset through Ray Train + DeepSpeed (1 worker; ZeRO-2
   and ZeRO-0 at batch 8, ZeRO-2 at batch 32; Ray Data feeding the batches) vs tipsv2.loop.train_local
   (data prepared inline), same model, batch and data, one torch thread each. Steady state = median step
   time after `--warmup` steps (the ratio, distributed / plain steps/s, goal >= 0.95); `ratio_mean` uses
   mean step times, so epoch boundaries count. The gap is split in the same run by a third arm: the
   distributed path's step (pipelines.train.Worker, DeepSpeed) in this process without Ray, fed inline:
   `deepspeed_ratio_without_data` = plain / DeepSpeed-alone compute, `ray_ratio_without_data` =
   DeepSpeed-alone / Ray compute (compute = step minus data preparation or wait).
2. Memory: B/14 (`--memory-models`: any presets) on CPU with 2 workers at ZeRO 1, 2 and 3, ZeRO 1 and 2
   with grad_accum 2, and ZeRO 1, 2 and 3 in bf16 (a few steps, 2 rows per worker, 112 px crops to keep
   CPU steps short): per worker, the tensors held at the last step's peak (the larger of after-backward
   and after-step: weights, gradients, optimizer state, ZeRO's buffers; activations are freed by then)
   beside the model-state bytes `tipsv2.memory.model_state_bytes` predicts, and the peak resident memory
   (which also holds freed allocator pages, activations and libraries).

       .venv/bin/python -m bench.train --skip-overhead --append-memory --memory-models tiny vit_s14 \
           --memory-runs 0:1 1:1 2:1 3:1          # adds tiny and S/14 rows at ZeRO 0-3 (~10 min)
       .venv/bin/python -m bench.train --skip-overhead --append-memory --optimizer adafactor \
           --memory-models tiny vit_s14 --memory-runs 0:1 1:1 2:1 3:1 0:1:bf16   # Adafactor's rows

   A row whose loss turns non-finite is kept with its error (tiny, Adafactor, ZeRO-3 with clipping).

Measured (bench/results/train.json, quiet 2-core machine), ratio (median / mean): ZeRO-0 batch 8 0.99 /
0.97, ZeRO-2 batch 32 1.06 / 0.97, ZeRO-2 batch 8 0.87 / 0.80. Ray's own share is at most 5 % of compute
(ray_ratio_without_data 0.95-1.03); the rest at ZeRO-2 batch 8 is DeepSpeed's ZeRO-2 bookkeeping (a
gradient hook, bucket copies and a flat fp32 step per parameter, about 20 ms a step whatever the batch:
deepspeed_ratio_without_data 0.78), which the batch-32 step amortises. The Ray Data feed hides the data
preparation the plain loop does inline (ratio above 1 at batch 32). B/14 tensors held per worker: ZeRO-1
2733 MB, ZeRO-2 2733 MB, ZeRO-3 2393 MB (predicted 2684 / 2684 / 2390); with grad_accum 2, ZeRO-1 3304
MB and ZeRO-2 2734 MB (predicted 3303 / 2684); in bf16, ZeRO-1 2122 MB, ZeRO-2 2122 MB, ZeRO-3 1952 MB
(predicted 2097 / 2097 / 1950: bf16 weights and gradients, fp32 masters and moments, the EMA's fp32
masters whole, one bucket at ZeRO-3). Tiny at ZeRO 0-3: 18.7 / 15.0 / 15.0 / 208 MB (predicted 17.4 /
13.3 / 13.3 / 202); S/14: 1374 / 1081 / 1081 / 1038 MB (predicted 1373 / 1056 / 1056 / 1035). With Adafactor (a loaded machine; the step times are not rates): B/14
ZeRO-0 1835 MB, ZeRO-2 2313 MB, bf16 ZeRO-0 1892 MB (predicted 1834 / 2261 / 1890); S/14 ZeRO 0-3 745 / 1022
/ 927 / 881 MB (predicted 743 / 901 / 901 / 879); tiny ZeRO-3 206 MB (predicted 199). Tiny at ZeRO-3 had
been NaN at step 1: DeepSpeed leaves ZeRO-3's partition padding as allocated, and Adafactor's update scale (the
RMS of the flat partition) read an inf there; the trainer now zeroes the padding
(pipelines.train.zero.clear_partition_padding). Stages 1 and 2
are equal at grad_accum 1 because DeepSpeed 0.19.8 (zero/stage_1_and_2.py, `reduce_gradients`) reduces
stage 1's gradients at the accumulation boundary through the same buckets as stage 2 and drops the ones this rank
does not own before `engine.backward` returns: stage 1 holds full gradients only between micro-steps
(grad_accum > 1) and transiently at the end of autograd. With DeepSpeed's default 5e8-element buckets
ZeRO-3 held 4109 MB (engine.bucket_size).

On a machine shared with other jobs the timings are noisy; rerun for a second sample. Writes
bench/results/train.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import tempfile
import time

import torch

from bench.common import RESULTS, machine, print_table, write_json
from pipelines import data
from pipelines.train import Job, NoFaults, Plan, Worker, prepare_tokenizer, read_history, run
from tipsv2 import config_tree
from pipelines.train.config import preset
from tipsv2.loop import NonFiniteLoss, endless, train_local
from tipsv2.memory import MemoryInputs, model_state_bytes, parameter_count
from tipsv2.tokenizer import Tokenizer


def configure(name: str, sets: list[str], merge: dict | None = None):
    cfg = config_tree.merge(preset(name), merge or {})
    for assignment in sets:
        cfg = config_tree.override(cfg, assignment)
    return cfg


@contextlib.contextmanager
def single_rank_group():
    """The environment torch.distributed reads to make this process the only rank (gloo), as Ray Train sets
    it. The group outlives the block: DeepSpeed caches it, so the next engine in this process reuses it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    names = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
             "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def deepspeed_alone(cfg, *, output: str, source, tokenizer_path: str, stream) -> list[dict]:
    """The distributed path's step without Ray: pipelines.train.Worker (DeepSpeed engine, loss checks, the
    metrics row) as the only rank of this process, fed inline by `stream`. Its rows time the data apart."""
    plan = Plan(job=Job.PRETRAIN, cfg=cfg, output=output, source=source, ids=[], texts_ref=None,
                tokenizer=tokenizer_path, run_id=None)
    with single_rank_group():
        worker = Worker(plan, rank=0, world=1)
        return [worker.step(step, stream) for step in range(cfg.steps)]


def overhead(steps: int, warmup: int, *, batch: int, stage: int) -> dict:
    sets = [f"steps={steps}", "log_every=1000", "engine.workers=1", f"engine.zero_stage={stage}",
            f"data.batch_size={batch}", f"engine.checkpoint_every={steps}", "data.synthetic.val_size=4",
            "data.synthetic.test_size=4"]
    cfg = configure("tiny", sets)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        plain_out, ray_out = f"{root}/plain", f"{root}/ray"
        source = data.prepare_source(cfg.data, plain_out)
        texts = data.read_texts(source)
        tokenizer_path = prepare_tokenizer(cfg, plain_out, texts)
        tokenizer = Tokenizer(tokenizer_path, max_len=cfg.task.model.text.max_len)
        records = data.read_records(source, texts)
        stamps = [time.perf_counter()]
        start = time.perf_counter()
        train_local(cfg, records=records, tokenizer=tokenizer, on_step=lambda s, r: stamps.append(time.perf_counter()))
        plain_wall = time.perf_counter() - start
        plain_steps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:-1]
        alone = deepspeed_alone(cfg, output=plain_out, source=source, tokenizer_path=tokenizer_path,
                                stream=endless(records, data=cfg.data, seed=cfg.seed, patch_size=14,
                                               tokenizer=tokenizer))[warmup:-1]
        start = time.perf_counter()
        run(Job.PRETRAIN, cfg, ray_out, faults=NoFaults())
        ray_wall = time.perf_counter() - start
        rows = read_history(ray_out)
        # The plain loop prepares its batches inline: time that part alone on the same batches.
        stream = endless(records, data=cfg.data, seed=cfg.seed, patch_size=14, tokenizer=tokenizer)
        data_times = []
        for _ in range(steps):
            before = time.perf_counter()
            next(stream)
            data_times.append(time.perf_counter() - before)
    rows = rows[warmup:-1]   # the last step also walks every live tensor (the memory metric)
    plain_s, ray_s = statistics.median(plain_steps), statistics.median(r["time/step_s"] for r in rows)
    plain_data = statistics.median(data_times[warmup:-1])
    ray_wait = statistics.median(r["time/data_wait_s"] for r in rows)

    def compute(arm: list[dict]) -> float:
        return statistics.median(r["time/step_s"] - r["time/data_wait_s"] for r in arm)

    plain_compute, alone_compute, ray_compute = plain_s - plain_data, compute(alone), compute(rows)
    plain_mean, ray_mean = statistics.mean(plain_steps), statistics.mean(r["time/step_s"] for r in rows)
    return {"steps": steps, "warmup": warmup, "batch": cfg.data.batch_size, "zero_stage": stage,
            "plain_step_s": plain_s, "ray_step_s": ray_s, "plain_steps_per_s": 1 / plain_s, "ray_steps_per_s": 1 / ray_s,
            "ratio": plain_s / ray_s, "plain_mean_step_s": plain_mean, "ray_mean_step_s": ray_mean,
            "ratio_mean": plain_mean / ray_mean,
            "plain_data_s": plain_data, "ray_data_wait_s": ray_wait,
            "plain_compute_s": plain_compute, "deepspeed_compute_s": alone_compute, "ray_compute_s": ray_compute,
            "ratio_without_data": plain_compute / ray_compute,
            "deepspeed_ratio_without_data": plain_compute / alone_compute,
            "ray_ratio_without_data": alone_compute / ray_compute,
            "plain_wall_s": plain_wall, "ray_wall_s": ray_wall}


def predicted_mb(cfg, workers: int) -> float:
    """The model state tipsv2.memory predicts per worker for this run (MiB)."""
    engine = cfg.engine
    inputs = MemoryInputs(stage=engine.zero_stage, workers=workers, precision=engine.precision,
                          grad_accum=engine.grad_accum, bucket_size=engine.bucket_size, optimizer=cfg.optim.optimizer)
    return model_state_bytes(parameter_count(cfg), inputs) / 2 ** 20


def memory(runs: list[tuple[int, int, str]], steps: int, batch: int, workers: int, model: str = "vit_b14",
           optimizer: str | None = None) -> list[dict]:
    sets = [*([f"optim.optimizer={optimizer}"] if optimizer else []), f"steps={steps}", "log_every=1000", f"engine.workers={workers}", f"engine.checkpoint_every={steps}",
            "engine.use_gpu=false",
            f"data.batch_size={batch}", "data.global_batch=null", "engine.cpus_per_worker=1", "data.crops.global_size=112",
            "data.crops.local_size=56", "data.synthetic.image_size=112", "data.synthetic.train_size=16", "data.synthetic.val_size=2",
            "data.synthetic.test_size=2", "data.tokenizer_vocab=256"]
    out = []
    for stage, accum, precision in runs:
        cfg = configure(model, [*sets, f"engine.zero_stage={stage}", f"engine.grad_accum={accum}",
                                    f"engine.precision={precision}"],
                        merge={"task": {"dino": {"local_crops": 2}}, "data": {"crops": {"local_crops": 2}}})
        row = {"model": model, "optimizer": cfg.optim.optimizer.value, "zero_stage": stage, "grad_accum": accum,
               "precision": precision, "workers": workers}
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            try:
                run(Job.PRETRAIN, cfg, root, faults=NoFaults())
            except NonFiniteLoss as err:   # a row that diverges is a result too: recorded, the others go on
                out.append(row | {"error": str(err)[:300], "wall_s": time.perf_counter() - start})
                continue
            rows = read_history(root)
        out.append({"model": model, "optimizer": cfg.optim.optimizer.value, "zero_stage": stage, "grad_accum": accum, "precision": precision, "workers": workers,
                    "live_tensors_mb_per_worker": rows[-1]["memory/live_tensors_mb"],
                    "peak_rss_mb_per_worker": rows[-1]["memory/peak_rss_mb"],
                    "predicted_model_state_mb_per_worker": predicted_mb(cfg, workers),
                    "step_s": statistics.median(r["time/step_s"] for r in rows[1:] or rows),
                    "wall_s": time.perf_counter() - start})
    return out


def memory_runs(specs: list[str]) -> list[tuple[int, int, str]]:
    """["1:1", "2:1:bf16"] -> [(1, 1, "fp32"), (2, 1, "bf16")]: the STAGE:GRAD_ACCUM[:PRECISION] arguments."""
    out = []
    for spec in specs:
        stage, accum, *rest = spec.split(":")
        precision = rest[0] if rest else "fp32"
        if len(rest) > 1 or precision not in ("fp32", "bf16"):
            raise ValueError(f"--memory-runs takes STAGE:GRAD_ACCUM[:fp32|bf16], got {spec!r}")
        out.append((int(stage), int(accum), precision))
    return out


def int_pairs(specs: list[str]) -> list[tuple[int, int]]:
    """["2:8", "0:8"] -> [(2, 8), (0, 8)]: the STAGE:BATCH arguments."""
    return [(int(a), int(b)) for a, b in (spec.split(":") for spec in specs)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps of the overhead comparison")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state median")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--memory-batch", type=int, default=2, help="rows per worker")
    parser.add_argument("--memory-models", nargs="+", default=["vit_b14"], metavar="PRESET",
                        help="presets of the memory rows (each runs every --memory-runs row)")
    parser.add_argument("--append-memory", action="store_true",
                        help="add the new memory rows to those already written instead of replacing them")
    parser.add_argument("--memory-runs", nargs="+",
                        default=["1:1", "2:1", "3:1", "1:2", "2:2", "1:1:bf16", "2:1:bf16", "3:1:bf16"],
                        metavar="STAGE:GRAD_ACCUM[:PRECISION]",
                        help="ZeRO stage, gradient accumulation and precision (fp32, bf16) of each memory row")
    parser.add_argument("--optimizer", choices=["adamw", "adafactor"], default=None,
                        help="the memory rows' optimiser (default: each preset's own)")
    parser.add_argument("--overhead-runs", nargs="+", default=["2:8", "0:8", "2:32"], metavar="STAGE:BATCH",
                        help="ZeRO stage and batch of each overhead comparison (one worker)")
    parser.add_argument("--skip-memory", action="store_true", help="keep the memory result already written")
    parser.add_argument("--skip-overhead", action="store_true", help="keep the overhead result already written")
    args = parser.parse_args(argv)
    result = {"machine": machine(), "note": "shared 2-core machine: timings are noisy"}
    previous = RESULTS / "train.json"
    if args.skip_overhead and previous.exists():
        result["overhead"] = json.loads(previous.read_text())["overhead"]
    else:
        result["overhead"] = [overhead(args.steps, args.warmup, stage=stage, batch=batch)
                              for stage, batch in int_pairs(args.overhead_runs)]
    print_table(result["overhead"], ["zero_stage", "batch", "plain_steps_per_s", "ray_steps_per_s", "ratio",
                                     "ratio_mean", "plain_data_s", "ray_data_wait_s", "ratio_without_data",
                                     "deepspeed_ratio_without_data", "ray_ratio_without_data", "ray_wall_s"])
    if args.skip_memory and previous.exists():
        result["memory"] = json.loads(previous.read_text()).get("memory")
    elif not args.skip_memory:
        kept = json.loads(previous.read_text()).get("memory", []) if args.append_memory and previous.exists() else []
        result["memory"] = kept + [row for model in args.memory_models
                                   for row in memory(memory_runs(args.memory_runs), args.memory_steps,
                                                     args.memory_batch, workers=2, model=model,
                                                     optimizer=args.optimizer)]
    if result.get("memory"):
        print_table(result["memory"], ["model", "optimizer", "zero_stage", "grad_accum", "precision", "workers", "live_tensors_mb_per_worker", "peak_rss_mb_per_worker",
                                       "predicted_model_state_mb_per_worker", "step_s", "wall_s"])
    print(f"wrote {write_json('train', result)}")


if __name__ == "__main__":
    main()

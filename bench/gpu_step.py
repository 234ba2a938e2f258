"""The TIPSv2 training step on one GPU in plain PyTorch: images/s, MFU and peak memory, nothing but torch.

    python -m bench.gpu_step                       # B/14 and L/14 at 224 and 448 px, bf16 autocast (minutes)
    python -m bench.gpu_step --compile             # the same with torch.compile on both towers (longer)
    python -m bench.gpu_step --runs vit_b14:224:128 --steps 20
    python -m bench.gpu_step --device cpu --runs tiny:112:4 --steps 2 --warmup 1 --result /tmp/gpu_step.json

One step is what the trainer does on each rank, from the project's own code (tipsv2/): TIPSv2Task forward
(teacher targets, student passes, contrastive + DINO + iBOT++ losses) under bf16 autocast, backward,
gradient clipping, the preset's optimiser (tipsv2.optim.build_optimizer) on tipsv2.optim's parameter groups with the LR schedule, and the EMA teacher
update. No Ray, DeepSpeed, MLflow or pyarrow (the GPU machine has none; nothing from pipelines/ is
imported; tipsv2 brings numpy, PIL and safetensors, which torchvision and transformers bring too), no
data loading: a few random batches (tipsv2.data.batch.random_batch) live on the device, so the figure is
the step's own speed, the ceiling a real run approaches. Global crops at PX, local crops at the preset's
98 px (the paper's high-resolution phase raises the global crop only).

Per run (MODEL:PX:BATCH): median step time after `--warmup` steps -> images/s; MFU = analytic training
FLOPs per image (tipsv2.flops.flops_per_example) x images/s / the device's peak (tipsv2.flops:
GPU_PEAK_FLOPS by name, TIPSV2_PEAK_FLOPS, or a timed matmul on CPU); peak memory allocated beside what
tipsv2.memory predicts for one process (fp32 weights, gradients and the optimiser's state; activations in bf16).
Runs stop being started once `--budget-s` (default 420 s) is spent, so the whole bench ends within
8 minutes; a run that runs out of memory is reported as such and the next one goes on. Writes
bench/results/gpu_step.json, which pipelines.plan prefers over its assumed MFU for the same GPU and model.
Not yet run on a GPU (none was available when it was written): tests/test_gpu_step.py runs it on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from bench.common import RESULTS, machine, print_table
from tipsv2 import config_tree
from tipsv2.configs import Precision, PretrainConfig, preset
from tipsv2.data.batch import Batch, random_batch
from tipsv2.flops import flops_per_example, peak_flops
from tipsv2.memory import GiB, MemoryInputs, activation_bytes, model_state_bytes, parameter_count
from tipsv2.optim import TowerDepths, build_optimizer, learning_rate, param_groups, set_learning_rate
from tipsv2.task import TIPSv2Task

# MODEL:PX:BATCH. At 224 px the presets' own batches (what pipelines.plan plans with); at 448 px a quarter:
# tipsv2.memory predicted 45, 31, 49 and 34 GiB with AdamW (fp32 weights and moments, bf16 activations).
RUNS = ("vit_b14:224:128", "vit_b14:448:32", "vit_l14:224:64", "vit_l14:448:16")
BATCHES = 3                 # distinct random batches cycled through, resident on the device
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    model: str              # a tipsv2.configs preset
    px: int                 # global crop side
    batch: int              # images per step


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    device: torch.device
    precision: str          # autocast dtype: bf16 or fp32 (no autocast)
    steps: int              # timed steps
    warmup: int             # untimed steps first (allocator warm-up, compilation)
    compile: bool
    budget_s: float         # no new run starts after this many seconds


def parse_run(spec: str) -> Run:
    """"vit_b14:224:64" -> Run(model="vit_b14", px=224, batch=64)."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"--runs takes MODEL:PX:BATCH (e.g. vit_b14:224:64), got {spec!r}")
    return Run(model=parts[0], px=int(parts[1]), batch=int(parts[2]))


def configure(run: Run) -> PretrainConfig:
    """The preset with the run's global crop and batch (unknown presets fail with the valid ones)."""
    cfg = preset(run.model)
    return config_tree.merge(cfg, {"data": {"batch_size": run.batch, "crops": {"global_size": run.px}}})


def device_batches(cfg: PretrainConfig, device: torch.device) -> list[Batch]:
    text = cfg.task.model.text
    return [random_batch(batch_size=cfg.data.batch_size, crops=cfg.data.crops, mask_ratio=cfg.data.masking.ratio,
                         vocab_size=text.vocab_size, text_len=text.max_len, seed=seed).to(device)
            for seed in range(BATCHES)]


def build(cfg: PretrainConfig, settings: Settings) -> tuple[TIPSv2Task, torch.optim.Optimizer, list]:
    """Task, the preset's optimiser on the trainer's parameter groups, and the trained parameters (for clipping)."""
    torch.manual_seed(0)
    task = TIPSv2Task(cfg.task).to(settings.device)
    groups = param_groups(task.trainable_parameters(), cfg.optim, depths=TowerDepths.of(cfg.task.model))
    optimizer = build_optimizer(groups, cfg.optim)
    if settings.compile:   # after the parameter groups: compiled modules rename their parameters
        task.model.vision = torch.compile(task.model.vision)
        task.model.text = torch.compile(task.model.text)
    return task, optimizer, [p for g in groups for p in g["params"]]


def train_step(task: TIPSv2Task, optimizer: torch.optim.Optimizer, params: list, batch: Batch, *, step: int,
               cfg: PretrainConfig, dtype: torch.dtype) -> float:
    """One optimiser step as the trainer runs it; returns the total loss."""
    set_learning_rate(optimizer, learning_rate(step, total_steps=cfg.steps, cfg=cfg.optim))
    with torch.autocast(batch.global_crop.device.type, dtype=dtype, enabled=dtype != torch.float32):
        losses = task(batch, step)
    optimizer.zero_grad(set_to_none=True)
    losses["loss/total"].backward()
    if cfg.optim.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
    optimizer.step()
    task.update_teacher(step=step, total_steps=cfg.steps)
    return losses["loss/total"].detach()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predicted_gib(cfg: PretrainConfig, settings: Settings) -> float:
    """tipsv2.memory's prediction for one process: fp32 model state (ZeRO-0), activations under autocast."""
    state = model_state_bytes(parameter_count(cfg), MemoryInputs(stage=0, workers=1, optimizer=cfg.optim.optimizer))
    activations = activation_bytes(cfg, precision=Precision(settings.precision)) * cfg.data.batch_size
    return (state + activations) / GiB


def peak_gib(device: torch.device) -> float:
    """Peak tensor memory on a GPU; the process's peak resident memory on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def measure(run: Run, settings: Settings) -> dict:
    cfg = configure(run)
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(settings.device)
    task, optimizer, params = build(cfg, settings)
    batches, dtype = device_batches(cfg, settings.device), DTYPES[settings.precision]
    times, losses = [], []
    for step in range(settings.warmup + settings.steps):
        synchronize(settings.device)
        start = time.perf_counter()
        losses.append(train_step(task, optimizer, params, batches[step % BATCHES], step=step, cfg=cfg, dtype=dtype))
        synchronize(settings.device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[settings.warmup:])
    images_per_s = run.batch / step_s
    precision = Precision.FP32 if settings.precision == "fp32" else Precision.BF16
    return {"model": run.model, "px": run.px, "batch": run.batch, "status": "ok", "steps": settings.steps,
            "step_s": step_s, "images_per_s": images_per_s,
            "mfu": flops_per_example(cfg) * images_per_s / peak_flops(settings.device, precision),
            "peak_memory_gib": peak_gib(settings.device), "predicted_memory_gib": predicted_gib(cfg, settings),
            "loss_first": float(losses[0]), "loss_last": float(losses[-1]), "first_step_s": times[0]}


def attempt(run: Run, settings: Settings) -> dict:
    """measure(), with running out of GPU memory reported as a row instead of ending the bench."""
    try:
        return measure(run, settings)
    except torch.OutOfMemoryError as err:
        return {"model": run.model, "px": run.px, "batch": run.batch,
                "status": f"out of memory at batch {run.batch}: {str(err).splitlines()[0][:200]}"}
    finally:
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_all(runs: list[Run], settings: Settings) -> list[dict]:
    start, rows = time.perf_counter(), []
    for run in runs:
        if time.perf_counter() - start > settings.budget_s:
            rows.append({"model": run.model, "px": run.px, "batch": run.batch,
                         "status": f"skipped: the {settings.budget_s:.0f} s budget was spent"})
            continue
        rows.append(attempt(run, settings) | {"wall_s": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), metavar="MODEL:PX:BATCH")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16", help="autocast dtype")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--compile", action="store_true", help="torch.compile the vision and text towers")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no run starts after this many seconds")
    parser.add_argument("--result", default=str(RESULTS / "gpu_step.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: this bench needs a GPU (--device cpu for a smoke test)")
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    try:
        runs = [parse_run(spec) for spec in args.runs]
        for run in runs:
            configure(run)
    except ValueError as err:
        parser.error(str(err))
    torch.backends.cuda.matmul.allow_tf32 = True
    settings = Settings(device=device, precision=args.precision, steps=args.steps, warmup=args.warmup,
                        compile=args.compile, budget_s=args.budget_s)
    rows = run_all(runs, settings)
    print_table(rows, ["model", "px", "batch", "status", "images_per_s", "mfu", "peak_memory_gib",
                       "predicted_memory_gib", "step_s", "first_step_s"])
    result = {"machine": machine(), "device": device_name(device), "precision": args.precision,
              "compile": args.compile, "rows": rows}
    path = Path(args.result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

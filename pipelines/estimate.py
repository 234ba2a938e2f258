"""Per-worker estimates of a training stage: images/s, step time and GPU memory, each with its source.

`pipelines.plan` turns these into nodes, hours and cost; `pipelines.train` logs them to MLflow when a
pretrain or distill run starts (`plan_metrics`), beside the run's own `images_per_s`, `mfu` and
`memory/gpu_peak_mb`, so a run can be compared with its plan.

Measured profiles come first, analytic estimates second, and every figure names where it came from:
  - throughput on a GPU: bench/results/gpu_train.json (bench/gpu_train.sh, the whole engine) or
    gpu_step.json (bench/gpu_step.py, the step alone) for the same GPU, model and crop size > an MFU
    measured there for the same model on another GPU > `Assumptions.mfu` x the GPU's peak (tipsv2.flops);
  - throughput on CPU workers: bench/results/train.json (the tiny preset through Ray Train + DeepSpeed,
    per image) > `Assumptions.cpu_mfu` x the measured one-thread matmul peak (bench/results/model.json);
  - memory: tipsv2.memory (model state matches bench/results/train.json within 12 %, B/14 and S/14 2.4 %;
    activations counted from the modules and checked against a CPU forward in tests/test_plan.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.resources import RESOURCE_REQUESTS, Stage, accelerator
from pipelines.tracking import MetricsSink
from pipelines.train.config import DistillJobConfig, JobConfig
from tipsv2.optim import Optimizer
from tipsv2.configs import model_config_of
from tipsv2.flops import GPU_PEAK_FLOPS, flops_per_example, gpu_peak_flops
from tipsv2.memory import (GiB, MemoryInputs, activation_bytes, largest_fitting_batch, model_state_bytes,
                           parameter_count)

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"

# GPU memory per device (vendor data sheets, GB as sold; torch sees slightly less).
GPU_MEMORY_GIB = {"H200": 141.0, "H100": 80.0, "A100": 40.0, "L40S": 48.0, "L4": 24.0, "A10G": 24.0}


@dataclass(frozen=True, kw_only=True)
class Assumptions:
    """Every number the plan assumes rather than measures; `--set assume.<field>=VALUE` overrides one."""
    # Model FLOPs utilisation of a training step on a GPU. Our choice: ViT training in bf16 with ZeRO-2
    # typically reaches 35-50 % on H100-class GPUs; 40 % until bench/gpu_step.py has measured this GPU.
    mfu: float = 0.40
    # Fraction of the one-thread matmul peak a CPU training step reaches. Measured in
    # bench/results/train.json: tiny 0.38-0.57, B/14 fp32 ZeRO-1/2 0.29-0.37; our choice 0.40.
    cpu_mfu: float = 0.40
    # Images captioned per second per inference GPU (all granularities of an image are one request). None:
    # estimated per GPU type from CAPTION_DECODE_TOKENS_PER_S (caption_throughput). Measure with
    # bench/caption.py on a GPU and override.
    captions_per_s_per_gpu: float | None = None
    # Images decoded, validated, hashed and written per CPU core per second. Our choice for ~0.25 MP web
    # JPEGs; bench/results/caption.json measured 374 /s on 112 px synthetic PNGs (an upper bound).
    ingest_images_per_s_per_cpu: float = 100.0
    # Ingest and template captioning scale out until they would finish in about this long (hours); our
    # choice, so a small run does not start every node max_workers allows.
    scale_out_hours: float = 1.0
    # GPU-hours of the evaluation suites per model (teacher and student: 2 models). Our choice: the
    # frozen-feature suites on ImageNet-size datasets take well under an hour on one GPU.
    evaluate_hours: float = 0.5
    # Seconds from `ray job submit` until a fresh GPU node runs the job: instance boot and the Ray GPU image
    # pulled (~10 GB). Our choice, 10 minutes; 0 on a running cluster.
    node_start_s: float = 600.0
    # Seconds a training job spends before its first step and after its last: Ray and Ray Train start-up,
    # DeepSpeed initialisation, the data pipeline's first blocks, the export. Measured on CPU in
    # bench/results/train.json: 22-40 s (wall minus steps x step time); our choice 30 s.
    job_start_s: float = 30.0
    # GPU memory a training worker cannot use for tensors: CUDA context, cuBLAS and NCCL workspaces,
    # allocator fragmentation. Our choice, GiB.
    reserved_gib: float = 3.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None and getattr(self, f.name) < 0:
                raise ValueError(f"assume.{f.name} must be >= 0, got {getattr(self, f.name)}")
        if not 0 < self.mfu <= 1 or not 0 < self.cpu_mfu <= 1:
            raise ValueError(f"assume.mfu and assume.cpu_mfu must be in (0, 1], got {self.mfu}, {self.cpu_mfu}")


# Generated tokens per second of one GPU running a ~7B model under vLLM, batched, before any measurement of our
# own (bench/caption.py has not run on a GPU). The one public figure we could find: Llama-2-7B on one A10G
# (24 GB, 600 GB/s), vLLM 0.2.0, 1000 prompts of 256 input + 128 output tokens: 3.84 prompts/s, so 491
# generated tokens/s (neuralmagic/nm-vllm github-action-benchmark,
# https://github.com/neuralmagic/nm-vllm/commit/4c041221fb69670a5aa00d30d1bcf656586b7e3c). The other GPUs: our
# estimate, that figure scaled by memory bandwidth (batched decode of a 7B model is bound by reading the weights
# and the KV cache; vendor data sheets: L4 300 GB/s, A100 40 GB 1555, L40S 864, H100 SXM 3350, H200 4800).
# Qwen2.5-VL-7B adds an image prefill of about the benchmark's 256 prompt tokens; a newer vLLM is faster.
A10G_DECODE_TOKENS_PER_S = 3.84 * 128
MEMORY_BANDWIDTH_GBS = {"A10G": 600.0, "L4": 300.0, "A100": 1555.0, "L40S": 864.0, "H100": 3350.0, "H200": 4800.0}
CAPTION_DECODE_TOKENS_PER_S = {gpu: A10G_DECODE_TOKENS_PER_S * bandwidth / MEMORY_BANDWIDTH_GBS["A10G"]
                               for gpu, bandwidth in MEMORY_BANDWIDTH_GBS.items()}


@dataclass(frozen=True, kw_only=True)
class Figure:
    """A number with its unit and where it came from."""
    value: float
    unit: str
    source: str


@dataclass(frozen=True, kw_only=True)
class Profiles:
    """Measured results the estimates prefer (bench/results/*.json); empty lists when none were run."""
    gpu_steps: list[dict[str, Any]]       # bench/results/gpu_train.json and gpu_step.json rows (gpu_rows)
    cpu_steps: list[dict[str, Any]]       # bench/results/train.json "overhead" rows (tiny preset)
    cpu_thread_flops: float | None        # bench/results/model.json matmul peak / threads (FLOP/s)


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """GPU memory of one training worker (GiB)."""
    model_state: float
    activations: float                    # at the configured batch
    activations_per_image: float
    reserved: float

    @property
    def total(self) -> float:
        return self.model_state + self.activations + self.reserved


@dataclass(frozen=True, kw_only=True)
class Verdict:
    gpu: str
    capacity_gib: float
    needed_gib: float
    fits: bool
    advice: str                           # "" when it fits


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def gpu_rows(results: Path) -> list[dict[str, Any]]:
    """Measured GPU rows, one shape: bench/gpu_train.sh's (the whole engine: Ray Train, DeepSpeed ZeRO-2, Ray
    Data; global crops at 224 px) and bench/gpu_step.py's (the step alone), each with its file and device."""
    rows = []
    train = read_json(results / "gpu_train.json") or {}
    rows += [{"file": "gpu_train.json", "device": train.get("device", ""), "model": r["model"], "px": 224,
              "batch": r.get("batch", "?"), "images_per_s": r["images_per_s_median"], "mfu": r["mfu_median"]}
             for r in train.get("rows", []) if r.get("status") == "ok"]
    step = read_json(results / "gpu_step.json") or {}
    rows += [{"file": "gpu_step.json", "device": step.get("device", ""), **{k: r[k] for k in (
        "model", "px", "batch", "images_per_s", "mfu")}} for r in step.get("rows", []) if r.get("status") == "ok"]
    return rows


def load_profiles(results: Path = RESULTS) -> Profiles:
    train = read_json(results / "train.json") or {}
    model = read_json(results / "model.json") or {}
    threads = (model.get("machine") or {}).get("threads") or 1
    peak = model.get("matmul_peak_gflops")
    return Profiles(gpu_steps=gpu_rows(results), cpu_steps=train.get("overhead", []),
                    cpu_thread_flops=peak * 1e9 / threads if peak else None)


def preset_name(cfg: JobConfig) -> str:
    """The model size of `cfg` as a preset name (`vit_b14`), matched on the vision tower; "" if none."""
    from tipsv2.models.config import MODEL_PRESETS

    vision = model_config_of(cfg).vision
    shape = (vision.width, vision.depth, vision.ffn)
    return next((name for name, make in MODEL_PRESETS.items()
                 if (make().vision.width, make().vision.depth, make().vision.ffn) == shape), "")


def gpu_throughput(cfg: JobConfig, gpu: str, *, assume: Assumptions, profiles: Profiles) -> Figure:
    """Training images/s of one GPU worker."""
    name, size = preset_name(cfg), cfg.data.crops.global_size
    same = [r for r in profiles.gpu_steps if r["model"] == name and r["px"] == size]
    exact = [r for r in same if gpu in r["device"]]
    flops = flops_per_example(cfg)
    # The whole engine (gpu_train.json) before the step alone (gpu_step.json), then the fastest.
    def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return max(rows, key=lambda r: (r["file"] == "gpu_train.json", r["images_per_s"]))
    if exact:
        row = best(exact)
        return Figure(value=row["images_per_s"], unit="images/s", source=(
            f"measured: bench/results/{row['file']} ({row['device']}, {name} {size} px, batch {row['batch']})"))
    peak = gpu_peak_flops(gpu, cfg.engine.precision)
    if same:
        row = best(same)
        return Figure(value=peak * row["mfu"] / flops, unit="images/s", source=(
            f"MFU {row['mfu']:.0%} measured on {row['device']} (bench/results/{row['file']}) x {gpu} peak "
            f"{peak / 1e12:.0f} TFLOP/s / {flops / 1e9:.0f} GFLOP per image"))
    if math.isnan(peak):
        raise ValueError(f"no peak FLOP/s known for GPU {gpu!r}; known: {sorted(GPU_PEAK_FLOPS)}")
    return Figure(value=peak * assume.mfu / flops, unit="images/s", source=(
        f"assumed MFU {assume.mfu:.0%} (assume.mfu) x {gpu} peak {peak / 1e12:.0f} TFLOP/s "
        f"{cfg.engine.precision.value} / {flops / 1e9:.0f} GFLOP per image (tipsv2.flops)"))


class MissingProfile(ValueError):
    """A throughput estimate needs a measured profile that is not there (bench/results/ not shipped)."""


def cpu_throughput(cfg: JobConfig, *, assume: Assumptions, profiles: Profiles) -> Figure:
    """Training images/s of one CPU worker (`engine.cpus_per_worker` threads)."""
    threads = max(1.0, cfg.engine.cpus_per_worker)
    rows = [r for r in profiles.cpu_steps if r["zero_stage"] == cfg.engine.zero_stage]
    if preset_name(cfg) == "tiny" and cfg.data.crops.global_size == 112 and rows:
        row = min(rows, key=lambda r: abs(math.log(r["batch"] / cfg.data.batch_size)))
        return Figure(value=row["batch"] / row["ray_step_s"] * threads, unit="images/s", source=(
            f"measured: bench/results/train.json (tiny, batch {row['batch']}, ZeRO-{row['zero_stage']}, "
            f"Ray Train + DeepSpeed, 1 thread) x {threads:g} threads"))
    if profiles.cpu_thread_flops is None:
        raise MissingProfile("no CPU profile: run `python -m bench.model` (writes bench/results/model.json)")
    flops = flops_per_example(cfg)
    return Figure(value=profiles.cpu_thread_flops * threads * assume.cpu_mfu / flops, unit="images/s", source=(
        f"assumed CPU MFU {assume.cpu_mfu:.0%} (assume.cpu_mfu) x measured matmul peak "
        f"{profiles.cpu_thread_flops / 1e9:.0f} GFLOP/s per thread (bench/results/model.json) x {threads:g} "
        f"threads / {flops / 1e9:.2f} GFLOP per image"))


def caption_throughput(gpu: str | None, *, tokens_per_image: int, assume: Assumptions) -> Figure:
    """Images captioned per second by one inference GPU: `assume.captions_per_s_per_gpu` when set, else our
    estimate, the GPU's decode tokens/s (CAPTION_DECODE_TOKENS_PER_S: one cited figure, scaled by memory
    bandwidth) / the tokens generated per image (every granularity of one request, at its max_tokens: an
    upper bound, so an estimate on the slow side)."""
    if assume.captions_per_s_per_gpu is not None:
        return Figure(value=assume.captions_per_s_per_gpu, unit="images/s", source=(
            f"assumed {assume.captions_per_s_per_gpu:g} images/s per GPU, all granularities "
            f"(assume.captions_per_s_per_gpu)"))
    if gpu not in CAPTION_DECODE_TOKENS_PER_S:
        raise ValueError(f"no caption throughput known for GPU {gpu!r}; known: {sorted(CAPTION_DECODE_TOKENS_PER_S)}; "
                         f"set assume.captions_per_s_per_gpu")
    decode = CAPTION_DECODE_TOKENS_PER_S[gpu]
    cited = "cited" if gpu == "A10G" else (f"our estimate: A10G's x {gpu}/A10G memory bandwidth "
                                           f"{MEMORY_BANDWIDTH_GBS[gpu]:g}/{MEMORY_BANDWIDTH_GBS['A10G']:g} GB/s")
    return Figure(value=decode / tokens_per_image, unit="images/s", source=(
        f"our estimate: {decode:,.0f} generated tokens/s on one {gpu} ({cited}; A10G: 491 tokens/s, Llama-2-7B, "
        f"vLLM 0.2.0, github.com/neuralmagic/nm-vllm commit 4c04122) / {tokens_per_image} tokens per image (the "
        f"granularities' max_tokens) = {decode / tokens_per_image:.2f} images/s per GPU; override with "
        f"assume.captions_per_s_per_gpu"))


def contrastive_negatives(cfg: JobConfig) -> int:
    """Image-text pairs the contrastive loss compares in one optimiser step, each image's caption its positive and
    every other text its negatives. Pretraining caches features across accumulation (pipelines.train.accumulate:
    the loss over every micro-batch of every rank): per-worker batch x grad_accum x workers. Distillation computes
    it per micro-batch: per-worker batch x workers."""
    accumulated = 1 if isinstance(cfg, DistillJobConfig) else cfg.engine.grad_accum
    return cfg.data.batch_size * accumulated * cfg.engine.workers


def memory_inputs(cfg: JobConfig) -> MemoryInputs:
    engine = cfg.engine
    return MemoryInputs(stage=engine.zero_stage, workers=engine.workers, precision=engine.precision,
                        grad_accum=engine.grad_accum, bucket_size=engine.bucket_size, optimizer=cfg.optim.optimizer)


def estimate_memory(cfg: JobConfig, *, assume: Assumptions) -> MemoryEstimate:
    """Model state (tipsv2.memory) + activations at the configured batch + the reserve, per worker."""
    state = model_state_bytes(parameter_count(cfg), memory_inputs(cfg)) / GiB
    per_image = activation_bytes(cfg, precision=cfg.engine.precision) / GiB
    return MemoryEstimate(model_state=state, activations=per_image * cfg.data.batch_size,
                          activations_per_image=per_image, reserved=assume.reserved_gib)


def with_engine(cfg: JobConfig, **changes) -> JobConfig:
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, **changes))


def with_batch(cfg: JobConfig, batch: int, grad_accum: int) -> JobConfig:
    cfg = with_engine(cfg, grad_accum=grad_accum)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch))


def advice(cfg: JobConfig, capacity: float, *, assume: Assumptions) -> str:
    """What to change so a worker fits in `capacity` GiB: ZeRO-3, a smaller micro-batch with more accumulation
    (pretraining keeps its contrastive pairs per step, feature-cached; distillation's shrink: contrastive_negatives),
    or more memory."""
    batch, accum = cfg.data.batch_size, cfg.engine.grad_accum
    caveat = (" (Adafactor then runs unfactored on DeepSpeed's flat partitions, not the paper's optimiser: "
              "pipelines.train.config.engine_of)" if cfg.optim.optimizer == Optimizer.ADAFACTOR else "")
    tips = []
    if cfg.engine.zero_stage < 3 and estimate_memory(with_engine(cfg, zero_stage=3), assume=assume).total <= capacity:
        tips.append(f"try ZeRO-3 (--set engine.zero_stage=3){caveat}")
    for stage in sorted({cfg.engine.zero_stage, 3}):
        staged = with_engine(cfg, zero_stage=stage)
        est = estimate_memory(staged, assume=assume)
        fit = largest_fitting_batch(budget=capacity * GiB, state=(est.model_state + est.reserved) * GiB,
                                    per_image=est.activations_per_image * GiB)
        if 1 <= fit < batch:
            # The fewest micro-batches that split the batch evenly into pieces that fit.
            split = next(n for n in range(math.ceil(batch / fit), batch + 1) if batch % n == 0)
            new_batch, new_accum = batch // split, accum * split
            smaller = with_batch(staged, new_batch, new_accum)
            if estimate_memory(smaller, assume=assume).total <= capacity:
                tips.append(f"batch {new_batch} x grad_accum {new_accum} at ZeRO-{stage} (the contrastive loss then "
                            f"sees {contrastive_negatives(smaller)} pairs a step) "
                            f"(--set data.batch_size={new_batch} --set engine.grad_accum={new_accum}"
                            f"{'' if stage == cfg.engine.zero_stage else ' --set engine.zero_stage=3'})"
                            f"{caveat if stage > 0 else ''}")
                break
    if not tips:
        tips.append("even batch 1 at ZeRO-3 does not fit: more workers (ZeRO-3 shards by their number) or a "
                    "GPU with more memory")
    return "does not fit: " + "; or ".join(tips)


def verdict(cfg: JobConfig, gpu: str, *, assume: Assumptions) -> Verdict:
    """Fit or no fit of one training worker on one `gpu` (a GPU_MEMORY_GIB key)."""
    if gpu not in GPU_MEMORY_GIB:
        raise ValueError(f"no memory size known for GPU {gpu!r}; known: {sorted(GPU_MEMORY_GIB)}")
    capacity = GPU_MEMORY_GIB[gpu]
    needed = estimate_memory(cfg, assume=assume).total
    fits = needed <= capacity
    return Verdict(gpu=gpu, capacity_gib=capacity, needed_gib=needed, fits=fits,
                   advice="" if fits else advice(cfg, capacity, assume=assume))


def plan_metrics(cfg: JobConfig, *, gpu: str | None, assume: Assumptions = Assumptions(),
                 profiles: Profiles | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, params) a training run logs at its start: its planned images/s and MFU per worker, step
    time and GPU memory (the run's own images_per_s, mfu, memory/gpu_peak_mb sit beside them)."""
    profiles = profiles or load_profiles()
    memory = estimate_memory(cfg, assume=assume)
    metrics = {"plan/model_state_gib": memory.model_state, "plan/activations_gib": memory.activations,
               "plan/gpu_memory_gib": memory.total}
    try:
        speed = (gpu_throughput(cfg, gpu, assume=assume, profiles=profiles) if gpu
                 else cpu_throughput(cfg, assume=assume, profiles=profiles))
    except MissingProfile as missing:   # a job whose working dir left bench/results/ behind still trains
        return metrics, {"plan.images_per_s.source": f"unavailable: {missing}"[:500],
                         "plan.memory.source": "tipsv2.memory", "plan.device": gpu or "cpu"}
    images = cfg.data.batch_size * cfg.engine.grad_accum
    metrics |= {"plan/images_per_s_per_worker": speed.value, "plan/step_s": images / speed.value}
    if gpu:
        metrics["plan/mfu"] = speed.value * flops_per_example(cfg) / gpu_peak_flops(gpu, cfg.engine.precision)
    params = {"plan.images_per_s.source": speed.source[:500],
              "plan.memory.source": "tipsv2.memory (model state: ZeRO model; activations: counted saved tensors)",
              "plan.device": gpu or "cpu"}
    return metrics, params


def log_plan(sink: MetricsSink, stage: Stage, cfg: JobConfig) -> None:
    """Log the plan of a training run as it starts (metrics at step 0 under plan/, sources as params): on
    GPUs for the accelerator the stage's request pins, else for CPU workers."""
    gpu = accelerator(RESOURCE_REQUESTS[stage]) if cfg.engine.use_gpu else None
    metrics, params = plan_metrics(cfg, gpu=gpu)
    sink.log_params(params)
    sink.log_metrics(metrics, step=0)

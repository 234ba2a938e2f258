"""The trainer's root configs: the library's recipe (`tipsv2.configs`) plus how it runs (`engine`: Ray Train
workers, DeepSpeed ZeRO, precision, checkpoints) and where it is recorded (`tracking`: MLflow).

    cfg = preset("vit_b14")                 # PretrainJobConfig: every recipe field, plus engine and tracking
    tipsv2.loop.train_local(cfg, ...)       # a job config is a recipe, so the library's loops take it as is

Presets are the library's, each given an engine: the paper sizes one 8-GPU node in bf16, with the gradient
accumulation that turns their micro-batch per GPU into the global batch they state (`data.global_batch`);
the CPU presets one CPU worker in fp32. `batch_split(cfg)` checks global = per-worker batch x grad_accum x
workers before a job starts (and in the planner): a `--set` that breaks it is an error naming the values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from pipelines.tracking import TrackingConfig
from tipsv2 import configs as recipes
from tipsv2.configs import DistillConfig, Precision, PretrainConfig
from tipsv2.optim import Optimizer


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How the distributed trainer runs (Ray Train + DeepSpeed)."""
    workers: int = 1                      # Ray Train workers (one per GPU on GPU nodes)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2                   # DeepSpeed ZeRO stage 0, 1, 2 or 3
    precision: Precision = Precision.FP32
    grad_accum: int = 1                   # micro-batches per optimiser step
    checkpoint_every: int = 100           # steps between checkpoints
    keep_checkpoints: int = 2
    max_failures: int = 0                 # Ray Train FailureConfig: worker failures survived by resuming
    bucket_size: int = 50_000_000         # elements per ZeRO reduce / all-gather / prefetch bucket

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"engine zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.bucket_size < 1:
            raise ValueError(f"engine bucket_size must be >= 1 element, got {self.bucket_size}")
        if self.workers < 1 or self.grad_accum < 1:
            raise ValueError(f"engine workers and grad_accum must be >= 1, got {self.workers}, {self.grad_accum}")


@dataclass(frozen=True, kw_only=True)
class JobFields:
    """What a job adds to its recipe."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass(frozen=True, kw_only=True)
class PretrainJobConfig(PretrainConfig, JobFields):
    """Root config of `python -m pipelines.pretrain`."""


@dataclass(frozen=True, kw_only=True)
class DistillJobConfig(DistillConfig, JobFields):
    """Root config of `python -m pipelines.distill`."""


JobConfig = PretrainJobConfig | DistillJobConfig


@dataclass(frozen=True, kw_only=True)
class BatchSplit:
    """How a step's global batch is split: `per_worker` images per micro-batch on each of `workers` ranks,
    `grad_accum` micro-batches per optimiser step."""
    per_worker: int
    grad_accum: int
    workers: int

    @property
    def global_batch(self) -> int:
        return self.per_worker * self.grad_accum * self.workers


def accumulation_for(global_batch: int, *, per_worker: int, workers: int) -> int:
    """The grad_accum that makes per_worker x grad_accum x workers equal global_batch; ValueError if none does."""
    micro = per_worker * workers
    if global_batch % micro:
        raise ValueError(f"global batch {global_batch} is not a multiple of data.batch_size {per_worker} x "
                         f"engine.workers {workers} = {micro}; choose a batch size or worker count that divides it")
    return global_batch // micro


def batch_split(cfg: PretrainConfig | DistillConfig, *, local: bool = False) -> BatchSplit:
    """The split of `cfg`'s global batch; ValueError naming the values when it does not give `data.global_batch`.
    `local`: the single-process loop, which trains data.batch_size images per step (no workers, no accumulation)."""
    engine = getattr(cfg, "engine", EngineConfig())
    split = (BatchSplit(per_worker=cfg.data.batch_size, grad_accum=1, workers=1) if local else
             BatchSplit(per_worker=cfg.data.batch_size, grad_accum=engine.grad_accum, workers=engine.workers))
    wanted = cfg.data.global_batch
    if wanted is None or wanted == split.global_batch:
        return split
    if local:
        raise ValueError(f"data.global_batch={wanted} but --local trains data.batch_size={split.per_worker} images "
                         f"per step (one process, no accumulation); set data.batch_size={wanted} or "
                         f"data.global_batch=null")
    hint = (f"set engine.grad_accum={wanted // (split.per_worker * split.workers)}"
            if wanted % (split.per_worker * split.workers) == 0 else
            "choose data.batch_size and engine.workers whose product divides it")
    raise ValueError(f"data.global_batch={wanted} but data.batch_size {split.per_worker} x engine.grad_accum "
                     f"{split.grad_accum} x engine.workers {split.workers} = {split.global_batch}: {hint} "
                     f"(or data.global_batch={split.global_batch})")


def optimizer_warning(cfg: PretrainConfig | DistillConfig, *, local: bool = False) -> str | None:
    """What the run should be told before it starts when its optimiser will not be the one it names: Adafactor
    under DeepSpeed ZeRO 1-3 (engine_of)."""
    stage = cfg.engine.zero_stage
    if local or stage == 0 or cfg.optim.optimizer != Optimizer.ADAFACTOR:
        return None
    return (f"warning: optim.optimizer=adafactor at engine.zero_stage={stage}: DeepSpeed hands it flat 1-D "
            "partitions, so its second moments are unfactored and its update scale is the RMS of a partition, "
            "not of each parameter (not the local loop's or the paper's Adafactor); engine.zero_stage=0 keeps it "
            "whole" + ("; at ZeRO-3 with clipping and weight decay the tiny preset's loss was non-finite at step 1 "
                       "(S/14's was not; either one alone trained; cause not found: bench/results/train.json)"
                       if stage == 3 and cfg.optim.clip_grad > 0 and cfg.optim.weight_decay > 0 else ""))


def _paper_engine(zero_stage: int, grad_accum: int) -> EngineConfig:
    return EngineConfig(workers=8, use_gpu=True,                # one 8-GPU node (cluster/aws.yaml p5 / gcp a3)
                        precision=Precision.BF16,               # our choice: bf16 keeps float32 masters (README)
                        zero_stage=zero_stage,                  # engine_of: ZeRO-0 for Adafactor, else 2 (3 for g/14)
                        grad_accum=grad_accum,                  # derived: the preset's data.global_batch
                        checkpoint_every=2000)                  # our choice: a lost node costs under 2000 steps


def engine_of(preset_name: str, recipe: PretrainConfig | DistillConfig) -> EngineConfig:
    """The engine a preset runs on: the paper sizes (and their `_hr` stages) on one GPU node, accumulating
    micro-batches up to the recipe's global batch; the rest on CPU.

    Adafactor runs at ZeRO-0: DeepSpeed ZeRO 1-3 hand the optimiser flat 1-D partitions, so torch's Adafactor
    would keep unfactored moments and take its RMS over a partition, not the paper's optimiser
    (tests/test_grad_cache_zero.py); its factored state is small, so sharding it would save little
    (tipsv2.memory; every paper size fits an 80 GB GPU at ZeRO-0, pipelines.plan). AdamW keeps ZeRO-2, ZeRO-3
    for g/14."""
    size = preset_name.removesuffix("_hr")
    if size not in recipes.PAPER_SIZES:
        return EngineConfig()
    workers = _paper_engine(zero_stage=0, grad_accum=1).workers
    accum = accumulation_for(recipe.data.global_batch, per_worker=recipe.data.batch_size, workers=workers)
    if recipe.optim.optimizer == Optimizer.ADAFACTOR:
        return _paper_engine(zero_stage=0, grad_accum=accum)
    return _paper_engine(zero_stage=3 if size == "vit_g14" else 2, grad_accum=accum)


def job_config(recipe: PretrainConfig | DistillConfig, engine: EngineConfig = EngineConfig(),
                tracking: TrackingConfig = TrackingConfig()) -> JobConfig:
    """The job config of `recipe`: the same field values, plus `engine` and `tracking`."""
    root = PretrainJobConfig if isinstance(recipe, PretrainConfig) else DistillJobConfig
    values = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}
    return root(**values, engine=engine, tracking=tracking)


def _with_engine(name: str, recipe: PretrainConfig | DistillConfig) -> JobConfig:
    return job_config(recipe, engine_of(name, recipe))


PRESETS: dict[str, Callable[[], PretrainJobConfig]] = {
    name: (lambda name=name: _with_engine(name, recipes.PRESETS[name]())) for name in recipes.PRESETS}
DISTILL_PRESETS: dict[str, Callable[[], DistillJobConfig]] = {
    name: (lambda name=name: _with_engine(name, recipes.DISTILL_PRESETS[name]()))
    for name in recipes.DISTILL_PRESETS}


def preset(name: str) -> PretrainJobConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def distill_preset(name: str) -> DistillJobConfig:
    if name not in DISTILL_PRESETS:
        raise ValueError(f"unknown distill preset {name!r}; expected one of {sorted(DISTILL_PRESETS)}")
    return DISTILL_PRESETS[name]()

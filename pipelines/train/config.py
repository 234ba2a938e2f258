"""The trainer's root configs: the library's recipe (`tipsv2.configs`) plus how it runs (`engine`: Ray Train
workers, DeepSpeed ZeRO, precision, checkpoints) and where it is recorded (`tracking`: MLflow).

    cfg = preset("vit_b14")                 # PretrainJobConfig: every recipe field, plus engine and tracking
    tipsv2.loop.train_local(cfg, ...)       # a job config is a recipe, so the library's loops take it as is

Presets are the library's, each given an engine: the paper sizes one 8-GPU node in bf16, the CPU presets
one CPU worker in fp32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from pipelines.tracking import TrackingConfig
from tipsv2 import configs as recipes
from tipsv2.configs import DistillConfig, Precision, PretrainConfig


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


def _paper_engine(zero_stage: int) -> EngineConfig:
    return EngineConfig(workers=8, use_gpu=True,                # one 8-GPU node (cluster/aws.yaml p5 / gcp a3)
                        precision=Precision.BF16,               # our choice: bf16 keeps float32 masters (README)
                        zero_stage=zero_stage,                  # bench/results/train.json: ZeRO-3 only for g/14
                        checkpoint_every=2000)                  # our choice: a lost node costs under 2000 steps


def engine_of(preset_name: str) -> EngineConfig:
    """The engine a preset runs on: the paper sizes (and their `_hr` stages) on one GPU node, the rest on CPU."""
    size = preset_name.removesuffix("_hr")
    if size in recipes.PAPER_SIZES:
        return _paper_engine(zero_stage=3 if size == "vit_g14" else 2)
    return EngineConfig()


def job_config(recipe: PretrainConfig | DistillConfig, engine: EngineConfig = EngineConfig(),
                tracking: TrackingConfig = TrackingConfig()) -> JobConfig:
    """The job config of `recipe`: the same field values, plus `engine` and `tracking`."""
    root = PretrainJobConfig if isinstance(recipe, PretrainConfig) else DistillJobConfig
    values = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}
    return root(**values, engine=engine, tracking=tracking)


PRESETS: dict[str, Callable[[], PretrainJobConfig]] = {
    name: (lambda name=name: job_config(recipes.PRESETS[name](), engine_of(name))) for name in recipes.PRESETS}
DISTILL_PRESETS: dict[str, Callable[[], DistillJobConfig]] = {
    name: (lambda name=name: job_config(recipes.DISTILL_PRESETS[name](), engine_of(name)))
    for name in recipes.DISTILL_PRESETS}


def preset(name: str) -> PretrainJobConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def distill_preset(name: str) -> DistillJobConfig:
    if name not in DISTILL_PRESETS:
        raise ValueError(f"unknown distill preset {name!r}; expected one of {sorted(DISTILL_PRESETS)}")
    return DISTILL_PRESETS[name]()

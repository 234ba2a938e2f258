"""Root configs and named presets for pretraining and distillation.

A preset is a function returning the root config. Every component gets only its own slice
(`cfg.task.dino`, `cfg.data.crops`, ...). Run any preset locally on a CPU with

    python -m pipelines.pretrain --config tiny --local --output outputs/tiny      # about 30 s on 2 cores

Paper sizes (`vit_s14` ... `vit_g14`) follow the TIPSv2 recipe where the paper gives a number and
DINOv2's defaults where it does not; each has a `distill_*` twin.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Callable

from tipsv2.data.captions import CaptionSamplingConfig
from tipsv2.data.crops import CropConfig
from tipsv2.data.masking import MaskingConfig
from tipsv2.data.synthetic import SyntheticConfig
from tipsv2.losses.dino import Centering, DinoLossConfig
from tipsv2.losses.ibot import PatchLossConfig
from tipsv2.models.config import model_config
from tipsv2.models.heads import DinoHeadConfig
from tipsv2.optim import OptimConfig
from tipsv2.distill import DistillTaskConfig, TeacherHeads
from tipsv2.task import TaskConfig


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    crops: CropConfig = field(default_factory=CropConfig)
    captions: CaptionSamplingConfig = field(default_factory=CaptionSamplingConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    batch_size: int = 64                  # per worker
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # used when no image Parquet is given
    images: str | None = None             # URI of image Parquet (ingest output); None = synthetic scenes
    captions_uri: str | None = None       # URI of caption Parquet (caption output), joined by id
    tokenizer: str | None = None          # SentencePiece .model; None = train one on the captions
    tokenizer_vocab: int = 32000

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data batch_size must be >= 1, got {self.batch_size}")


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How the distributed trainer runs (read only by pipelines/: Ray Train + DeepSpeed)."""
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
class TrackingConfig:
    uri: str | None = None                # MLflow tracking URI; None = MLFLOW_TRACKING_URI or sqlite under the output
    experiment: str = "tipsv2"
    run_name: str | None = None


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    steps: int = 1000
    seed: int = 0
    log_every: int = 10                  # steps between metric logs

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.data.crops.local_crops != self.task.dino.local_crops:
            raise ValueError(f"data.crops.local_crops ({self.data.crops.local_crops}) must equal "
                             f"task.dino.local_crops ({self.task.dino.local_crops})")


def tiny() -> PretrainConfig:
    """CPU preset: the tiny model on 112 px synthetic scenes; 30 steps in about 5-10 s on 2 cores.

    Sinkhorn-Knopp centering (DINOv2's choice) instead of the EMA center: with batches of 8 the EMA
    center collapses the teacher to the uniform distribution within ~40 steps (measured); SK cannot.
    """
    head = DinoHeadConfig(prototypes=256, hidden=256, bottleneck=64)
    sk = Centering.SINKHORN_KNOPP
    return PretrainConfig(
        task=TaskConfig(model=model_config("tiny"), head=head,
                        dino=DinoLossConfig(local_crops=2, teacher_temp_warmup_steps=10, centering=sk),
                        patch=PatchLossConfig(teacher_temp_warmup_steps=10, centering=sk)),
        data=DataConfig(crops=CropConfig(global_size=112, local_size=56, local_crops=2), batch_size=8,
                        synthetic=SyntheticConfig(image_size=112, train_size=256, val_size=64, test_size=64),
                        tokenizer_vocab=256),
        optim=OptimConfig(lr=5e-4, warmup_steps=5, weight_decay=0.04, clip_grad=3.0),
        steps=30, log_every=5,
    )


def demo() -> PretrainConfig:
    """`make demo`: the tiny model trained longer on more synthetic scenes (a few minutes on 2 cores)."""
    cfg = tiny()
    return replace(cfg, steps=300, log_every=10,
                   data=replace(cfg.data, batch_size=16,
                                synthetic=replace(cfg.data.synthetic, train_size=1024, val_size=128, test_size=128)),
                   optim=replace(cfg.optim, lr=1e-3, warmup_steps=20),
                   task=replace(cfg.task, dino=replace(cfg.task.dino, teacher_temp_warmup_steps=100),
                                patch=replace(cfg.task.patch, teacher_temp_warmup_steps=100)))


def _paper(name: str, *, batch_size: int, layer_decay: float, zero_stage: int = 2) -> PretrainConfig:
    """The recipe at a paper size: 224 px global / 98 px local crops, 6 local crops, 32768 prototypes;
    on one 8-GPU training node in bf16 (`--set engine.workers=16` for two nodes; `batch_size` is per GPU)."""
    return PretrainConfig(task=TaskConfig(model=model_config(name)), data=DataConfig(batch_size=batch_size),
                          optim=OptimConfig(lr=5e-4, warmup_steps=10_000, weight_decay=0.05, layer_decay=layer_decay),
                          engine=EngineConfig(workers=8, use_gpu=True, precision=Precision.BF16,
                                              zero_stage=zero_stage, checkpoint_every=2000),
                          steps=500_000, log_every=50)


PRESETS: dict[str, Callable[[], PretrainConfig]] = {
    "tiny": tiny,
    "demo": demo,
    "vit_s14": lambda: _paper("vit_s14", batch_size=128, layer_decay=1.0),
    "vit_b14": lambda: _paper("vit_b14", batch_size=128, layer_decay=1.0),
    "vit_l14": lambda: _paper("vit_l14", batch_size=64, layer_decay=0.9),
    "vit_so400m14": lambda: _paper("vit_so400m14", batch_size=32, layer_decay=0.9),
    "vit_g14": lambda: _paper("vit_g14", batch_size=32, layer_decay=0.9, zero_stage=3),
}


def preset(name: str) -> PretrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Root config of `python -m pipelines.distill`: a frozen teacher teaches a random-init student."""
    task: DistillTaskConfig = field(default_factory=DistillTaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    teacher: str | None = None           # exported model dir, "hf:DIR" (transformers) or "VISION.npz[,TEXT.npz]"
    student_init: str | None = None      # None = random init (recommended); otherwise a model as `teacher` names one
    steps: int = 1000
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def _distill_from(pre: PretrainConfig, student: str) -> DistillConfig:
    task = pre.task
    return DistillConfig(
        task=DistillTaskConfig(student=model_config(student) if student != "tiny" else task.model, head=task.head,
                               contrastive=task.contrastive, dino=task.dino, patch=task.patch,
                               teacher_heads=TeacherHeads.REUSE),
        data=replace(pre.data, masking=replace(pre.data.masking, ratio=0.0)), optim=pre.optim, engine=pre.engine,
        tracking=pre.tracking, steps=pre.steps, seed=pre.seed, log_every=pre.log_every)


DISTILL_PRESETS: dict[str, Callable[[], DistillConfig]] = {
    "tiny": lambda: _distill_from(tiny(), "tiny"),
    "demo": lambda: _distill_from(demo(), "tiny"),
    **{name: (lambda name=name: _distill_from(PRESETS[name](), name))
       for name in ("vit_s14", "vit_b14", "vit_l14", "vit_so400m14", "vit_g14")},
}


def distill_preset(name: str) -> DistillConfig:
    if name not in DISTILL_PRESETS:
        raise ValueError(f"unknown distill preset {name!r}; expected one of {sorted(DISTILL_PRESETS)}")
    return DISTILL_PRESETS[name]()

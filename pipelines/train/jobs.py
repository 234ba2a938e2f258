"""What a training job is: pretraining or distillation, the plan a worker is handed, and the module it trains.

Used by the driver, every worker and the local loop alike, so that all of them build the same task from the
same seed.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any

import torch
from torch import nn

from pipelines import data
from pipelines.storage import local_copy
from tipsv2.checkpoint import ModelSource, load_source
from pipelines.train.config import JobConfig
from tipsv2.distill import DistillTask
from tipsv2.models.config import VisionConfig
from tipsv2.models.heads import DinoHead, DinoHeadConfig
from tipsv2.models.model import TIPSModel
from tipsv2.task import TIPSv2Task


class Job(str, enum.Enum):
    PRETRAIN = "pretrain"
    DISTILL = "distill"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Knobs:
    """Test-only fault injection; None = off."""
    fail_at_step: int | None = None    # the last rank calls os._exit(1) once at the start of this step
    nan_at_step: int | None = None     # the total loss of this step is multiplied by NaN

    @staticmethod
    def from_env() -> Knobs:
        def read(name: str) -> int | None:
            value = os.environ.get(name)
            return int(value) if value not in (None, "") else None
        return Knobs(fail_at_step=read("TIPSV2_FAIL_AT_STEP"), nan_at_step=read("TIPSV2_NAN_AT_STEP"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything a worker needs, built once by the driver (picklable)."""
    job: Job
    cfg: JobConfig
    output: str
    source: data.Source
    ids: list[str]
    texts_ref: Any                     # ObjectRef of data.read_texts(source)
    tokenizer: str                     # URI of the SentencePiece model
    run_id: str | None
    tracking_uri: str | None = None   # resolved by the driver, so rank 0 logs where the driver does
    resume_from: str | None = None    # URI of the checkpoint a rerun starts from (Ray Train's own comes first)
    knobs: Knobs = Knobs()
    cwd: str = dataclasses.field(default_factory=os.getcwd)   # the driver's: relative paths in cfg mean the same


def load_teacher(spec: str | None) -> tuple[TIPSModel, DinoHead | None, DinoHead | None]:
    """An exported model directory, "hf:DIR" (a transformers Tipsv2Model directory) or released
    `VISION.npz[,TEXT.npz]` checkpoints, local or s3://."""
    if not spec:
        raise ValueError("distillation needs a teacher: --set teacher=EXPORT_DIR, teacher=hf:DIR or "
                         "teacher=VISION.npz[,TEXT.npz]")
    return load_source(ModelSource.parse(spec), fetch=local_copy)


def build_task(job: Job, cfg: JobConfig, *, gather=None, reduce_mean=None, reduce_sum=None,
               rank: int = 0) -> nn.Module:
    """The module DeepSpeed wraps, seeded by cfg.seed so every rank (and the local loop) builds the same one."""
    collectives = {k: v for k, v in {"gather": gather, "reduce_mean": reduce_mean, "reduce_sum": reduce_sum}.items()
                   if v is not None}
    if job == Job.PRETRAIN:
        init = load_source(ModelSource.parse(cfg.init), fetch=local_copy) if cfg.init else None
        torch.manual_seed(cfg.seed)
        task = TIPSv2Task(cfg.task, rank=rank, **collectives)
        if init is not None:
            task.initialise_from(*init)
        return task
    # Loaded before seeding, as tipsv2.distill_loop.distill_local does: the student's init is the same.
    teacher, dino_head, patch_head = load_teacher(cfg.teacher)
    student = load_source(ModelSource.parse(cfg.student_init), fetch=local_copy)[0] if cfg.student_init else None
    torch.manual_seed(cfg.seed)
    return DistillTask(cfg.task, teacher=teacher, teacher_dino_head=dino_head, teacher_patch_head=patch_head,
                       student=student, rank=rank, **collectives)


def export_parts(task: nn.Module, cfg: JobConfig) -> tuple[TIPSModel, DinoHead, DinoHead, DinoHeadConfig]:
    """(model, DINO head, patch head, head config) to export: the EMA teacher heads when pretraining,
    the student's own heads when distilling."""
    if isinstance(task, TIPSv2Task):
        return task.model, task.teacher_dino_head, task.teacher_patch_head, cfg.task.head
    head = cfg.task.head
    prototypes = int(getattr(task.dino_head.prototypes, "ds_shape", task.dino_head.prototypes.shape)[0])
    return task.student, task.dino_head, task.patch_head, DinoHeadConfig(
        prototypes=prototypes, hidden=head.hidden, bottleneck=head.bottleneck, layers=head.layers)


def teacher_vision(task: nn.Module) -> VisionConfig | None:
    """The frozen teacher's vision config when distilling; None when the teacher is the student's size."""
    return task.teacher.cfg.vision if isinstance(task, DistillTask) else None


def ema_modules(task: nn.Module) -> list[nn.Module]:
    return [teacher for teacher, _ in task.ema_pairs()] if hasattr(task, "ema_pairs") else []


def ema_parameters(task: nn.Module) -> list[nn.Parameter]:
    """The EMA teacher's parameters, in its masters' order."""
    return [p for module in ema_modules(task) for p in module.parameters()]


def ema_masters(task: nn.Module) -> list[torch.Tensor] | None:
    """The EMA's float32 masters (16-bit training), aligned with ema_parameters(task)."""
    masters = getattr(task, "ema_masters", None)
    return None if masters is None else [m for group in masters for m in group]


def teacher_masters(task: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(teacher parameter, its float32 master) for every EMA parameter; none outside 16-bit training."""
    masters = ema_masters(task)
    return [] if masters is None else list(zip(ema_parameters(task), masters, strict=True))

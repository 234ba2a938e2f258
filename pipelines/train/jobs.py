"""What a training job is: pretraining or distillation, the plan a worker is handed, and the module it trains.

Everything that differs between the two jobs is asked of one `TrainJob` (`Job.PRETRAIN.train`,
`Job.DISTILL.train`): how its task is built, how the local loop runs it, what is exported, whether the
student sees masks and what the teacher is. The driver, every worker and the local loop alike build the
same task from the same seed through it.

Test-only fault injection is one hook object in the plan (`Faults`): the worker calls it at the start of
every step and on every step's losses; production runs carry `NoFaults`, whose calls do nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any, Callable, Protocol

import torch
from torch import nn

from pipelines import data, storage
from pipelines.storage import local_copy
from pipelines.train.config import DistillJobConfig, JobConfig, PretrainJobConfig
from tipsv2.checkpoint import ModelSource, load_source
from tipsv2.distill_loop import build_distill_task, distill_local
from tipsv2.loop import Steppable, build_pretrain_task, train_local
from tipsv2.models.config import VisionConfig
from tipsv2.models.heads import DinoHead, DinoHeadConfig
from tipsv2.models.model import TIPSModel
from tipsv2.tokenizer import Tokenizer

ExportParts = tuple[TIPSModel, DinoHead, DinoHead, DinoHeadConfig]   # (model, DINO head, patch head, head config)
OnStep = Callable[[int, dict[str, float]], None]


class TrainJob(Protocol):
    """What differs between pretraining and distillation."""
    masked: bool                       # the student sees masked global crops
    caches_contrastive: bool           # accumulation keeps the step's contrastive batch (pipelines.train.accumulate)

    def build_task(self, cfg: Any, *, rank: int = 0, **collectives) -> Steppable:
        """The module DeepSpeed wraps, seeded by cfg.seed; `collectives`: gather, reduce_mean, reduce_sum."""

    def train_local(self, cfg: Any, *, records, tokenizer: Tokenizer, on_step: OnStep) -> Steppable:
        """The library's own single-process loop on this job; returns the trained task."""

    def export_parts(self, task: Steppable, cfg: Any) -> ExportParts: ...

    def teacher_vision(self, task: Steppable) -> VisionConfig | None:
        """The frozen teacher's vision config when it is another model; None when the teacher is the student's."""


def load_model(spec: str) -> tuple[TIPSModel, DinoHead | None, DinoHead | None]:
    """An exported model directory, "hf:DIR" (a transformers Tipsv2Model directory) or released
    `VISION.npz[,TEXT.npz]` checkpoints, local or s3://."""
    return load_source(ModelSource.parse(spec), fetch=local_copy)


def load_teacher(spec: str | None) -> tuple[TIPSModel, DinoHead | None, DinoHead | None]:
    if not spec:
        raise ValueError("distillation needs a teacher: --set teacher=EXPORT_DIR, teacher=hf:DIR or "
                         "teacher=VISION.npz[,TEXT.npz]")
    return load_model(spec)


class PretrainJob:
    """TIPSv2 pretraining: the EMA teacher's heads are exported with the model."""
    masked = True
    caches_contrastive = True

    def build_task(self, cfg: PretrainJobConfig, *, rank: int = 0, **collectives) -> Steppable:
        return build_pretrain_task(cfg, init=load_model(cfg.init) if cfg.init else None, rank=rank, **collectives)

    def train_local(self, cfg: PretrainJobConfig, *, records, tokenizer: Tokenizer, on_step: OnStep) -> Steppable:
        init = load_model(cfg.init) if cfg.init else None
        return train_local(cfg, records=records, tokenizer=tokenizer, on_step=on_step, init=init).task

    def export_parts(self, task: Steppable, cfg: PretrainJobConfig) -> ExportParts:
        return task.model, task.teacher_dino_head, task.teacher_patch_head, cfg.task.head

    def teacher_vision(self, task: Steppable) -> VisionConfig | None:
        return None


class DistillJob:
    """Distillation: a frozen teacher, a student that sees every patch; the student's own heads are exported."""
    masked = False
    caches_contrastive = False         # its student's clean pass has drop path: a cached pass would need a replay

    def _models(self, cfg: DistillJobConfig):
        """(teacher, its heads, student init), loaded before seeding so every path builds the same student."""
        teacher, dino_head, patch_head = load_teacher(cfg.teacher)
        student = load_model(cfg.student_init)[0] if cfg.student_init else None
        return teacher, (dino_head, patch_head), student

    def build_task(self, cfg: DistillJobConfig, *, rank: int = 0, **collectives) -> Steppable:
        teacher, heads, student = self._models(cfg)
        return build_distill_task(cfg, teacher=teacher, teacher_heads=heads, student=student, rank=rank,
                                  **collectives)

    def train_local(self, cfg: DistillJobConfig, *, records, tokenizer: Tokenizer, on_step: OnStep) -> Steppable:
        teacher, heads, student = self._models(cfg)
        return distill_local(cfg, teacher=teacher, teacher_heads=heads, student=student, records=records,
                             tokenizer=tokenizer, on_step=on_step).task

    def export_parts(self, task: Steppable, cfg: DistillJobConfig) -> ExportParts:
        head = cfg.task.head
        prototypes = int(getattr(task.dino_head.prototypes, "ds_shape", task.dino_head.prototypes.shape)[0])
        return task.student, task.dino_head, task.patch_head, DinoHeadConfig(
            prototypes=prototypes, hidden=head.hidden, bottleneck=head.bottleneck, layers=head.layers)

    def teacher_vision(self, task: Steppable) -> VisionConfig | None:
        return task.teacher.cfg.vision


class Job(str, enum.Enum):
    PRETRAIN = "pretrain"
    DISTILL = "distill"

    @property
    def train(self) -> TrainJob:
        return TRAIN_JOBS[self]


TRAIN_JOBS: dict[Job, TrainJob] = {Job.PRETRAIN: PretrainJob(), Job.DISTILL: DistillJob()}


# -- test-only fault injection -----------------------------------------------------------------------
class Faults(Protocol):
    """The hook a test passes in (`run(..., faults=...)`); the worker calls it at two points of every step."""

    def before_step(self, step: int, *, rank: int, world: int, output: str) -> None: ...

    def on_losses(self, step: int, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


class NoFaults:
    """Production: nothing injected."""

    def before_step(self, step: int, *, rank: int, world: int, output: str) -> None:
        pass

    def on_losses(self, step: int, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return losses


@dataclasses.dataclass(frozen=True, kw_only=True)
class InjectedFaults:
    """Test-only fault injection; None = off. From the driver's environment by `from_env` (TIPSV2_FAIL_AT_STEP,
    TIPSV2_NAN_AT_STEP), so a test can reach a job submitted through `ray job submit`."""
    fail_at_step: int | None = None    # the last rank calls os._exit(1) once at the start of this step
    nan_at_step: int | None = None     # the total loss of this step is multiplied by NaN

    @staticmethod
    def from_env() -> Faults:
        def read(name: str) -> int | None:
            value = os.environ.get(name)
            return int(value) if value not in (None, "") else None
        faults = InjectedFaults(fail_at_step=read("TIPSV2_FAIL_AT_STEP"), nan_at_step=read("TIPSV2_NAN_AT_STEP"))
        return NoFaults() if faults == InjectedFaults() else faults

    def before_step(self, step: int, *, rank: int, world: int, output: str) -> None:
        if self.fail_at_step != step or rank != world - 1:
            return
        marker = storage.join(output, f"_failed_once_at_{step}")
        if storage.exists(marker):
            return
        storage.write_bytes(marker, b"")
        os._exit(1)

    def on_losses(self, step: int, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.nan_at_step != step:
            return losses
        return losses | {"loss/total": losses["loss/total"] * float("nan")}


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
    faults: Faults = NoFaults()
    cwd: str = dataclasses.field(default_factory=os.getcwd)   # the driver's: relative paths in cfg mean the same


# -- the EMA teacher's tensors (empty when distilling: its teacher is frozen) --------------------------
def ema_parameters(task: Steppable) -> list[nn.Parameter]:
    """The EMA teacher's parameters, in its masters' order."""
    return [p for teacher, _ in task.ema_pairs() for p in teacher.parameters()]


def ema_masters(task: Steppable) -> list[torch.Tensor] | None:
    """The EMA's float32 masters (16-bit training), aligned with ema_parameters(task)."""
    return None if task.ema_masters is None else [m for group in task.ema_masters for m in group]


def teacher_masters(task: Steppable) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(teacher parameter, its float32 master) for every EMA parameter; none outside 16-bit training."""
    masters = ema_masters(task)
    return [] if masters is None else list(zip(ema_parameters(task), masters, strict=True))

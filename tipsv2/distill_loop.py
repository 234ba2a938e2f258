"""The single-process distillation loop: `tipsv2.loop.train_local`'s twin for DistillTask.

A frozen teacher (ours, or released weights) teaches a randomly initialised student on unmasked
batches; the optimiser, learning-rate schedule, gradient clipping and batch stream are those of the
pretraining loop, so the two differ only in the task they step.

    from tipsv2.configs import distill_preset
    from tipsv2.checkpoint import load_export
    teacher, dino_head, patch_head = load_export("outputs/tiny/export")
    result = distill_local(distill_preset("tiny"), teacher=teacher, teacher_heads=(dino_head, patch_head),
                           records=records, tokenizer=tokenizer)           # about as fast as train_local
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from tipsv2.configs import DistillConfig
from tipsv2.distill import DistillTask
from tipsv2.loop import LocalResult, Record, endless, fit
from tipsv2.models.heads import DinoHead
from tipsv2.models.model import TIPSModel
from tipsv2.optim import TowerDepths
from tipsv2.tokenizer import Tokenizer

TeacherHeads = tuple[DinoHead, DinoHead] | None   # (DINO head, patch head); None for released encoders


def build_distill_task(cfg: DistillConfig, *, teacher: TIPSModel, teacher_heads: TeacherHeads,
                       student: TIPSModel | None = None, **collectives) -> DistillTask:
    """Seeded by cfg.seed, so every rank (and the local loop) builds the same student."""
    dino_head, patch_head = teacher_heads if teacher_heads is not None else (None, None)
    torch.manual_seed(cfg.seed)
    return DistillTask(cfg.task, teacher=teacher, teacher_dino_head=dino_head, teacher_patch_head=patch_head,
                       student=student, **collectives)


def distill_local(cfg: DistillConfig, *, teacher: TIPSModel, teacher_heads: TeacherHeads,
                  records: Sequence[Record], tokenizer: Tokenizer, student: TIPSModel | None = None,
                  on_step: Callable[[int, dict[str, float]], None] | None = None) -> LocalResult:
    """Distil for `cfg.steps` steps in this process; deterministic for a given cfg.seed.

    The teacher (and its heads) are copied frozen into the task: the objects passed in are never
    modified. `student` starts the student from a model (`student_init`); None = random init.
    `result.task` is the DistillTask; the student is `result.task.student`.
    """
    task = build_distill_task(cfg, teacher=teacher, teacher_heads=teacher_heads, student=student)
    vision = cfg.task.student.vision
    stream = endless(records, data=cfg.data, seed=cfg.seed, patch_size=vision.patch_size, tokenizer=tokenizer,
                     masked=False)
    return fit(task, stream=stream, optim=cfg.optim, steps=cfg.steps, depths=TowerDepths.of(cfg.task.student),
               on_step=on_step)

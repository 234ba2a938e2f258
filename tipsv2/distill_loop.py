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

import time
from typing import Callable, Sequence

import torch

from tipsv2.configs import DistillConfig, PretrainConfig
from tipsv2.distill import DistillTask
from tipsv2.loop import LocalResult, Record, check_finite, endless, scalars
from tipsv2.models.heads import DinoHead
from tipsv2.models.model import TIPSModel
from tipsv2.optim import build_optimizer, learning_rate, param_groups, set_learning_rate
from tipsv2.task import TaskConfig
from tipsv2.tokenizer import Tokenizer

TeacherHeads = tuple[DinoHead, DinoHead] | None   # (DINO head, patch head); None for released encoders


def stream_config(cfg: DistillConfig) -> PretrainConfig:
    """The slice of a PretrainConfig that `tipsv2.loop.endless` reads (data, seed, the student's patch size)."""
    task = TaskConfig(model=cfg.task.student, head=cfg.task.head, dino=cfg.task.dino, patch=cfg.task.patch)
    return PretrainConfig(task=task, data=cfg.data, seed=cfg.seed, steps=cfg.steps)


def build_distill_task(cfg: DistillConfig, *, teacher: TIPSModel, teacher_heads: TeacherHeads) -> DistillTask:
    dino_head, patch_head = teacher_heads if teacher_heads is not None else (None, None)
    return DistillTask(cfg.task, teacher=teacher, teacher_dino_head=dino_head, teacher_patch_head=patch_head)


def distill_local(cfg: DistillConfig, *, teacher: TIPSModel, teacher_heads: TeacherHeads,
                  records: Sequence[Record], tokenizer: Tokenizer,
                  on_step: Callable[[int, dict[str, float]], None] | None = None) -> LocalResult:
    """Distil for `cfg.steps` steps in this process; deterministic for a given cfg.seed.

    The teacher (and its heads) are copied frozen into the task: the objects passed in are never
    modified. `result.task` is the DistillTask; the student is `result.task.student`.
    """
    torch.manual_seed(cfg.seed)
    task = build_distill_task(cfg, teacher=teacher, teacher_heads=teacher_heads)
    groups = param_groups(task.trainable_parameters(), cfg.optim, depth=cfg.task.student.vision.depth)
    optimizer = build_optimizer(groups, cfg.optim)
    params = [p for g in groups for p in g["params"]]
    result = LocalResult(task=task)
    start = time.perf_counter()
    stream = endless(records, cfg=stream_config(cfg), tokenizer=tokenizer, masked=False)
    for step in range(cfg.steps):
        epoch, batch = next(stream)
        lr = learning_rate(step, total_steps=cfg.steps, cfg=cfg.optim)
        set_learning_rate(optimizer, lr)
        losses = task(batch, step)
        check_finite(losses, step)
        optimizer.zero_grad(set_to_none=True)
        losses["loss/total"].backward()
        if cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        optimizer.step()
        row = scalars(losses) | {"lr": lr, "epoch": epoch, "step": step}
        result.history.append(row)
        if on_step is not None:
            on_step(step, row)
    result.seconds = time.perf_counter() - start
    return result

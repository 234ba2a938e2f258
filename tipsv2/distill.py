"""Distillation: a frozen teacher TIPSModel teaches a randomly initialised student at patch level.

The student sees the clean global crop (no masking) and must match the teacher's patch distributions at
the same grid positions (the teacher's grid is interpolated when its input resolution differs), plus
DINO on CLS (global and local crops against the teacher's global CLS) and the student's own
contrastive terms. The teacher's heads are reused frozen by default; released encoders ship without
heads, so for them TeacherHeads.RANDOM builds fixed random heads (a documented stand-in: a frozen
random projection onto K prototypes). Initialising the student from pretrained weights must be
asked for explicitly and warns: the paper finds it removes the gain of distillation.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tipsv2.data.batch import Batch
from tipsv2.losses.contrastive import ContrastiveKind, ContrastiveLossConfig, dual_contrastive, identity
from tipsv2.losses.dino import (DinoLossConfig, center_norm, dino_loss, follow_center, teacher_entropy, teacher_probs,
                                teacher_temperature)
from tipsv2.losses.ibot import PatchLossConfig, PatchLossKind, patch_loss
from tipsv2.models.config import ModelConfig
from tipsv2.models.heads import DinoHead, DinoHeadConfig
from tipsv2.models.model import TIPSModel
from tipsv2.task import Gather, Reduce, frozen_copy, pick_cls


class TeacherHeads(str, enum.Enum):
    REUSE = "reuse"    # the teacher's own (EMA) heads, frozen
    RANDOM = "random"  # fixed random heads: for released encoders, which ship without heads


class StudentText(str, enum.Enum):
    """Where the student's text tower starts (the TIPSv2 paper's Table 2 ablation, as reported in readings of
    it: training or freezing the student's text tower makes little difference; unverified against the paper)."""
    RANDOM = "random"                  # random init and trained, like the student's image tower (default)
    FROM_TEACHER = "from_teacher"      # the teacher's text tower as the start, trained
    FROZEN_TEACHER = "frozen_teacher"  # the teacher's text tower, frozen: only the image side learns the texts


@dataclass(frozen=True, kw_only=True)
class DistillTaskConfig:
    student: ModelConfig = field(default_factory=ModelConfig)
    head: DinoHeadConfig = field(default_factory=DinoHeadConfig)
    teacher_heads: TeacherHeads = TeacherHeads.REUSE
    teacher_image_size: int | None = None   # px the teacher sees; None = the student's global crop size
    contrastive: ContrastiveLossConfig = field(default_factory=ContrastiveLossConfig)
    dino: DinoLossConfig = field(default_factory=DinoLossConfig)
    patch: PatchLossConfig = field(default_factory=PatchLossConfig)
    student_text: StudentText = StudentText.RANDOM


class DistillTask(nn.Module):
    def __init__(self, cfg: DistillTaskConfig, *, teacher: TIPSModel, teacher_dino_head: DinoHead | None = None,
                 teacher_patch_head: DinoHead | None = None, student: TIPSModel | None = None,
                 gather: Gather = identity, reduce_mean: Reduce = identity, reduce_sum: Reduce = identity,
                 rank: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.gather, self.reduce_mean, self.reduce_sum, self.rank = gather, reduce_mean, reduce_sum, rank
        self.teacher = frozen_copy(teacher).eval()
        t_width = teacher.width
        if cfg.teacher_heads == TeacherHeads.REUSE:
            if teacher_dino_head is None or teacher_patch_head is None:
                raise ValueError("teacher_heads='reuse' needs the teacher's DINO and patch heads; released "
                                 "checkpoints have none: use teacher_heads='random'")
            self.teacher_dino_head = frozen_copy(teacher_dino_head)
            self.teacher_patch_head = frozen_copy(teacher_patch_head)
        else:
            self.teacher_dino_head = frozen_copy(DinoHead(t_width, cfg.head))
            self.teacher_patch_head = frozen_copy(DinoHead(t_width, cfg.head))
        prototypes = self.teacher_dino_head.prototypes.shape[0]
        if student is None:
            self.student = TIPSModel(cfg.student)
        else:
            warnings.warn("distillation student initialised from pretrained weights: the TIPSv2 paper finds a "
                          "randomly initialised student distils better (its patch-text alignment exceeds the "
                          "teacher's); pass student=None for the recommended setting", stacklevel=2)
            self.student = student
        self._start_text_tower(cfg.student_text, teacher)
        s_head = DinoHeadConfig(prototypes=prototypes, hidden=cfg.head.hidden, bottleneck=cfg.head.bottleneck,
                                layers=cfg.head.layers)
        self.dino_head = DinoHead(self.student.width, s_head)
        self.patch_head = DinoHead(self.student.width, s_head)
        if cfg.contrastive.kind == ContrastiveKind.SIGMOID:
            self.sigmoid_bias = nn.Parameter(torch.tensor(cfg.contrastive.sigmoid_bias_init))
        self.register_buffer("dino_center", torch.zeros(prototypes))
        self.register_buffer("patch_center", torch.zeros(prototypes))

    @torch.no_grad()
    def _start_text_tower(self, start: StudentText, teacher: TIPSModel) -> None:
        """The student's text tower from the teacher's (StudentText): same shapes required; frozen if asked."""
        if start == StudentText.RANDOM:
            return
        if teacher.cfg.text != self.student.cfg.text:
            raise ValueError(f"student_text={start.value} copies the teacher's text tower, which needs the same text "
                             f"config: teacher {teacher.cfg.text}, student {self.student.cfg.text}")
        self.student.text.load_state_dict(teacher.text.state_dict())
        if start == StudentText.FROZEN_TEACHER:
            self.student.text.requires_grad_(False)

    @torch.no_grad()
    def teacher_output(self, *, batch: Batch, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        images = batch.global_crop
        size = self.cfg.teacher_image_size
        if size is not None and size != images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        feats = self.teacher.encode_image(images, stochastic_depth=False)   # deterministic targets
        grid_t = images.shape[-1] // self.teacher.patch_size
        grid_s = batch.global_crop.shape[-1] // self.student.patch_size
        patches = feats.patches
        if grid_t != grid_s:  # teacher tokens resampled to the student's grid positions
            b, _, d = patches.shape
            patches = patches.transpose(1, 2).reshape(b, d, grid_t, grid_t)
            patches = F.interpolate(patches, size=(grid_s, grid_s), mode="bilinear", align_corners=False)
            patches = patches.flatten(2).transpose(1, 2)
        dino_logits = self.teacher_dino_head(pick_cls(feats, self.cfg.dino.cls))
        patch_logits = self.teacher_patch_head(patches)
        dino_probs = teacher_probs(dino_logits, self.dino_center, teacher_temperature(step, self.cfg.dino),
                                   self.cfg.dino.centering, self.reduce_sum)
        patch_probs = teacher_probs(patch_logits, self.patch_center, teacher_temperature(step, self.cfg.patch),
                                    self.cfg.patch.centering, self.reduce_sum)
        return dino_logits, dino_probs, patch_logits, patch_probs

    def forward(self, batch: Batch, step: int) -> dict[str, Tensor]:
        cfg = self.cfg
        dino_logits, dino_probs, patch_logits, patch_probs = self.teacher_output(batch=batch, step=step)
        student = self.student.encode_image(batch.global_crop)            # clean: no masking
        b, m = batch.local_crops.shape[:2]
        views = [self.dino_head(pick_cls(student, cfg.dino.cls))[None]]  # (1, B, K)
        if m:
            local = self.student.encode_image(batch.local_crops.flatten(0, 1))
            views.append(self.dino_head(pick_cls(local, cfg.dino.cls)).reshape(b, m, -1).transpose(0, 1))
        losses = dual_contrastive(cls1=student.cls1, alt_text=self.student.encode_text(batch.alt_ids, batch.alt_paddings),
                                  cls2=student.cls2, synthetic_text=self.student.encode_text(batch.syn_ids, batch.syn_paddings),
                                  cfg=cfg.contrastive, temperature=self.student.temperature,
                                  bias=getattr(self, "sigmoid_bias", None), gather=self.gather, rank=self.rank)
        # DINO on CLS: every student view against the teacher's global crop.
        losses["loss/dino"] = dino_loss(torch.cat(views), dino_probs, cfg.dino.student_temp)
        # Patch loss without masking: every student token against the teacher at the same grid position.
        losses["loss/patch"] = patch_loss(self.patch_head(student.patches), patch_probs, None,
                                          kind=PatchLossKind.IBOT_PLUS_PLUS, student_temp=cfg.patch.student_temp)
        losses["loss/total"] = (cfg.contrastive.weight * losses["loss/contrastive"] + cfg.dino.weight * losses["loss/dino"]
                                + cfg.patch.weight * losses["loss/patch"])
        with torch.no_grad():
            losses |= {"metric/temperature": self.student.temperature.detach(),
                       "metric/teacher_entropy": teacher_entropy(dino_probs),
                       "metric/teacher_patch_entropy": teacher_entropy(patch_probs),
                       "metric/center_norm": center_norm(self.dino_center)}
            follow_center(self.dino_center, dino_logits, cfg.dino, self.reduce_mean)
            follow_center(self.patch_center, patch_logits, cfg.patch, self.reduce_mean)
        return losses

    # The teacher is frozen: no EMA, so the EMA interface TIPSv2Task has is empty here.
    ema_masters: list[list[Tensor]] | None = None

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return []

    def keep_ema_masters(self, gathered: object = None) -> None:
        """Nothing to keep: no parameter of this task follows an EMA."""

    def update_teacher(self, **_: object) -> float:
        """The teacher is frozen: nothing to update (same interface as TIPSv2Task)."""
        return 1.0

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

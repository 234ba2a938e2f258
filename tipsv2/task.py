"""TIPSv2Task: student + heads + teacher (head-only or full EMA) + losses -> a named loss dict.

This module is what a distributed engine wraps (DeepSpeed sees one nn.Module). It holds no collective
and no engine state: cross-rank gathers and reductions are injected at construction (identity on one
process), and parameter gathering for the EMA under ZeRO-3 is injected into `update_teacher`.

One step, in phases:
    student = task.student_output(batch=batch)
    teacher = task.teacher_output(batch=batch, step=step, clean=student.clean)   # no gradient
    losses  = task.compute_losses(teacher=teacher, student=student, batch=batch, step=step)
    (optimiser step on losses["loss/total"])
    task.update_teacher(step=step, total_steps=total)             # EMA, after the optimiser step
`forward(batch, step)` runs the first three and updates the centers.

Passes of the image encoder per step, by default (head-only EMA, contrastive on the clean crop, as in
the official TIPS/TIPSv2 block diagrams, `google-deepmind/tips` docs/images/tipsv2_block.png): two on
the global crop, one with gradient on the clean crop (contrastive loss; its detached features through
the EMA heads are the teacher targets, since the teacher encoder *is* the student's) and one on the
masked crop (iBOT++), plus one on the local crops (DINO). Full EMA adds the EMA encoder's pass. The
clean pass runs without drop path: teacher targets never depend on it (DINOv2's teacher has none).

Accumulation keeps the contrastive batch of the whole optimiser step (feature caching: GradCache, Gao et al.
2021; open_clip's `--accum-freq`). For an optimiser step of k micro-batches:
    embedded = [task(batch_i, step, embed=True) for each i]                # no graph: (B, D) embeddings
    cached   = cache_contrastive(embedded, cfg=..., gather=..., rank=...) # the loss over all k*B (x ranks) pairs,
                                                                          # its gradient w.r.t. each embedding
    task(batch_i, step, cached.part(i))   # each micro-batch re-run with graph: its slice of that gradient,
                                          # plus its own DINO, iBOT++ and KoLeo terms
The gradients equal those of one step on the k micro-batches together, wherever the other terms are
per-example (they stay per micro-batch: centering, Sinkhorn-Knopp and KoLeo see the micro-batch).
"""

from __future__ import annotations

import contextlib
import copy
import enum
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable

import torch
from torch import Tensor, nn

from tipsv2.data.batch import Batch
from tipsv2.losses.contrastive import ContrastiveKind, ContrastiveLossConfig, dual_contrastive, identity
from tipsv2.losses.dino import (ClsToken, DinoLossConfig, center_norm, dino_loss, follow_center, teacher_entropy,
                                teacher_probs, teacher_temperature)
from tipsv2.losses.ibot import PatchLossConfig, PatchLossKind, patch_loss
from tipsv2.losses.koleo import KoLeoConfig, koleo_loss
from tipsv2.models.config import ModelConfig
from tipsv2.models.heads import DinoHead, DinoHeadConfig
from tipsv2.models.model import TIPSModel
from tipsv2.models.vision import ImageFeatures

Gather = Callable[[Tensor], Tensor]
Reduce = Callable[[Tensor], Tensor]
Gathered = Callable[[list[nn.Parameter]], ContextManager]


class TeacherMode(str, enum.Enum):
    HEAD_ONLY_EMA = "head_only_ema"  # TIPSv2: teacher encoder = student encoder without gradient; EMA heads
    FULL_EMA = "full_ema"            # TIPS / DINO: EMA copies of encoder and heads


class MomentumSchedule(str, enum.Enum):
    CONSTANT = "constant"
    COSINE = "cosine"                # from `momentum` at step 0 to `momentum_final` at the last step


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    mode: TeacherMode = TeacherMode.HEAD_ONLY_EMA
    momentum: float = 0.994          # EMA momentum at step 0 (DINOv2)
    momentum_final: float = 1.0
    schedule: MomentumSchedule = MomentumSchedule.COSINE

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum <= self.momentum_final <= 1.0:
            raise ValueError(f"teacher momentum must satisfy 0 <= momentum <= momentum_final <= 1, got "
                             f"{self.momentum} and {self.momentum_final}")


class ContrastiveView(str, enum.Enum):
    CLEAN = "clean"    # the clean global crop, as in the official block diagrams (default)
    MASKED = "masked"  # CLS tokens of the masked global crop (ablation: no clean pass with gradient)


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: DinoHeadConfig = field(default_factory=DinoHeadConfig)
    contrastive: ContrastiveLossConfig = field(default_factory=ContrastiveLossConfig)
    contrastive_view: ContrastiveView = ContrastiveView.CLEAN
    dino: DinoLossConfig = field(default_factory=DinoLossConfig)
    patch: PatchLossConfig = field(default_factory=PatchLossConfig)
    koleo: KoLeoConfig = field(default_factory=KoLeoConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class TeacherOut:
    dino_logits: Tensor    # (B, K) on the clean global crop's CLS
    dino_probs: Tensor     # (B, K) centred and sharpened
    patch_logits: Tensor   # (B, N, K)
    patch_probs: Tensor    # (B, N, K)


@dataclass
class StudentOut:
    cls1: Tensor           # (B, D) for CLS1 <-> alt-text
    cls2: Tensor           # (B, D) for CLS2 <-> synthetic caption
    alt_text: Tensor       # (B, D)
    synthetic_text: Tensor  # (B, D)
    local_logits: Tensor   # (M, B, K) DINO head on the local crops' CLS
    patch_logits: Tensor   # (B, N, K) patch head on the masked global crop
    clean: ImageFeatures | None = None  # the clean global crop's features, with gradient (ContrastiveView.CLEAN)


EMBEDDINGS = ("cls1", "cls2", "alt_text", "synthetic_text")   # what the contrastive loss sees, each (B, D)
SCALARS = ("temperature", "bias")                              # its learned scalars (bias: SIGMOID only)


@dataclass
class ContrastivePart:
    """One micro-batch's share of a step's cached contrastive loss (`CachedContrastive.part`)."""
    losses: dict[str, Tensor]      # loss/clip_alt, loss/clip_syn, loss/contrastive of the whole step, detached
    grads: dict[str, Tensor]       # d(weight * loss/contrastive) / d(this micro-batch's embeddings), (B, D) each
    scalar_grads: dict[str, Tensor]  # d(weight * loss/contrastive) / d(temperature, bias), 0-dim each
    parts: int                     # micro-batches in the step
    weight: float                  # of loss/contrastive in the total

    def term(self, embeddings: dict[str, Tensor], scalars: dict[str, Tensor | None]) -> Tensor:
        """The contrastive term of this micro-batch's total. Its value is the step's weighted loss; its gradient
        is `parts` x this slice's share: the engine divides each micro-batch's loss by `parts` (DeepSpeed's
        gradient_accumulation_steps), so the k micro-batches add up to the gradient of the step's loss. The
        scalars' gradient is split evenly over the micro-batches."""
        share = sum((self.grads[k].to(embeddings[k].dtype) * embeddings[k]).sum() for k in EMBEDDINGS)
        share = share + sum(self.scalar_grads[k] * scalars[k] / self.parts for k in self.scalar_grads)
        value = self.weight * self.losses["loss/contrastive"]
        return self.parts * (share - share.detach()) + value


@dataclass
class CachedContrastive:
    """A step's contrastive loss over every micro-batch and rank, from embeddings cached without graph, and its
    gradient w.r.t. each of them and the learned scalars."""
    losses: dict[str, Tensor]
    grads: list[dict[str, Tensor]]   # one per micro-batch, in order
    scalar_grads: dict[str, Tensor]
    weight: float

    def part(self, i: int) -> ContrastivePart:
        return ContrastivePart(losses=self.losses, grads=self.grads[i], scalar_grads=self.scalar_grads,
                               parts=len(self.grads), weight=self.weight)


def cache_contrastive(embedded: list[dict[str, Tensor]], *, cfg: ContrastiveLossConfig, gather: Gather = identity,
                      rank: int = 0) -> CachedContrastive:
    """The dual contrastive loss over the concatenated micro-batches of one step (each `embedded[i]`: the
    EMBEDDINGS of micro-batch i and the SCALARS, as `TIPSv2Task.embed` returns them), and its gradient w.r.t.
    every embedding and scalar. `gather` spans the ranks as in the unaccumulated loss: every rank calls this
    at the same point (the gather's backward is a collective)."""
    sizes = [e["cls1"].shape[0] for e in embedded]
    leaves = {k: torch.cat([e[k] for e in embedded]).detach().requires_grad_() for k in EMBEDDINGS}
    scalars = {k: embedded[0][k].detach().clone().requires_grad_() for k in SCALARS
               if embedded[0].get(k) is not None}
    with torch.enable_grad():
        losses = dual_contrastive(**leaves, cfg=cfg, temperature=scalars["temperature"], bias=scalars.get("bias"),
                                  gather=gather, rank=rank)
        grads = torch.autograd.grad(cfg.weight * losses["loss/contrastive"], [*leaves.values(), *scalars.values()])
    by_name = dict(zip([*leaves, *scalars], grads))
    split = {k: by_name[k].split(sizes) for k in EMBEDDINGS}
    return CachedContrastive(losses={k: v.detach() for k, v in losses.items()},
                             grads=[{k: split[k][i] for k in EMBEDDINGS} for i in range(len(sizes))],
                             scalar_grads={k: by_name[k] for k in scalars}, weight=cfg.weight)


def ema_momentum(step: int, total_steps: int, cfg: TeacherConfig) -> float:
    if cfg.schedule == MomentumSchedule.CONSTANT or total_steps <= 1:
        return cfg.momentum
    progress = min(max(step / (total_steps - 1), 0.0), 1.0)
    return cfg.momentum_final - (cfg.momentum_final - cfg.momentum) * (1 + math.cos(math.pi * progress)) / 2


@torch.no_grad()
def ema_update(teacher: Iterable[nn.Parameter], student: Iterable[nn.Parameter], momentum: float,
               masters: Iterable[Tensor] | None = None) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter.

    `masters`: float32 copies of the teacher (16-bit training). The average then runs on them and the
    teacher receives their rounded values. In place in bf16 it would not: (1 - momentum) * (student -
    teacher) is mostly below a bf16 teacher's resolution (8 bits), so most of each update is rounded away.
    """
    if masters is None:
        for t, s in zip(teacher, student, strict=True):
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
        return
    for t, s, m in zip(teacher, student, masters, strict=True):
        m.mul_(momentum).add_(s.detach().to(m.dtype), alpha=1.0 - momentum)
        t.copy_(m)


def frozen_copy(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def pick_cls(feats: ImageFeatures, which: ClsToken) -> Tensor:
    return feats.cls1 if which == ClsToken.CLS1 else feats.cls2


class TIPSv2Task(nn.Module):
    def __init__(self, cfg: TaskConfig, *, gather: Gather = identity, reduce_mean: Reduce = identity,
                 reduce_sum: Reduce = identity, rank: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.gather, self.reduce_mean, self.reduce_sum, self.rank = gather, reduce_mean, reduce_sum, rank
        self.model = TIPSModel(cfg.model)
        width = cfg.model.vision.width
        self.dino_head = DinoHead(width, cfg.head)
        self.patch_head = self.dino_head if cfg.patch.share_head else DinoHead(width, cfg.head)
        if cfg.contrastive.kind == ContrastiveKind.SIGMOID:
            self.sigmoid_bias = nn.Parameter(torch.tensor(cfg.contrastive.sigmoid_bias_init))
        # Teacher state: never in the optimiser (requires_grad False), updated by EMA.
        self.teacher_dino_head = frozen_copy(self.dino_head)
        self.teacher_patch_head = self.teacher_dino_head if cfg.patch.share_head else frozen_copy(self.patch_head)
        # Full EMA copies the image encoder only: the teacher never sees text.
        self.teacher_vision = frozen_copy(self.model.vision) if cfg.teacher.mode == TeacherMode.FULL_EMA else None
        self.register_buffer("dino_center", torch.zeros(cfg.head.prototypes))
        self.register_buffer("patch_center", torch.zeros(cfg.head.prototypes))
        # Float32 copies of the EMA teacher, one list per ema_pairs() entry, once keep_ema_masters() ran.
        self.ema_masters: list[list[Tensor]] | None = None

    # -- phases ------------------------------------------------------------------------------------
    def teacher_encoder(self) -> nn.Module:
        """The EMA image encoder (full EMA) or the student's own (head-only EMA, run without gradient)."""
        return self.teacher_vision if self.teacher_vision is not None else self.model.vision

    @torch.no_grad()
    def teacher_features(self, batch: Batch, clean: ImageFeatures | None) -> ImageFeatures:
        """The teacher encoder on the clean global crop, without drop path. Under head-only EMA the
        student's own clean pass (`clean`, computed without drop path) is that same computation: reuse it."""
        if clean is not None and self.teacher_vision is None:
            return ImageFeatures(cls1=clean.cls1.detach(), cls2=clean.cls2.detach(), patches=clean.patches.detach())
        return self.teacher_encoder()(batch.global_crop, stochastic_depth=False)

    @torch.no_grad()
    def teacher_output(self, *, batch: Batch, step: int, clean: ImageFeatures | None = None) -> TeacherOut:
        feats = self.teacher_features(batch, clean)                              # the clean crop
        dino_logits = self.teacher_dino_head(pick_cls(feats, self.cfg.dino.cls))  # (B, K)
        patch_logits = self.teacher_patch_head(feats.patches)                    # (B, N, K)
        dino_probs = teacher_probs(dino_logits, self.dino_center, teacher_temperature(step, self.cfg.dino),
                                   self.cfg.dino.centering, self.reduce_sum)
        patch_probs = teacher_probs(patch_logits, self.patch_center, teacher_temperature(step, self.cfg.patch),
                                    self.cfg.patch.centering, self.reduce_sum)
        return TeacherOut(dino_logits=dino_logits, dino_probs=dino_probs, patch_logits=patch_logits,
                          patch_probs=patch_probs)

    def student_output(self, *, batch: Batch) -> StudentOut:
        clean = None
        if self.cfg.contrastive_view == ContrastiveView.CLEAN:
            # No drop path: under head-only EMA these features, detached, are also the teacher's.
            clean = self.model.encode_image(batch.global_crop, stochastic_depth=False)
        masked = self.model.encode_image(batch.global_crop, batch.masks)
        clip = clean if clean is not None else masked
        b, m = batch.local_crops.shape[:2]
        local = self.model.encode_image(batch.local_crops.flatten(0, 1))        # (B*M, ...)
        local_logits = self.dino_head(pick_cls(local, self.cfg.dino.cls))       # (B*M, K)
        return StudentOut(
            cls1=clip.cls1, cls2=clip.cls2,
            alt_text=self.model.encode_text(batch.alt_ids, batch.alt_paddings),
            synthetic_text=self.model.encode_text(batch.syn_ids, batch.syn_paddings),
            local_logits=local_logits.reshape(b, m, -1).transpose(0, 1),       # (M, B, K)
            patch_logits=self.patch_head(masked.patches),
            clean=clean,
        )

    def compute_losses(self, *, teacher: TeacherOut, student: StudentOut, batch: Batch, step: int,
                       contrastive: ContrastivePart | None = None) -> dict[str, Tensor]:
        cfg = self.cfg
        temperature = self.model.temperature
        bias = getattr(self, "sigmoid_bias", None)
        if contrastive is None:
            # CLS1 <-> alt-text and CLS2 <-> sampled synthetic caption, averaged (dual embedding).
            losses = dual_contrastive(cls1=student.cls1, alt_text=student.alt_text, cls2=student.cls2,
                                      synthetic_text=student.synthetic_text, cfg=cfg.contrastive,
                                      temperature=temperature, bias=bias, gather=self.gather, rank=self.rank)
            contrastive_term = cfg.contrastive.weight * losses["loss/contrastive"]
        else:
            # The same, over the whole accumulated step (cache_contrastive): this micro-batch's slice of it.
            losses = dict(contrastive.losses)
            contrastive_term = contrastive.term({k: getattr(student, k) for k in EMBEDDINGS},
                                                {"temperature": temperature, "bias": bias})
        # DINO: the teacher's clean global crop against each of the student's local crops.
        losses["loss/dino"] = dino_loss(student.local_logits, teacher.dino_probs, cfg.dino.student_temp)
        # iBOT++ (or iBOT): patch tokens of the masked student crop against the teacher at each position.
        losses["loss/patch"] = patch_loss(student.patch_logits, teacher.patch_probs, batch.masks,
                                          kind=cfg.patch.kind, student_temp=cfg.patch.student_temp)
        total = contrastive_term + cfg.dino.weight * losses["loss/dino"] + cfg.patch.weight * losses["loss/patch"]
        if cfg.koleo.weight > 0:
            # KoLeo spreads the student's CLS embeddings within the local batch.
            losses["loss/koleo"] = koleo_loss(pick_cls_tensor(student, cfg.dino.cls))
            total = total + cfg.koleo.weight * losses["loss/koleo"]
        losses["loss/total"] = total
        losses |= self.metrics(teacher=teacher, batch=batch, temperature=temperature)
        return losses

    @torch.no_grad()
    def metrics(self, *, teacher: TeacherOut, batch: Batch, temperature: Tensor) -> dict[str, Tensor]:
        return {"metric/temperature": temperature.detach(),
                "metric/teacher_entropy": teacher_entropy(teacher.dino_probs),
                "metric/teacher_patch_entropy": teacher_entropy(teacher.patch_probs),
                "metric/center_norm": center_norm(self.dino_center),
                "metric/fraction_masked": batch.masks.float().mean()}

    @torch.no_grad()
    def update_centers(self, teacher: TeacherOut) -> None:
        follow_center(self.dino_center, teacher.dino_logits, self.cfg.dino, self.reduce_mean)
        follow_center(self.patch_center, teacher.patch_logits, self.cfg.patch, self.reduce_mean)

    @torch.no_grad()
    def embed(self, batch: Batch) -> dict[str, Tensor]:
        """The contrastive loss's inputs for one micro-batch, without graph (the first pass of an accumulated
        step): EMBEDDINGS, each (B, D), and SCALARS. The same computation as the student's, which consumes no
        random numbers on the clean crop (no drop path), so the re-run with graph matches it exactly."""
        if self.cfg.contrastive_view != ContrastiveView.CLEAN:
            raise ValueError("feature-cached accumulation (engine.grad_accum > 1) needs contrastive_view=clean: the "
                             "masked view's drop path would differ between the cached pass and its re-run")
        clean = self.model.encode_image(batch.global_crop, stochastic_depth=False)
        return {"cls1": clean.cls1, "cls2": clean.cls2,
                "alt_text": self.model.encode_text(batch.alt_ids, batch.alt_paddings),
                "synthetic_text": self.model.encode_text(batch.syn_ids, batch.syn_paddings),
                "temperature": self.model.temperature, "bias": getattr(self, "sigmoid_bias", None)}

    def forward(self, batch: Batch, step: int, contrastive: ContrastivePart | None = None, *,
                embed: bool = False) -> dict[str, Tensor]:
        """The step's named losses (with `contrastive`, one micro-batch of an accumulated step); with `embed`,
        `self.embed(batch)` instead: through forward, so that a ZeRO-3 engine gathers the parameters."""
        if embed:
            return self.embed(batch)
        student = self.student_output(batch=batch)
        teacher = self.teacher_output(batch=batch, step=step, clean=student.clean)
        losses = self.compute_losses(teacher=teacher, student=student, batch=batch, step=step, contrastive=contrastive)
        self.update_centers(teacher)
        return losses

    @torch.no_grad()
    def initialise_from(self, model: TIPSModel, dino_head: DinoHead | None, patch_head: DinoHead | None) -> None:
        """Start from an exported model (`PretrainConfig.init`): its encoders, and its EMA heads for both the
        student and the teacher heads (an export holds the teacher's); a full-EMA teacher copies the encoder.
        Shapes must match; the position grid may differ in nothing (same `vision.image_size`)."""
        self.model.load_state_dict(model.state_dict())
        if (dino_head is None) != (patch_head is None):
            raise ValueError("initialise_from needs both heads or neither")
        if dino_head is not None:
            for student, teacher, source in ((self.dino_head, self.teacher_dino_head, dino_head),
                                             (self.patch_head, self.teacher_patch_head, patch_head)):
                student.load_state_dict(source.state_dict())
                teacher.load_state_dict(source.state_dict())
        if self.teacher_vision is not None:
            self.teacher_vision.load_state_dict(self.model.vision.state_dict())

    # -- after the optimiser step --------------------------------------------------------------------
    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.teacher_dino_head, self.dino_head)]
        if not self.cfg.patch.share_head:
            pairs.append((self.teacher_patch_head, self.patch_head))
        if self.teacher_vision is not None:
            pairs.append((self.teacher_vision, self.model.vision))
        return pairs

    @torch.no_grad()
    def update_teacher(self, *, step: int, total_steps: int,
                       gathered: Gathered = lambda params: contextlib.nullcontext()) -> float:
        """EMA of the teacher heads (and encoder under FULL_EMA); returns the momentum used.

        `gathered(params)` is a context that makes partitioned parameters whole (DeepSpeed ZeRO-3's
        GatheredParameters with modifier rank 0); a no-op on one process.
        """
        momentum = ema_momentum(step, total_steps, self.cfg.teacher)
        for i, (teacher, student) in enumerate(self.ema_pairs()):
            t_params, s_params = list(teacher.parameters()), list(student.parameters())
            with gathered(t_params + s_params):
                ema_update(t_params, s_params, momentum, None if self.ema_masters is None else self.ema_masters[i])
        return momentum

    @torch.no_grad()
    def keep_ema_masters(self, gathered: Gathered = lambda params: contextlib.nullcontext()) -> None:
        """From now on, run the EMA on float32 copies of the teacher's current parameters (whole, on their
        device). For 16-bit training: call once the engine has cast the module to bf16 or fp16."""
        self.ema_masters = []
        for teacher, _ in self.ema_pairs():
            params = list(teacher.parameters())
            with gathered(params):
                self.ema_masters.append([p.detach().float().clone() for p in params])

    # -- bookkeeping ----------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]


def pick_cls_tensor(student: StudentOut, which: ClsToken) -> Tensor:
    return student.cls1 if which == ClsToken.CLS1 else student.cls2

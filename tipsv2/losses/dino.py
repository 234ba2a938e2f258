"""DINO self-distillation on a CLS token: teacher centering/sharpening, Sinkhorn-Knopp, the loss.

TIPSv2: the teacher (the student encoder run without gradient on the clean global crop, through the EMA
head) gives one distribution per image; the student's M local crops are each pulled towards it.
No collective is called here: `reduce_sum` / `reduce_mean` are passed in (all-reduce of a tensor across
ranks, returning the sum / the mean; identity on one process).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]


def identity(x: Tensor) -> Tensor:
    """The reduction of a single process."""
    return x


def at_least_fp32(x: Tensor) -> Tensor:
    """x in float32, or float64 if it already is (losses and softmax statistics never run in 16 bits)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Centering(str, enum.Enum):
    CENTER = "center"                  # subtract an EMA of the batch mean, then softmax (DINO)
    SINKHORN_KNOPP = "sinkhorn_knopp"  # equipartition over prototypes (SwAV, DINOv2)


class ClsToken(str, enum.Enum):
    CLS1 = "cls1"  # the token trained against alt-text
    CLS2 = "cls2"  # the token trained against the synthetic caption


@dataclass(frozen=True, kw_only=True)
class DinoLossConfig:
    student_temp: float = 0.1
    teacher_temp: float = 0.07                 # after the warm-up (DINOv2)
    teacher_temp_warmup_start: float = 0.04    # at step 0
    teacher_temp_warmup_steps: int = 37_500    # DINOv2: 30 epochs of 1250 steps
    center_momentum: float = 0.9
    centering: Centering = Centering.CENTER
    # Which CLS token the DINO loss trains; the paper does not say, CLS1 (the image-level token) by default.
    cls: ClsToken = ClsToken.CLS1
    local_crops: int = 6                       # M student crops per image
    weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("student_temp", "teacher_temp", "teacher_temp_warmup_start"):
            if getattr(self, name) <= 0:
                raise ValueError(f"dino {name} must be > 0, got {getattr(self, name)}")
        if self.teacher_temp_warmup_steps < 0:
            raise ValueError(f"dino teacher_temp_warmup_steps must be >= 0, got {self.teacher_temp_warmup_steps}")
        if not 0.0 <= self.center_momentum <= 1.0:
            raise ValueError(f"dino center_momentum must be in [0, 1], got {self.center_momentum}")
        if self.local_crops < 1:
            raise ValueError(f"dino local_crops must be >= 1, got {self.local_crops}")


class CenteringChoice(Protocol):
    """Any loss config with a centering choice (DinoLossConfig, PatchLossConfig)."""
    centering: Centering
    center_momentum: float


class TeacherTempSchedule(Protocol):
    """Any config with the teacher temperature fields (DinoLossConfig, PatchLossConfig)."""
    teacher_temp: float
    teacher_temp_warmup_start: float
    teacher_temp_warmup_steps: int


def teacher_temperature(step: int, cfg: TeacherTempSchedule) -> float:
    """Linear warm-up from `teacher_temp_warmup_start` at step 0 to `teacher_temp`, then constant."""
    if step >= cfg.teacher_temp_warmup_steps or cfg.teacher_temp_warmup_steps == 0:
        return cfg.teacher_temp
    fraction = max(step, 0) / cfg.teacher_temp_warmup_steps
    return cfg.teacher_temp_warmup_start + fraction * (cfg.teacher_temp - cfg.teacher_temp_warmup_start)


@torch.no_grad()
def centered_teacher_probs(teacher_logits: Tensor, center: Tensor, temp: float) -> Tensor:
    """softmax((teacher_logits - center) / temp) over the last axis; (..., K) with center (K,). No gradient."""
    return F.softmax((at_least_fp32(teacher_logits) - center) / temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, temp: float, iterations: int = 3,
                   reduce_sum: Reduce = identity) -> Tensor:
    """Teacher assignments (..., K) whose rows sum to 1 and whose prototypes are used about equally.

    All leading axes are samples (pass (B, N, K) patch logits as they are). Starting from
    exp(logits / temp), each iteration rescales every prototype to total mass 1/K over the global batch
    (`reduce_sum` sums the per-prototype mass across ranks), then every sample to mass 1/B_global.
    Logits are cosines in [-1, 1] for the DINO head, so exp(1 / temp) stays finite in float32.
    """
    shape = teacher_logits.shape
    q = torch.exp(at_least_fp32(teacher_logits).reshape(-1, shape[-1]) / temp)  # (S, K)
    prototypes = shape[-1]
    samples = reduce_sum(torch.tensor(float(q.shape[0]), dtype=q.dtype, device=q.device))
    q = q / reduce_sum(q.sum())
    for _ in range(iterations):
        q = q / reduce_sum(q.sum(dim=0, keepdim=True)) / prototypes  # each prototype: 1/K
        q = q / q.sum(dim=1, keepdim=True) / samples                  # each sample: 1/B_global
    return (q * samples).reshape(shape)


@torch.no_grad()
def teacher_probs(teacher_logits: Tensor, center: Tensor, temp: float, centering: Centering,
                  reduce_sum: Reduce = identity) -> Tensor:
    """Teacher targets (..., K) by the configured centering: Sinkhorn-Knopp over the global batch, or the
    EMA center subtracted before the sharpened softmax. No gradient."""
    if centering == Centering.SINKHORN_KNOPP:
        return sinkhorn_knopp(teacher_logits, temp, reduce_sum=reduce_sum)
    return centered_teacher_probs(teacher_logits, center, temp)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float,
                  reduce_mean: Reduce = identity) -> Tensor:
    """New center = momentum * center + (1 - momentum) * global batch mean of `teacher_logits` (..., K).

    The local mean over all leading axes is averaged across ranks by `reduce_mean` (equal local batch
    sizes assumed, as in DINOv2). Returns a new (K,) tensor; `center` is not modified.
    """
    batch_mean = reduce_mean(at_least_fp32(teacher_logits).reshape(-1, teacher_logits.shape[-1]).mean(dim=0))  # (K,)
    return center * momentum + batch_mean * (1.0 - momentum)


@torch.no_grad()
def follow_center(center: Tensor, teacher_logits: Tensor, cfg: CenteringChoice,
                  reduce_mean: Reduce = identity) -> None:
    """Move `center` in place by `update_center` when `cfg.centering` is CENTER; Sinkhorn-Knopp targets
    use no center, so it stays as it is."""
    if cfg.centering == Centering.CENTER:
        center.copy_(update_center(center, teacher_logits, cfg.center_momentum, reduce_mean))


def dino_loss(student_logits: Sequence[Tensor] | Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """Cross-entropy H(teacher, student) averaged over the M student crops and the batch.

    student_logits: M tensors (B, K) or one (M, B, K); teacher_probs: (B, K), detached here so that
    no gradient reaches the teacher.
    """
    student = torch.stack(list(student_logits)) if not isinstance(student_logits, Tensor) else student_logits
    if student.ndim != 3 or student.shape[1:] != teacher_probs.shape:
        raise ValueError(f"expected student logits (M, B, K) matching teacher probs (B, K) "
                         f"{tuple(teacher_probs.shape)}, got {tuple(student.shape)}")
    log_probs = F.log_softmax(at_least_fp32(student) / student_temp, dim=-1)  # (M, B, K)
    return -(teacher_probs.detach() * log_probs).sum(dim=-1).mean()


@torch.no_grad()
def teacher_entropy(teacher_probs: Tensor) -> Tensor:
    """Mean entropy of the teacher distributions (..., K), in nats (log K when uniform)."""
    probs = at_least_fp32(teacher_probs)
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1).mean()


@torch.no_grad()
def center_norm(center: Tensor) -> Tensor:
    """L2 norm of the center (a collapse signal when it grows)."""
    return at_least_fp32(center).norm()

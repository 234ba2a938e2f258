"""Patch-level self-distillation: iBOT (masked tokens only) and TIPSv2's iBOT++ (every token).

The student sees the global crop with a fraction of its patches replaced by the mask token (drawn in
the data stage: tipsv2.data.masking.MaskingConfig, ratio 0.75 by default); the teacher sees the clean crop. Teacher distributions per patch come from `tipsv2.losses.dino`
(`centered_teacher_probs` with this loss's own center, or `sinkhorn_knopp`), at this config's teacher
temperature. The same function serves distillation with `masks=None` (every token, no masking).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from tipsv2.losses.dino import Centering, at_least_fp32


class PatchLossKind(str, enum.Enum):
    IBOT = "ibot"                      # masked tokens only, mean per image then over images
    IBOT_PLUS_PLUS = "ibot_plus_plus"  # every token, masked or visible, one mean over all of them


@dataclass(frozen=True, kw_only=True)
class PatchLossConfig:
    kind: PatchLossKind = PatchLossKind.IBOT_PLUS_PLUS
    weight: float = 2.0
    share_head: bool = False          # False: a separate iBOT head (DINOv2 default); True: reuse the DINO head
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_warmup_start: float = 0.04
    teacher_temp_warmup_steps: int = 37_500
    center_momentum: float = 0.9      # of this loss's own center, separate from the DINO one
    centering: Centering = Centering.CENTER

    def __post_init__(self) -> None:
        for name in ("student_temp", "teacher_temp", "teacher_temp_warmup_start"):
            if getattr(self, name) <= 0:
                raise ValueError(f"patch {name} must be > 0, got {getattr(self, name)}")
        if self.teacher_temp_warmup_steps < 0:
            raise ValueError(f"patch teacher_temp_warmup_steps must be >= 0, got {self.teacher_temp_warmup_steps}")
        if not 0.0 <= self.center_momentum <= 1.0:
            raise ValueError(f"patch center_momentum must be in [0, 1], got {self.center_momentum}")


def token_cross_entropy(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """H(teacher, student) per token: (B, N, K) x (B, N, K) -> (B, N). The teacher is detached."""
    if student_logits.shape != teacher_probs.shape or student_logits.ndim != 3:
        raise ValueError(f"expected student logits and teacher probs of the same shape (B, N, K), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}")
    log_probs = F.log_softmax(at_least_fp32(student_logits) / student_temp, dim=-1)
    return -(teacher_probs.detach() * log_probs).sum(dim=-1)


def patch_loss(student_logits: Tensor, teacher_probs: Tensor, masks: Tensor | None, *,
               kind: PatchLossKind, student_temp: float) -> Tensor:
    """The patch loss (a scalar) of student logits (B, N, K) against teacher probs (B, N, K).

    masks: (B, N) bool, True where the student saw the mask token; None means no masking (distillation),
    in which case every token counts whatever `kind` is.
    IBOT: mean over each image's masked tokens, then mean over the images that have at least one
    (DINOv2 divides by all B instead; with TIPSv2's 75% masking every image has masked tokens).
    IBOT_PLUS_PLUS: one mean over all B*N tokens, masked or visible.
    """
    per_token = token_cross_entropy(student_logits, teacher_probs, student_temp)  # (B, N)
    if masks is None or kind is PatchLossKind.IBOT_PLUS_PLUS:
        return per_token.mean()
    if masks.shape != per_token.shape:
        raise ValueError(f"expected masks of shape (B, N) = {tuple(per_token.shape)}, got {tuple(masks.shape)}")
    weights = masks.to(per_token.dtype)                                             # (B, N)
    counts = weights.sum(dim=1)                                                     # (B,)
    per_image = (per_token * weights).sum(dim=1) / counts.clamp(min=1.0)            # (B,)
    images = (counts > 0).to(per_token.dtype).sum()                                 # images with a masked token
    return per_image.sum() / images.clamp(min=1.0)  # 0 (still in the graph) when nothing is masked

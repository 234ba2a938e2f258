"""TIPSv2 losses, one per module; pure functions with any cross-rank gather/reduction passed in."""

from tipsv2.losses.contrastive import (
    ContrastiveKind,
    ContrastiveLossConfig,
    contrastive,
    dual_contrastive,
    sigmoid_contrastive,
    softmax_contrastive,
)
from tipsv2.losses.dino import (
    Centering,
    ClsToken,
    DinoLossConfig,
    center_norm,
    centered_teacher_probs,
    dino_loss,
    sinkhorn_knopp,
    teacher_entropy,
    teacher_temperature,
    update_center,
)
from tipsv2.losses.ibot import PatchLossConfig, PatchLossKind, patch_loss, token_cross_entropy
from tipsv2.losses.koleo import KoLeoConfig, koleo_loss

__all__ = [
    "Centering", "ClsToken", "ContrastiveKind", "ContrastiveLossConfig", "DinoLossConfig", "KoLeoConfig",
    "PatchLossConfig", "PatchLossKind", "center_norm", "centered_teacher_probs",
    "contrastive", "dino_loss", "dual_contrastive", "koleo_loss", "patch_loss", "sigmoid_contrastive",
    "sinkhorn_knopp", "softmax_contrastive", "teacher_entropy", "teacher_temperature", "token_cross_entropy",
    "update_center",
]

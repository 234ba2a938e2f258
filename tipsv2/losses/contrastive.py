"""Image-text contrastive losses: softmax InfoNCE (CLIP/TIPS) and sigmoid (SigLIP), plus the TIPS dual loss.

No collective is called here. Under data parallelism the caller passes `gather`, a differentiable
all-gather that concatenates a (B_local, D) tensor across ranks in rank order, e.g.

    gather = lambda x: torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)

Each rank then scores its own rows against the gathered other side and returns the mean over its own
rows. The mean of these per-rank losses equals the loss of one process on the concatenated global batch,
and gradient averaging across ranks (DDP, DeepSpeed) reproduces its gradient: the gather's backward sums
the gradient of every rank's loss into the local embeddings.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tipsv2.losses.dino import at_least_fp32

Gather = Callable[[Tensor], Tensor]


def identity(x: Tensor) -> Tensor:
    """The gather of a single process."""
    return x


class ContrastiveKind(str, enum.Enum):
    SOFTMAX = "softmax"  # symmetric InfoNCE (CLIP, TIPS, TIPSv2)
    SIGMOID = "sigmoid"  # pairwise sigmoid (SigLIP); needs a learned bias


@dataclass(frozen=True, kw_only=True)
class ContrastiveLossConfig:
    kind: ContrastiveKind = ContrastiveKind.SOFTMAX
    # The temperature (logits = cosine / temperature) is a learned scalar owned by the model, with its
    # initial value and clamp bounds in ModelConfig (one place); the losses take it as given.
    sigmoid_bias_init: float = -10.0  # SigLIP's initial logit bias (only for kind SIGMOID)
    weight: float = 1.0               # of the mean of the two terms in the total loss


def _local_labels(local_rows: int, global_rows: int, rank: int) -> Tensor:
    """Column index of each local row's positive pair in the gathered (rank-ordered) batch."""
    start = rank * local_rows
    if rank < 0 or start + local_rows > global_rows:
        raise ValueError(f"rank {rank} with {local_rows} local rows does not fit a gathered batch of "
                         f"{global_rows} rows; every rank must hold the same number of rows")
    return torch.arange(start, start + local_rows)


def _normalized_pair(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """Both embeddings checked, in at least float32 (bf16/fp16 training: logits and cross-entropies
    never run in 16 bits), and L2-normalised."""
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"expected image and text embeddings of the same shape (B, D), got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    return F.normalize(at_least_fp32(image), dim=-1), F.normalize(at_least_fp32(text), dim=-1)


def _scalar_at_least_fp32(value: Tensor | float) -> Tensor | float:
    """A learned temperature or bias (a 16-bit tensor in bf16 training) in at least float32; floats as given."""
    return at_least_fp32(value) if isinstance(value, Tensor) else value


def softmax_contrastive(image: Tensor, text: Tensor, *, temperature: Tensor | float,
                        gather: Gather = identity, rank: int = 0) -> Tensor:
    """Symmetric InfoNCE between matching rows of `image` and `text`, both (B_local, D).

    Embeddings are L2-normalised; logits = cosine / temperature. Image rows are scored against all
    gathered texts and text rows against all gathered images; the result is the mean of the two
    cross-entropies over the local rows (a scalar).
    """
    image, text = _normalized_pair(image, text)
    temperature = _scalar_at_least_fp32(temperature)
    all_image = gather(image)  # (B_global, D)
    all_text = gather(text)    # (B_global, D)
    labels = _local_labels(image.shape[0], all_text.shape[0], rank).to(image.device)
    image_to_text = image @ all_text.T / temperature  # (B_local, B_global)
    text_to_image = text @ all_image.T / temperature  # (B_local, B_global)
    return 0.5 * (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels))


def sigmoid_contrastive(image: Tensor, text: Tensor, *, temperature: Tensor | float, bias: Tensor | float,
                        gather: Gather = identity, rank: int = 0) -> Tensor:
    """SigLIP loss between matching rows of `image` and `text`, both (B_local, D).

    logits = cosine / temperature + bias for every (local image, gathered text) pair; label +1 on the
    matching pair and -1 elsewhere; the loss is -sum(log sigmoid(label * logit)) / B_local. Every
    (image, text) pair of the global batch is scored on exactly one rank.
    """
    image, text = _normalized_pair(image, text)
    temperature, bias = _scalar_at_least_fp32(temperature), _scalar_at_least_fp32(bias)
    all_text = gather(text)  # (B_global, D)
    positives = _local_labels(image.shape[0], all_text.shape[0], rank).to(image.device)
    logits = image @ all_text.T / temperature + bias  # (B_local, B_global)
    signs = -torch.ones_like(logits)
    signs[torch.arange(image.shape[0], device=image.device), positives] = 1.0
    return -F.logsigmoid(signs * logits).sum() / image.shape[0]


def contrastive(image: Tensor, text: Tensor, *, cfg: ContrastiveLossConfig, temperature: Tensor,
                bias: Tensor | None = None, gather: Gather = identity, rank: int = 0) -> Tensor:
    """The loss `cfg.kind` names (the temperature arrives already clamped, from TIPSModel.temperature)."""
    if cfg.kind is ContrastiveKind.SOFTMAX:
        return softmax_contrastive(image, text, temperature=temperature, gather=gather, rank=rank)
    if bias is None:
        raise ValueError("contrastive kind 'sigmoid' needs a learned bias tensor (init cfg.sigmoid_bias_init), "
                         "got bias=None")
    return sigmoid_contrastive(image, text, temperature=temperature, bias=bias, gather=gather, rank=rank)


def dual_contrastive(*, cls1: Tensor, alt_text: Tensor, cls2: Tensor, synthetic_text: Tensor,
                     cfg: ContrastiveLossConfig, temperature: Tensor, bias: Tensor | None = None,
                     gather: Gather = identity, rank: int = 0) -> dict[str, Tensor]:
    """The TIPS dual embedding loss: CLS1 <-> alt-text and CLS2 <-> synthetic caption, each (B_local, D).

    Returns {"loss/clip_alt", "loss/clip_syn", "loss/contrastive"}, the last being the mean of the two.
    Both terms share the one learned temperature (and bias, for SIGMOID).
    """
    common = dict(cfg=cfg, temperature=temperature, bias=bias, gather=gather, rank=rank)
    alt = contrastive(cls1, alt_text, **common)
    syn = contrastive(cls2, synthetic_text, **common)
    return {"loss/clip_alt": alt, "loss/clip_syn": syn, "loss/contrastive": 0.5 * (alt + syn)}

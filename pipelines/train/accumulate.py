"""One optimiser step over its micro-batches on a DeepSpeed engine, the contrastive loss over the whole step.

With `engine.grad_accum` = k > 1, pretraining caches the step's contrastive embeddings first (one pass without
graph per micro-batch), computes the contrastive loss over all k micro-batches of every rank and its gradient
w.r.t. those embeddings once (`tipsv2.task.cache_contrastive`), then re-runs each micro-batch with graph to
backpropagate its slice with its own DINO, iBOT++ and KoLeo terms. So the contrastive negatives per step are
batch x k x ranks, whatever split of the global batch the cluster needs, at the memory of one micro-batch plus
the cached (B, D) embeddings. Distillation keeps the contrastive loss per micro-batch (its clean student pass
has drop path, which a cached pass would have to replay).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from tipsv2.losses.contrastive import ContrastiveLossConfig, identity
from tipsv2.task import ContrastivePart, cache_contrastive

Losses = dict[str, torch.Tensor]


def contrastive_parts(engine, batches: Sequence, *, step: int, cfg: ContrastiveLossConfig | None,
                      gather: Callable = identity, rank: int = 0) -> list[ContrastivePart | None]:
    """Each micro-batch's share of the step's cached contrastive loss; None for each where there is no caching
    (one micro-batch, or `cfg` None: a task that does not cache). Every rank calls this at the same point."""
    if cfg is None or len(batches) == 1:
        return [None] * len(batches)
    with torch.no_grad():
        embedded = [engine(batch, step, embed=True) for batch in batches]
    cache = cache_contrastive(embedded, cfg=cfg, gather=gather, rank=rank)
    return [cache.part(i) for i in range(len(batches))]


def optimizer_step(engine, batches: Sequence, parts: Sequence[ContrastivePart | None], *, step: int,
                   check: Callable[[Losses], Losses], at_boundary: Callable[[], None]) -> list[Losses]:
    """Forward, backward and engine.step on each micro-batch (DeepSpeed applies the update at the last);
    `check(losses)` sees each micro-batch's losses before backward (and may raise), `at_boundary()` runs after
    the last backward, before the update (clipping, or a test reading the gradients)."""
    out = []
    for batch, part in zip(batches, parts, strict=True):
        losses = check(engine(batch, step) if part is None else engine(batch, step, part))
        engine.backward(losses["loss/total"])
        if engine.is_gradient_accumulation_boundary():
            at_boundary()
        engine.step()
        out.append(losses)
    return out

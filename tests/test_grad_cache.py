"""Feature-cached accumulation (tipsv2.task.cache_contrastive, GradCache): the contrastive loss of an accumulated
step sees every pair of the step, and its gradients equal one step on the micro-batches together.

In one process against a plain reference: the same task on the whole batch. The distributed check (DeepSpeed
ZeRO 0 and 2, 2 gloo ranks) is tests/test_grad_cache_zero.py. The settings make every other term per example,
so that the micro-batch split changes nothing but the contrastive batch: EMA centering with momentum 1 (the
center stays put; Sinkhorn-Knopp would normalise over the micro-batch), no KoLeo, no drop path.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tipsv2.configs import tiny
from tipsv2.losses.contrastive import ContrastiveKind
from tipsv2.losses.dino import Centering
from tipsv2.task import ContrastiveView, TIPSv2Task, cache_contrastive
from tests.test_task import make_batch

TOL = dict(rtol=1e-5, atol=1e-6)


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Gradients summed over micro-batches add the same float32 terms in another order: an entry that cancels
    down to a small value (a register token's gradient sums every patch's) keeps the rounding of the tensor's
    largest terms, so the absolute tolerance scales with the tensor's largest entry (1e-6 of it; measured on
    an AMD EPYC with AVX-512: 3.7e-7 of it). A per-micro-batch contrastive loss misses by orders more."""
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=TOL["rtol"], atol=TOL["atol"] * scale, msg=name)


def per_example_cfg(kind: ContrastiveKind = ContrastiveKind.SOFTMAX):
    cfg = tiny().task
    fixed = dict(centering=Centering.CENTER, center_momentum=1.0)
    return replace(cfg, dino=replace(cfg.dino, **fixed), patch=replace(cfg.patch, **fixed),
                   contrastive=replace(cfg.contrastive, kind=kind),
                   model=replace(cfg.model, vision=replace(cfg.model.vision, drop_path=0.0)))


def split(batch, parts: int):
    size = len(batch) // parts
    fields = {name: value for name, value in vars(batch).items()}
    out = []
    for i in range(parts):
        sl = slice(i * size, (i + 1) * size)
        out.append(type(batch)(**{k: v[sl] for k, v in fields.items()}))
    return out


def grads_of(task: TIPSv2Task) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in task.named_parameters() if p.requires_grad and p.grad is not None}


def one_step(cfg, batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    task = TIPSv2Task(cfg)
    losses = task(batch, step=3)
    losses["loss/total"].backward()
    return {k: v.detach() for k, v in losses.items()}, grads_of(task)


def accumulated_step(cfg, batch, parts: int, *, cached: bool = True):
    """What the trainer does with grad_accum = parts: each micro-batch's loss divided by `parts` (DeepSpeed's
    scaling); `cached=False` is the old per-micro-batch contrastive loss, which the test must tell apart."""
    torch.manual_seed(0)
    task = TIPSv2Task(cfg)
    micro = split(batch, parts)
    cache = cache_contrastive([task(b, 3, embed=True) for b in micro], cfg=cfg.contrastive) if cached else None
    rows = []
    for i, b in enumerate(micro):
        losses = task(b, 3, cache.part(i) if cached else None)
        (losses["loss/total"] / parts).backward()
        rows.append({k: v.detach() for k, v in losses.items()})
    mean = {k: torch.stack([r[k] for r in rows]).mean(0) for k in rows[0]}
    return mean, grads_of(task)


@pytest.mark.parametrize("kind", [ContrastiveKind.SOFTMAX, ContrastiveKind.SIGMOID])
def test_accumulated_step_equals_one_step_on_the_whole_batch(kind):
    cfg = per_example_cfg(kind)
    batch = make_batch(8, seed=1)
    ref_losses, ref_grads = one_step(cfg, batch)
    losses, grads = accumulated_step(cfg, batch, parts=4)
    for key in ("loss/contrastive", "loss/clip_alt", "loss/clip_syn", "loss/dino", "loss/patch", "loss/total"):
        torch.testing.assert_close(losses[key], ref_losses[key], **TOL, msg=key)
    assert grads.keys() == ref_grads.keys() and "model.log_temperature" in grads
    for name, grad in ref_grads.items():
        assert_grad_close(grads[name], grad, name)


def test_the_per_micro_batch_contrastive_loss_is_told_apart():
    """Without the cache, the contrastive batch is the micro-batch: loss and gradients differ."""
    cfg = per_example_cfg()
    batch = make_batch(8, seed=1)
    ref_losses, ref_grads = one_step(cfg, batch)
    losses, grads = accumulated_step(cfg, batch, parts=4, cached=False)
    assert not torch.allclose(losses["loss/contrastive"], ref_losses["loss/contrastive"], **TOL)
    assert not torch.allclose(grads["model.log_temperature"], ref_grads["model.log_temperature"], **TOL)
    with pytest.raises(AssertionError):  # the scaled tolerance still tells it apart
        assert_grad_close(grads["model.vision.register_tokens"], ref_grads["model.vision.register_tokens"], "")


def test_the_masked_view_refuses_cached_accumulation():
    cfg = replace(per_example_cfg(), contrastive_view=ContrastiveView.MASKED)
    with pytest.raises(ValueError, match="needs contrastive_view=clean"):
        TIPSv2Task(cfg)(make_batch(2), 0, embed=True)

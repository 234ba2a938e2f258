"""Losses with real collectives: 2 gloo processes on 127.0.0.1 against one process on the whole batch.

Each rank holds its half of a global batch of 8, runs the same tiny "towers" (replicated
Linear layers, same init), computes the contrastive loss with a differentiable all-gather passed in, and
averages parameter gradients across ranks as DDP/DeepSpeed do. Loss (mean over ranks), parameter
gradients, and embedding gradients must match one process on the concatenated batch. DINO's center
(reduce_mean) and Sinkhorn-Knopp (reduce_sum) are checked the same way.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.multiprocessing as mp

from tipsv2.losses.contrastive import sigmoid_contrastive, softmax_contrastive
from tipsv2.losses.dino import sinkhorn_knopp, update_center

WORLD = 2
LOCAL = 4             # rows per rank
GLOBAL = WORLD * LOCAL
IN_DIM, DIM, PROTOTYPES = 3, 5, 6
TOL = dict(rtol=1e-9, atol=1e-12)


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(*shape, generator=gen, dtype=torch.float64) for name, shape in
            (("image_in", (GLOBAL, IN_DIM)), ("text_in", (GLOBAL, IN_DIM)), ("teacher", (GLOBAL, PROTOTYPES)))}


def _towers() -> dict[str, torch.Tensor]:
    """Replicated parameters: two linear towers, a temperature and a sigmoid bias."""
    gen = torch.Generator().manual_seed(1)
    params = {"image_w": torch.randn(DIM, IN_DIM, generator=gen, dtype=torch.float64),
              "text_w": torch.randn(DIM, IN_DIM, generator=gen, dtype=torch.float64),
              "temperature": torch.tensor(0.3, dtype=torch.float64),
              "bias": torch.tensor(-1.0, dtype=torch.float64)}
    return {k: v.requires_grad_() for k, v in params.items()}


def _contrastive_step(kind: str, image_in, text_in, *, gather=None, rank=0) -> dict[str, torch.Tensor]:
    """Loss, parameter gradients and embedding gradients of one contrastive step."""
    params = _towers()
    image = image_in @ params["image_w"].T  # (B, D)
    text = text_in @ params["text_w"].T     # (B, D)
    image.retain_grad()
    text.retain_grad()
    kwargs = {} if gather is None else {"gather": gather, "rank": rank}
    if kind == "softmax":
        loss = softmax_contrastive(image, text, temperature=params["temperature"], **kwargs)
    else:
        loss = sigmoid_contrastive(image, text, temperature=params["temperature"], bias=params["bias"], **kwargs)
    loss.backward()
    grads = {f"grad/{k}": torch.zeros_like(v) if v.grad is None else v.grad for k, v in params.items()}
    return {"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad, **grads}


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    return torch.cat(dist_nn.all_gather(x), dim=0)


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    dist.all_reduce(out)
    return out


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return _all_reduce_sum(x) / dist.get_world_size()


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        batch = _batch()
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results = {}
        for kind in ("softmax", "sigmoid"):
            step = _contrastive_step(kind, batch["image_in"][rows], batch["text_in"][rows],
                                     gather=_all_gather_cat, rank=rank)
            results[f"{kind}/loss_mean"] = _all_reduce_mean(step["loss"])
            for key in ("image_grad", "text_grad"):
                results[f"{kind}/{key}"] = step[key]
            for key in (k for k in step if k.startswith("grad/")):
                results[f"{kind}/{key}"] = _all_reduce_mean(step[key])  # DDP-style gradient averaging
        center = torch.linspace(-1, 1, PROTOTYPES, dtype=torch.float64)
        results["center"] = update_center(center, batch["teacher"][rows], 0.9, reduce_mean=_all_reduce_mean)
        results["sinkhorn"] = sinkhorn_knopp(batch["teacher"][rows], 0.1, reduce_sum=_all_reduce_sum)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    out_dir = tmp_path_factory.mktemp("loss_gather")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_contrastive_across_ranks_equals_full_batch(ranks, kind):
    batch = _batch()
    full = _contrastive_step(kind, batch["image_in"], batch["text_in"])
    for rank, result in enumerate(ranks):
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        torch.testing.assert_close(result[f"{kind}/loss_mean"], full["loss"], **TOL)
        for name in ("image_w", "text_w", "temperature", "bias"):
            torch.testing.assert_close(result[f"{kind}/grad/{name}"], full[f"grad/{name}"], **TOL)
        # The gather's backward sums every rank's loss gradient into the local rows: WORLD x the full-batch
        # gradient of the mean loss, which gradient averaging then divides back.
        for key in ("image_grad", "text_grad"):
            torch.testing.assert_close(result[f"{kind}/{key}"], WORLD * full[key][rows], **TOL)


@pytest.mark.timeout(120)
def test_dino_center_and_sinkhorn_across_ranks_equal_full_batch(ranks):
    batch = _batch()
    center = torch.linspace(-1, 1, PROTOTYPES, dtype=torch.float64)
    expected_center = update_center(center, batch["teacher"], 0.9)
    expected_q = sinkhorn_knopp(batch["teacher"], 0.1)
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["center"], expected_center, **TOL)
        torch.testing.assert_close(result["sinkhorn"], expected_q[rank * LOCAL:(rank + 1) * LOCAL], **TOL)
    assert not torch.allclose(sinkhorn_knopp(batch["teacher"][:LOCAL], 0.1), expected_q[:LOCAL])  # reduce matters

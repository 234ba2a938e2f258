"""The single-process training loop (CPU or one GPU): the reference the distributed trainer must match.

    from tipsv2.configs import tiny
    from tipsv2.loop import synthetic_records, fit_tokenizer, train_local
    records = synthetic_records(tiny().data.synthetic)
    result = train_local(tiny(), records=records, tokenizer=fit_tokenizer(records, 256, "/tmp/spm.model"))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from tipsv2.configs import DataConfig, PretrainConfig
from tipsv2.data.batch import Batch, collate, make_example
from tipsv2.data.schema import Granularity, Slot
from tipsv2.data.synthetic import SyntheticConfig, make_scene
from tipsv2.models.heads import DinoHead
from tipsv2.models.model import TIPSModel
from tipsv2.optim import OptimConfig, TowerDepths, build_optimizer, learning_rate, param_groups, set_learning_rate
from tipsv2.task import TIPSv2Task
from tipsv2.tokenizer import Tokenizer, train_tokenizer


@dataclass(frozen=True)
class Record:
    """One training row: the image and its texts (what the image + caption Parquet join yields)."""
    id: str
    image: bytes | Image.Image
    alt_text: str | None
    captions: dict[Slot | Granularity, str | None]   # a granularity: the main source's; Slot: any source's


def synthetic_records(cfg: SyntheticConfig, split: str = "train") -> list[Record]:
    records = []
    for index in range(cfg.split_size(split)):
        scene = make_scene(cfg, split, index)
        records.append(Record(id=f"synthetic-{split}-{index}", image=scene.image, alt_text=scene.alt_text,
                              captions={Granularity(g): text for g, text in scene.captions.items()}))
    return records


def fit_tokenizer(records: Sequence[Record], vocab_size: int, out_path: str | Path, *, max_len: int = 64) -> Tokenizer:
    texts = [t for r in records for t in (r.alt_text, *r.captions.values()) if t]
    return Tokenizer(train_tokenizer(texts, vocab_size=vocab_size, out_path=out_path), max_len=max_len)


def epoch_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(records: Sequence[Record], *, data: DataConfig, seed: int, patch_size: int, tokenizer: Tokenizer,
            epoch: int, masked: bool = True) -> Iterator[Batch]:
    """Full batches of one epoch (the last partial batch is dropped, so every step has the same size)."""
    order = epoch_order(len(records), seed=seed, epoch=epoch)
    for start in range(0, len(order) - data.batch_size + 1, data.batch_size):
        rows = [records[i] for i in order[start:start + data.batch_size]]
        examples = [make_example(r.image, example_id=r.id, alt_text=r.alt_text, captions=r.captions, epoch=epoch,
                                 crop_cfg=data.crops, caption_cfg=data.captions) for r in rows]
        yield collate(examples, tokenizer=tokenizer, masking_cfg=data.masking if masked else None,
                      patch_size=patch_size)


def endless(records: Sequence[Record], *, data: DataConfig, seed: int, patch_size: int, tokenizer: Tokenizer,
            start_epoch: int = 0, masked: bool = True) -> Iterator[tuple[int, Batch]]:
    """(epoch, Batch) forever, epoch after epoch."""
    if len(records) < data.batch_size:
        raise ValueError(f"need at least batch_size={data.batch_size} records, got {len(records)}")
    epoch = start_epoch
    while True:
        for batch in batches(records, data=data, seed=seed, patch_size=patch_size, tokenizer=tokenizer, epoch=epoch,
                             masked=masked):
            yield epoch, batch
        epoch += 1


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(losses: dict[str, torch.Tensor], step: int) -> None:
    bad = {k: float(v) for k, v in losses.items() if k.startswith("loss/") and not torch.isfinite(v).all()}
    if bad:
        raise NonFiniteLoss(f"non-finite loss at step {step}: {bad}; the step was not applied "
                            "(lower optim.lr, raise optim.warmup_steps, or check the input batch)")


def scalars(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in losses.items()}


Init = tuple[TIPSModel, DinoHead | None, DinoHead | None]   # a model to start from: (model, DINO head, patch head)


class Steppable(Protocol):
    """TIPSv2Task or DistillTask: forward(batch, step) -> losses; update_teacher after the optimiser step;
    ema_pairs() the (teacher, student) modules an EMA ties (none for the frozen distillation teacher)."""
    ema_masters: list[list[torch.Tensor]] | None   # float32 copies of the EMA teacher, once keep_ema_masters ran

    def __call__(self, batch: Batch, step: int) -> dict[str, torch.Tensor]: ...
    def update_teacher(self, *, step: int, total_steps: int) -> float: ...
    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]: ...
    def ema_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]: ...
    def keep_ema_masters(self, gathered=...) -> None: ...


@dataclass
class LocalResult:
    task: torch.nn.Module
    history: list[dict[str, float]] = field(default_factory=list)   # one row per step
    seconds: float = 0.0


def fit(task: Steppable, *, stream: Iterator[tuple[int, Batch]], optim: OptimConfig, steps: int, depths: TowerDepths,
        on_step: Callable[[int, dict[str, float]], None] | None = None) -> LocalResult:
    """The plain optimisation loop: warm-up + cosine LR, AdamW/Adafactor, clipping, NaN guard, EMA."""
    groups = param_groups(task.trainable_parameters(), optim, depths=depths)
    optimizer = build_optimizer(groups, optim)
    params = [p for g in groups for p in g["params"]]
    result = LocalResult(task=task)
    start = time.perf_counter()
    for step in range(steps):
        epoch, batch = next(stream)
        lr = learning_rate(step, total_steps=steps, cfg=optim)
        set_learning_rate(optimizer, lr)
        losses = task(batch, step)
        check_finite(losses, step)
        optimizer.zero_grad(set_to_none=True)
        losses["loss/total"].backward()
        if optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, optim.clip_grad)
        optimizer.step()
        momentum = task.update_teacher(step=step, total_steps=steps)
        row = scalars(losses) | {"lr": lr, "ema_momentum": momentum, "epoch": epoch, "step": step}
        result.history.append(row)
        if on_step is not None:
            on_step(step, row)
    result.seconds = time.perf_counter() - start
    return result


def build_pretrain_task(cfg: PretrainConfig, *, init: Init | None = None, **collectives) -> TIPSv2Task:
    """Seeded by cfg.seed, so every rank (and the local loop) builds the same task; `init`: (model, DINO head,
    patch head) of an export to start from (what `cfg.init` names, loaded by the caller)."""
    torch.manual_seed(cfg.seed)
    task = TIPSv2Task(cfg.task, **collectives)
    if init is not None:
        task.initialise_from(*init)
    return task


def train_local(cfg: PretrainConfig, *, records: Sequence[Record], tokenizer: Tokenizer,
                on_step: Callable[[int, dict[str, float]], None] | None = None,
                init: Init | None = None) -> LocalResult:
    """Pretrain `cfg.steps` steps in this process; deterministic for a given cfg.seed. `init`: (model, DINO
    head, patch head) of an export to start from (what `cfg.init` names, loaded by the caller)."""
    task = build_pretrain_task(cfg, init=init)
    vision = cfg.task.model.vision
    stream = endless(records, data=cfg.data, seed=cfg.seed, patch_size=vision.patch_size, tokenizer=tokenizer)
    return fit(task, stream=stream, optim=cfg.optim, steps=cfg.steps, depths=TowerDepths.of(cfg.task.model),
               on_step=on_step)

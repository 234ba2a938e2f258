"""--local: one process, no Ray or DeepSpeed. Trains with tipsv2.loop's own loops (this module copies none),
logs to the sink and exports as rank 0 does."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from pipelines import data
from pipelines.tracking import MetricsSink
from pipelines.train.checkpoint import write_history
from pipelines.train.export import write_export
from pipelines.train.jobs import Job, build_task, export_parts, local_copy
from tipsv2.checkpoint import ModelSource, load_source
from pipelines.train.config import JobConfig
from tipsv2.configs import Precision, model_config_of
from tipsv2.flops import flops_per_example, peak_flops
from tipsv2.loop import endless, fit, train_local
from tipsv2.optim import TowerDepths
from tipsv2.tokenizer import Tokenizer


def train_local_task(job: Job, cfg: JobConfig, *, records, tokenizer: Tokenizer,
                     on_step: Callable[[int, dict[str, float]], None]) -> nn.Module:
    """tipsv2.loop's plain loop: train_local when pretraining, loop.fit on the DistillTask (the same as
    tipsv2.distill_loop.distill_local, plus `student_init`) when distilling."""
    if job == Job.PRETRAIN:
        init = load_source(ModelSource.parse(cfg.init), fetch=local_copy) if cfg.init else None
        return train_local(cfg, records=records, tokenizer=tokenizer, on_step=on_step, init=init).task
    task = build_task(job, cfg)
    vision = cfg.task.student.vision
    stream = endless(records, data=cfg.data, seed=cfg.seed, patch_size=vision.patch_size, tokenizer=tokenizer,
                     masked=False)
    return fit(task, stream=stream, optim=cfg.optim, steps=cfg.steps, depths=TowerDepths.of(cfg.task.student),
               on_step=on_step).task


def train_here(job: Job, cfg: JobConfig, *, output: str, source: data.Source, texts, tokenizer: str,
               sink: MetricsSink) -> list[dict[str, float]]:
    """--local: train in this process, log to the sink, export like rank 0 does."""
    if cfg.engine.use_gpu or cfg.engine.precision != Precision.FP32:
        print(f"--local trains in float32 on this process's CPU: engine.use_gpu={cfg.engine.use_gpu} and "
              f"engine.precision={cfg.engine.precision.value} apply to the Ray Train + DeepSpeed path only", flush=True)
    tok = Tokenizer(local_copy(tokenizer), max_len=model_config_of(cfg).text.max_len)
    records = data.read_records(source, texts)
    history: list[dict[str, float]] = []
    flops = flops_per_example(cfg)
    peak = peak_flops(torch.device("cpu"), Precision.FP32)
    last = [time.perf_counter()]

    def on_step(step: int, row: dict[str, float]) -> None:
        now = time.perf_counter()
        seconds, last[0] = now - last[0], now
        row = row | {"images_per_s": cfg.data.batch_size / seconds, "mfu": flops * cfg.data.batch_size / seconds / peak}
        history.append(row)
        if step % cfg.log_every == 0 or step + 1 == cfg.steps:
            sink.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)

    task = train_local_task(job, cfg, records=records, tokenizer=tok, on_step=on_step)
    model, dino_head, patch_head, head_cfg = export_parts(task, cfg)
    write_export(output, model, dino_head, patch_head, head_cfg=head_cfg, sink=sink, tokenizer=tok, source=source,
                 image_size=cfg.data.crops.global_size)
    write_history(output, history)
    return history

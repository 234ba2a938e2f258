"""--local: one process, no Ray or DeepSpeed. Trains with the library's own loops (`TrainJob.train_local`:
tipsv2.loop.train_local or tipsv2.distill_loop.distill_local; this module copies none), logs to the sink
and exports as rank 0 does."""

from __future__ import annotations

import time
import torch

from pipelines import data
from pipelines.tracking import MetricsSink
from pipelines.train.checkpoint import write_history
from pipelines.train.config import JobConfig
from pipelines.train.export import write_export
from pipelines.train.jobs import Job, local_copy
from tipsv2.configs import Precision, model_config_of
from tipsv2.flops import flops_per_example, peak_flops
from tipsv2.tokenizer import Tokenizer


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

    task = job.train.train_local(cfg, records=records, tokenizer=tok, on_step=on_step)
    model, dino_head, patch_head, head_cfg = job.train.export_parts(task, cfg)
    write_export(output, model, dino_head, patch_head, head_cfg=head_cfg, sink=sink, tokenizer=tok, source=source,
                 image_size=cfg.data.crops.global_size)
    write_history(output, history)
    return history

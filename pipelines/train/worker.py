"""One Ray Train rank: the task under a DeepSpeed engine, its data stream, its state; `Worker.run()` trains to
cfg.steps, checkpoints into Ray Train's storage and exports on rank 0.

Test-only fault injection is the plan's hook object (`plan.faults`, jobs.Faults), called at the start of every
step and on its losses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipelines import storage
from pipelines.stream import RankStream, StreamSpec
from pipelines.tracking import MetricsSink, NullSink, open_sink
from pipelines.train.accumulate import contrastive_parts, optimizer_step
from pipelines.train.checkpoint import (DS_TAG, STOP_FILE, TEACHER_STATE, TRAINER_STATE, TrainerState,
                                        checkpoint_directory, load_teacher_tensors, rng_state, set_rng_state,
                                        teacher_tensors, write_history)
from pipelines.train.export import cpu_copies, cpu_state, write_export
from pipelines.train.jobs import Plan, local_copy, teacher_masters
from pipelines.train.perf import Progress, live_tensor_mb, peak_rss_mb
from pipelines.train.zero import (Zero, all_gather_cat, all_reduce_mean, all_reduce_sum, deepspeed_config,
                                  manual_clipping, master_state)
from tipsv2.configs import Precision, model_config_of
from tipsv2.flops import flops_per_example, peak_flops
from tipsv2.loop import NonFiniteLoss, scalars
from tipsv2.losses.contrastive import identity
from tipsv2.optim import TowerDepths, build_optimizer, learning_rate, param_groups
from tipsv2.tokenizer import Tokenizer


def set_learning_rates(optimizer, lr: float, scales: list[float]) -> None:
    groups = optimizer.param_groups
    if len(groups) != len(scales):
        raise RuntimeError(f"the engine's optimizer has {len(groups)} param groups, expected {len(scales)}")
    for group, scale in zip(groups, scales):
        group["lr"] = lr * scale


class Worker:
    """One Ray Train rank: engine, data stream, state; `run()` trains to cfg.steps."""

    def __init__(self, plan: Plan, *, rank: int, world: int) -> None:
        self.plan, self.cfg = plan, plan.cfg
        self.rank, self.world = rank, world
        self.zero = Zero(self.cfg.engine.zero_stage)
        self.device = self._init_distributed()
        self.task = self._build_task()
        self.engine, self.optimizer, self.scales = self._init_engine()
        self.dtype = self._keep_masters()
        self.state = TrainerState(run_id=plan.run_id)
        self.sink: MetricsSink = NullSink()
        self.flops = flops_per_example(self.cfg, plan.job.train.teacher_vision(self.task))
        self.peak = peak_flops(self.device, self.cfg.engine.precision) if self.rank == 0 else float("nan")

    def _init_distributed(self) -> torch.device:
        import ray.train.torch

        if self.cfg.engine.use_gpu:
            device = ray.train.torch.get_device()
            torch.cuda.set_device(device)
        else:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            device = torch.device("cpu")
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if self.cfg.engine.use_gpu else "gloo")
        return device

    def _build_task(self):
        """The task, handed the collectives when there is more than one rank."""
        collectives = dict(gather=all_gather_cat, reduce_mean=all_reduce_mean, reduce_sum=all_reduce_sum)
        return self.plan.job.train.build_task(self.cfg, rank=self.rank, **(collectives if self.world > 1 else {}))

    def _init_engine(self):
        """(engine, its optimizer, the lr scale of each param group): the configured optimizer (AdamW or
        Adafactor) built on tipsv2.optim's groups by the function the local loop uses, wrapped by
        deepspeed.initialize."""
        import deepspeed

        groups = param_groups(self.task.trainable_parameters(), self.cfg.optim,
                              depths=TowerDepths.of(model_config_of(self.cfg)))
        scales = [g["lr_scale"] for g in groups]
        optimizer = build_optimizer(groups, self.cfg.optim)
        config = deepspeed_config(self.cfg.engine, batch_size=self.cfg.data.batch_size,
                                  clip_grad=self.cfg.optim.clip_grad, world=self.world)
        self.zero.patch_deepspeed()
        engine, optimizer, _, _ = deepspeed.initialize(model=self.task, optimizer=optimizer, config=config,
                                                       dist_init_required=False)
        self.zero.after_initialize(self.task, optimizer)
        return engine, optimizer, scales

    def _keep_masters(self) -> torch.dtype:
        """The training dtype; in 16 bits the EMA teacher keeps float32 masters (the engine cast it too)."""
        dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(self.cfg.engine.precision,
                                                                                   torch.float32)
        if dtype != torch.float32:
            self.task.keep_ema_masters(self.zero.gathered)
        return dtype

    # -- state ------------------------------------------------------------------------------------
    def restore(self, checkpoint) -> None:
        with checkpoint_directory(checkpoint, self.rank) as root:
            rng = root / f"rng_rank{self.rank}.json"
            if not rng.is_file():
                raise RuntimeError(f"checkpoint {checkpoint.path} has no state for rank {self.rank}: it was written "
                                   f"by another number of workers; resume with the same engine.workers")
            self.engine.load_checkpoint(str(root), tag=DS_TAG, load_optimizer_states=True,
                                        load_lr_scheduler_states=False, load_module_strict=True)
            from safetensors.torch import load_file
            load_teacher_tensors(self.task, load_file(str(root / TEACHER_STATE)), self.zero.stage)
            set_rng_state(json.loads(rng.read_text()))
            raw = json.loads((root / TRAINER_STATE).read_text())
        self.state = TrainerState(step=raw["step"], epoch=raw["epoch"], run_id=raw.get("run_id") or self.plan.run_id,
                                  history=raw["history"])

    def save(self, metrics: dict[str, float]) -> None:
        import ray.train
        from safetensors.torch import save_file

        directory = Path(tempfile.mkdtemp(prefix="tipsv2-ckpt-"))
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False)
        teacher = teacher_tensors(self.task, self.zero.stage)
        (directory / f"rng_rank{self.rank}.json").write_text(json.dumps(rng_state()))
        if self.rank == 0:
            save_file(teacher, str(directory / TEACHER_STATE))
            (directory / TRAINER_STATE).write_text(json.dumps(dataclasses.asdict(self.state)))
            write_history(self.plan.output, self.state.history)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         checkpoint_dir_name=f"step_{self.state.step:08d}")
        shutil.rmtree(directory, ignore_errors=True)

    # -- steps ------------------------------------------------------------------------------------
    def stream(self) -> RankStream:
        cfg = self.cfg
        masking = cfg.data.masking if self.plan.job.train.masked else None
        spec = StreamSpec(batch_size=cfg.data.batch_size, seed=cfg.seed, crops=cfg.data.crops,
                               captions=cfg.data.captions, masking=masking,
                               patch_size=model_config_of(cfg).vision.patch_size)
        tokenizer = Tokenizer(local_copy(self.plan.tokenizer), max_len=model_config_of(cfg).text.max_len)
        return RankStream(self.plan.source, ids=self.plan.ids, texts_ref=self.plan.texts_ref, spec=spec,
                               tokenizer=tokenizer, rank=self.rank, world=self.world,
                               start_micro=self.state.step * cfg.engine.grad_accum)

    def to_device(self, batch):
        batch = batch.to(self.device)
        if self.dtype == torch.float32:
            return batch
        floats = {f.name: getattr(batch, f.name).to(self.dtype) for f in dataclasses.fields(batch)
                  if isinstance(getattr(batch, f.name), torch.Tensor) and getattr(batch, f.name).is_floating_point()}
        return dataclasses.replace(batch, **floats)

    def nonfinite_terms(self, losses: dict[str, torch.Tensor]) -> list[str]:
        """Names of loss terms that are not finite on any rank (the same list on every rank)."""
        import torch.distributed as dist

        names = sorted(k for k in losses if k.startswith("loss/"))
        bad = torch.tensor([0.0 if torch.isfinite(losses[k].detach().float()).all() else 1.0 for k in names],
                           device=self.device)   # NCCL reduces CUDA tensors only
        if self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return [n for n, b in zip(names, bad.tolist()) if b > 0]

    def global_scalars(self, rows: list[dict[str, float]]) -> dict[str, float]:
        """Mean over micro-batches and ranks of every logged scalar."""
        import torch.distributed as dist

        keys = sorted(rows[0])
        values = torch.tensor([sum(r[k] for r in rows) / len(rows) for k in keys], dtype=torch.float64,
                              device=self.device)
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        return dict(zip(keys, values.tolist()))

    def memory(self) -> dict[str, float]:
        """Peak host memory of this worker, and of its GPU when it has one (MiB)."""
        out = {"memory/peak_rss_mb": peak_rss_mb()}
        if self.device.type == "cuda":
            out["memory/gpu_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return out

    def step(self, step: int, stream: RankStream) -> dict[str, float]:
        """One optimiser step over grad_accum micro-batches (pipelines.train.accumulate: the contrastive loss over
        all of them): the metrics row. A loss term that is not finite on any rank raises NonFiniteLoss on every
        rank, before the step is applied."""
        cfg = self.cfg
        lr = learning_rate(step, total_steps=cfg.steps, cfg=cfg.optim)
        set_learning_rates(self.optimizer, lr, self.scales)
        start = time.perf_counter()
        batches, waited = [], 0.0
        for _ in range(cfg.engine.grad_accum):
            before = time.perf_counter()
            epoch, batch = next(stream)
            waited += time.perf_counter() - before
            batches.append(self.to_device(batch))
        last, held = step + 1 == cfg.steps, []   # on the last step, the tensors held after backward and step
        parts = contrastive_parts(self.engine, batches, step=step, rank=self.rank,
                                  cfg=cfg.task.contrastive if self.plan.job.train.caches_contrastive else None,
                                  gather=all_gather_cat if self.world > 1 else identity)

        def check(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            losses = self.plan.faults.on_losses(step, losses)
            bad = self.nonfinite_terms(losses)
            if bad:
                values = {k: float(losses[k].detach().float()) for k in bad}
                raise NonFiniteLoss(f"non-finite loss at step {step} in {bad} (this rank: {values}); the step was "
                                    f"not applied and the last checkpoint is the last good state (lower optim.lr, "
                                    f"raise optim.warmup_steps, or check the input batch)")
            return losses

        def at_boundary() -> None:
            if last:
                held.append(live_tensor_mb(self.task.parameters()))
            if manual_clipping(cfg.engine, cfg.optim.clip_grad):
                torch.nn.utils.clip_grad_norm_([p for _, p in self.task.trainable_parameters()], cfg.optim.clip_grad)

        rows = [scalars(losses) | self.memory()
                for losses in optimizer_step(self.engine, batches, parts, step=step, check=check,
                                             at_boundary=at_boundary)]
        momentum = self.task.update_teacher(step=step, total_steps=cfg.steps, gathered=self.zero.gathered)
        row = self.global_scalars(rows)
        seconds = time.perf_counter() - start
        images = cfg.data.batch_size * cfg.engine.grad_accum * self.world
        row |= {"lr": lr, "ema_momentum": momentum, "epoch": epoch, "step": step,
                "images_per_s": images / seconds, "time/step_s": seconds, "time/data_wait_s": waited,
                "mfu": self.flops * images / seconds / (self.peak * self.world),
                "engine/skipped_steps": float(self.engine.skipped_steps)}   # fp16: steps its loss scaler dropped
        if last:   # once: a walk over every live object
            held.append(live_tensor_mb(self.task.parameters()))
            row["memory/live_tensors_mb"] = self.global_scalars([{"m": max(held)}])["m"]
        self.state.epoch = epoch
        return row

    def run(self) -> dict[str, Any]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()   # set when Ray Train restarted the workers after a failure
        if checkpoint is None and self.plan.resume_from is not None:
            fs, path = storage.filesystem(self.plan.resume_from)
            checkpoint = ray.train.Checkpoint(path, filesystem=fs)
        if checkpoint is not None:
            self.restore(checkpoint)
        if self.rank == 0:
            tracking = dataclasses.replace(self.cfg.tracking, uri=self.plan.tracking_uri or self.cfg.tracking.uri)
            self.sink = open_sink(tracking, output_root=self.plan.output, run_id=self.state.run_id)
        stream = self.stream()
        bar = Progress(self.plan.job.value, total=self.cfg.steps, done=self.state.step) if self.rank == 0 else None
        try:
            for step in range(self.state.step, self.cfg.steps):
                self.plan.faults.before_step(step, rank=self.rank, world=self.world, output=self.plan.output)
                try:
                    row = self.step(step, stream)
                except NonFiniteLoss as error:   # every rank stops here; the driver raises it again from STOP_FILE
                    message = str(error)
                    if self.rank == 0:
                        storage.write_json(storage.join(self.plan.output, STOP_FILE), {"step": step, "error": message})
                    return {"nonfinite": message}
                self.state.history.append(row)
                self.state.step = step + 1
                if bar is not None:
                    bar.update(loss=row["loss/total"])
                if step % self.cfg.log_every == 0 or step + 1 == self.cfg.steps:
                    self.sink.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
                if self.state.step % self.cfg.engine.checkpoint_every == 0 or self.state.step == self.cfg.steps:
                    self.save({"step": self.state.step, **{k: v for k, v in row.items() if k.startswith("loss/")}})
        finally:
            stream.close()
        self.export()
        return {}

    def export(self) -> None:
        """Gather the weights in float32 (ZeRO-3 partitions; in bf16/fp16 training, DeepSpeed's and the EMA's
        float32 masters, not the rounded 16-bit weights), then rank 0 writes <output>/export and logs the
        artifacts."""
        model, dino_head, patch_head, head_cfg = self.plan.job.train.export_parts(self.task, self.cfg)
        modules = (model, dino_head, patch_head)
        if self.dtype == torch.float32:
            with self.zero.whole([p for module in modules for p in module.parameters()]):
                states = [cpu_state(module) for module in modules] if self.rank == 0 else []
        else:
            masters = {id(p): m for p, m in teacher_masters(self.task)}
            masters |= self.zero.fp32_masters(self.optimizer)
            states = [master_state(module, masters) for module in modules]   # collectives: every rank
        if self.rank == 0:
            copies = cpu_copies(*states, model_cfg=model.cfg, head_cfg=head_cfg)
            tokenizer = Tokenizer(local_copy(self.plan.tokenizer), max_len=model.cfg.text.max_len)
            write_export(self.plan.output, *copies, head_cfg=head_cfg, sink=self.sink, tokenizer=tokenizer,
                         source=self.plan.source, image_size=self.cfg.data.crops.global_size)
            self.sink.close()


def train_worker(config: dict) -> None:
    """Ray Train's per-worker entry."""
    import ray.train

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    plan = config["plan"]
    if os.path.isdir(plan.cwd):   # Ray starts workers elsewhere; on another node the path may not exist
        os.chdir(plan.cwd)
    context = ray.train.get_context()
    Worker(plan, rank=context.get_world_rank(), world=context.get_world_size()).run()

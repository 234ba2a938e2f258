"""The shared training engine of pretraining and distillation: Ray Train TorchTrainer x DeepSpeed ZeRO.

`pipelines.pretrain` and `pipelines.distill` are thin entry points over `run(job, cfg, output)`:

    driver   config.json, data (synthetic Parquet if none), tokenizer, MLflow run, TorchTrainer.fit
    worker   TIPSv2Task / DistillTask -> deepspeed.initialize (ZeRO 0-3, fp32/bf16/fp16, accumulation,
             clipping, torch AdamW on tipsv2.optim.param_groups with the LR schedule set every step)
             -> steps over data.RankStream -> DeepSpeed checkpoints from every rank into Ray Train's
             storage (<output>/ray/train/step_XXXXXXXX) -> export on rank 0 (<output>/export/)

Checkpoints hold the DeepSpeed state of every rank plus `trainer_state.json` (step, epoch, MLflow run id,
loss history), `teacher.safetensors` (EMA teacher weights and center buffers, gathered, so ZeRO-3
restores them exactly) and `rng_rank<r>.json` (torch, numpy and Python RNG states). A worker restarted by
`FailureConfig(max_failures)` resumes from `ray.train.get_checkpoint()`; rerunning the same command after
the driver died resumes from the latest checkpoint found under the output. A run that reached its last
step is skipped.

A non-finite loss term on any rank stops every rank before the step is applied: the run ends with
`NonFiniteLoss` naming the step and the terms, and the last checkpoint is the last good state.

Metrics (rank 0 only, one MLflow run per job through pipelines.tracking): every loss term averaged over
ranks, lr, temperature, EMA momentum, images/s and an MFU estimate (analytic FLOPs / peak FLOP/s: a
table for known GPUs, a timed matmul on CPU, or TIPSV2_PEAK_FLOPS). Artifacts: config, the exported
model, patch-text similarity heatmaps of a few validation images.

Test-only fault injection (environment of the driver, handed to the workers): TIPSV2_FAIL_AT_STEP=k
makes the last rank exit hard once at step k; TIPSV2_NAN_AT_STEP=k makes the loss of step k NaN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from pipelines import cli, data, storage
from pipelines.estimate import log_plan
from pipelines.resources import Stage, training_request
from pipelines.tracking import MetricsSink, NullSink, open_sink
from pipelines.tracking import flatten as tracking_flatten
from tipsv2 import config_tree
from tipsv2.checkpoint import ModelSource, load_source, save_export
from tipsv2.configs import Config, Precision, model_config_of
from tipsv2.distill import DistillTask
from tipsv2.eval.features import patch_text_similarity
from tipsv2.flops import flops_per_example, peak_flops
from tipsv2.loop import NonFiniteLoss, scalars
from tipsv2.models.config import ModelConfig, VisionConfig
from tipsv2.models.heads import DinoHead, DinoHeadConfig
from tipsv2.models.model import TIPSModel, load_strict
from tipsv2.models.hf import export_hf
from tipsv2.models.official import export_official
from tipsv2.optim import TowerDepths, learning_rate, param_groups
from tipsv2.task import TIPSv2Task
from tipsv2.tokenizer import Tokenizer, train_tokenizer

RUN_NAME = "train"                     # Ray Train run directory under <output>/ray
TRAINER_STATE = "trainer_state.json"
TEACHER_STATE = "teacher.safetensors"
DS_TAG = "ds"
HISTORY_FILE = "history.jsonl"
STOP_FILE = "stopped.json"             # why the last run stopped early (a non-finite loss), for the driver
EXPORT_DIR = "export"
HF_DIR = "hf"                          # <output>/export/hf: the same model as a transformers Tipsv2Model directory
HEATMAP_IMAGES = 3


class Job(str, enum.Enum):
    PRETRAIN = "pretrain"
    DISTILL = "distill"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Knobs:
    """Test-only fault injection; None = off."""
    fail_at_step: int | None = None    # the last rank calls os._exit(1) once at the start of this step
    nan_at_step: int | None = None     # the total loss of this step is multiplied by NaN

    @staticmethod
    def from_env() -> Knobs:
        def read(name: str) -> int | None:
            value = os.environ.get(name)
            return int(value) if value not in (None, "") else None
        return Knobs(fail_at_step=read("TIPSV2_FAIL_AT_STEP"), nan_at_step=read("TIPSV2_NAN_AT_STEP"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything a worker needs, built once by the driver (picklable)."""
    job: Job
    cfg: Config
    output: str
    source: data.Source
    ids: list[str]
    texts_ref: Any                     # ObjectRef of data.read_texts(source)
    tokenizer: str                     # URI of the SentencePiece model
    run_id: str | None
    tracking_uri: str | None = None   # resolved by the driver, so rank 0 logs where the driver does
    resume_from: str | None = None    # URI of the checkpoint a rerun starts from (Ray Train's own comes first)
    knobs: Knobs = Knobs()
    cwd: str = dataclasses.field(default_factory=os.getcwd)   # the driver's: relative paths in cfg mean the same


@dataclasses.dataclass
class TrainerState:
    step: int = 0                      # next step to run
    epoch: int = 0
    run_id: str | None = None
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------- task construction (driver, workers, local)


def load_teacher(spec: str | None) -> tuple[TIPSModel, DinoHead | None, DinoHead | None]:
    """An exported model directory, "hf:DIR" (a transformers Tipsv2Model directory) or released
    `VISION.npz[,TEXT.npz]` checkpoints, local or s3://."""
    if not spec:
        raise ValueError("distillation needs a teacher: --set teacher=EXPORT_DIR, teacher=hf:DIR or "
                         "teacher=VISION.npz[,TEXT.npz]")
    return load_source(ModelSource.parse(spec), fetch=local_copy)


def local_copy(uri: str) -> str:
    """A local path holding `uri` (a file or a directory); S3 objects are downloaded to a temp dir."""
    if not storage.is_s3(uri):
        return uri
    target = Path(tempfile.mkdtemp(prefix="tipsv2-fetch-"))
    if not storage.is_dir(uri):  # a single object
        name = target / uri.rstrip("/").rsplit("/", 1)[-1]
        name.write_bytes(storage.read_bytes(uri))
        return str(name)
    for file in storage.list_files(uri):
        relative = file[len(uri.rstrip("/")) + 1:]
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        (target / relative).write_bytes(storage.read_bytes(file))
    return str(target)


def build_task(job: Job, cfg: Config, *, gather=None, reduce_mean=None, reduce_sum=None,
               rank: int = 0) -> nn.Module:
    """The module DeepSpeed wraps, seeded by cfg.seed so every rank (and the local loop) builds the same one."""
    collectives = {k: v for k, v in {"gather": gather, "reduce_mean": reduce_mean, "reduce_sum": reduce_sum}.items()
                   if v is not None}
    if job == Job.PRETRAIN:
        init = load_source(ModelSource.parse(cfg.init), fetch=local_copy) if cfg.init else None
        torch.manual_seed(cfg.seed)
        task = TIPSv2Task(cfg.task, rank=rank, **collectives)
        if init is not None:
            task.initialise_from(*init)
        return task
    # Loaded before seeding, as tipsv2.distill_loop.distill_local does: the student's init is the same.
    teacher, dino_head, patch_head = load_teacher(cfg.teacher)
    student = load_source(ModelSource.parse(cfg.student_init), fetch=local_copy)[0] if cfg.student_init else None
    torch.manual_seed(cfg.seed)
    return DistillTask(cfg.task, teacher=teacher, teacher_dino_head=dino_head, teacher_patch_head=patch_head,
                       student=student, rank=rank, **collectives)


def export_parts(task: nn.Module, cfg: Config) -> tuple[TIPSModel, DinoHead, DinoHead, DinoHeadConfig]:
    """(model, DINO head, patch head, head config) to export: the EMA teacher heads when pretraining,
    the student's own heads when distilling."""
    if isinstance(task, TIPSv2Task):
        return task.model, task.teacher_dino_head, task.teacher_patch_head, cfg.task.head
    head = cfg.task.head
    prototypes = int(getattr(task.dino_head.prototypes, "ds_shape", task.dino_head.prototypes.shape)[0])
    return task.student, task.dino_head, task.patch_head, DinoHeadConfig(
        prototypes=prototypes, hidden=head.hidden, bottleneck=head.bottleneck, layers=head.layers)


def teacher_vision(task: nn.Module) -> VisionConfig | None:
    """The frozen teacher's vision config when distilling; None when the teacher is the student's size."""
    return task.teacher.cfg.vision if isinstance(task, DistillTask) else None


def ema_modules(task: nn.Module) -> list[nn.Module]:
    return [teacher for teacher, _ in task.ema_pairs()] if hasattr(task, "ema_pairs") else []


# ---------------------------------------------------------------- DeepSpeed


def manual_clipping(cfg: Config) -> bool:
    """ZeRO-0 in fp32 clips with DeepSpeed's own clip_grad_norm_, which fails on 0-dim parameters
    (log_temperature) in DeepSpeed 0.19: the engine clips with torch's instead (same global norm)."""
    return cfg.engine.zero_stage == 0 and cfg.engine.precision == Precision.FP32 and cfg.optim.clip_grad > 0


def deepspeed_config(cfg: Config, *, world: int) -> dict:
    engine = cfg.engine
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": engine.grad_accum,
        "train_batch_size": cfg.data.batch_size * engine.grad_accum * world,
        "gradient_clipping": 0.0 if manual_clipping(cfg) else float(cfg.optim.clip_grad),
        # DeepSpeed's default buckets (5e8 elements) cost ZeRO-3 a 1.9 GB fp32 buffer per worker
        "zero_optimization": {"stage": engine.zero_stage, "reduce_bucket_size": engine.bucket_size,
                              "allgather_bucket_size": engine.bucket_size,
                              "stage3_prefetch_bucket_size": engine.bucket_size},
        "bf16": {"enabled": engine.precision == Precision.BF16},
        "fp16": {"enabled": engine.precision == Precision.FP16, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,     # torch AdamW with per-group lr_scale
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather, concatenated in rank order: (B_local, ...) -> (B_local * world, ...)."""
    import torch.distributed.nn.functional as dist_nn
    return torch.cat(dist_nn.all_gather(x), dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    out = x.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    out = x.detach().clone()
    dist.all_reduce(out)
    return out


def gathered_factory(stage: int) -> Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]:
    """ZeRO-3 partitions every parameter: the EMA update needs them whole, and rank 0's result is kept."""
    if stage != 3:
        return lambda params: contextlib.nullcontext()
    import deepspeed
    return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def whole_parameters(stage: int, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """Read-only gather of partitioned parameters (a no-op below ZeRO-3); a collective: call on every rank."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def broadcast_scalars_safely() -> None:
    """Work around DeepSpeed 0.19's initial broadcasts, which view every parameter as bytes and fail on
    0-dim ones (TIPSModel.log_temperature): the engine's (ZeRO 0-2) and ZeRO-3's partitioning broadcast
    such a parameter through a 1-element view of the same storage instead. Shapes are unchanged."""
    import deepspeed.comm as ds_dist
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    if getattr(DeepSpeedEngine._broadcast_model, "tipsv2_scalar_safe", False):
        return
    engine_broadcast, zero_init_param = DeepSpeedEngine._broadcast_model, Init._zero_init_param

    def broadcast_model(engine) -> None:
        scalars = [p for p in engine.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)
        try:
            engine_broadcast(engine)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    def init_param(init, param) -> None:
        if param.dim() != 0:
            return zero_init_param(init, param)
        init._convert_to_deepspeed_param(param)
        group = init.get_partition_dp_group(param)
        source = 0 if ds_dist.get_world_group() == group else ds_dist.get_global_rank(group, 0)
        ds_dist.broadcast(param.data.reshape(1).view(torch.uint8), source, group)
        param.partition()

    broadcast_model.tipsv2_scalar_safe = True
    DeepSpeedEngine._broadcast_model = broadcast_model
    Init._zero_init_param = init_param


def zero3_sees_dataclasses() -> None:
    """ZeRO-3 re-gathers a module's parameters for backward through hooks on the tensors its forward
    returns, found by walking tuples, lists and dicts only; VisionTransformer returns ImageFeatures, a
    dataclass. Teach DeepSpeed 0.19's walk (used by parameter_offload) to go through dataclass fields."""
    from deepspeed.runtime.zero import parameter_offload, utils

    walk = utils.apply_to_tensors_only
    if getattr(walk, "tipsv2_dataclasses", False):
        return

    def apply(function, value, warning_msg_fn=None):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.replace(value, **{f.name: apply(function, getattr(value, f.name), warning_msg_fn)
                                                 for f in dataclasses.fields(value) if f.init})
        if isinstance(value, (tuple, list)) and any(dataclasses.is_dataclass(v) for v in value):
            return value.__class__(apply(function, v, warning_msg_fn) for v in value)
        return walk(function, value, warning_msg_fn)

    apply.tipsv2_dataclasses = True
    utils.apply_to_tensors_only = apply
    parameter_offload.apply_to_tensors_only = apply


def register_external_parameters(task: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters when its forward runs; TIPSModel's own parameters
    (log_temperature) are read through a property instead, so they are declared to the task."""
    import deepspeed
    for module in task.modules():
        if isinstance(module, TIPSModel):
            for param in module.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(task, param)


def set_learning_rates(optimizer, lr: float, scales: list[float]) -> None:
    groups = optimizer.param_groups
    if len(groups) != len(scales):
        raise RuntimeError(f"the engine's optimizer has {len(groups)} param groups, expected {len(scales)}")
    for group, scale in zip(groups, scales):
        group["lr"] = lr * scale


# ---------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    """Every generator a step draws from: torch's (CPU, and the current GPU's: drop-path on CUDA), numpy's,
    Python's."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(),
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def ema_parameters(task: nn.Module) -> list[nn.Parameter]:
    """The EMA teacher's parameters, in its masters' order."""
    return [p for module in ema_modules(task) for p in module.parameters()]


def ema_masters(task: nn.Module) -> list[torch.Tensor] | None:
    """The EMA's float32 masters (16-bit training), aligned with ema_parameters(task)."""
    masters = getattr(task, "ema_masters", None)
    return None if masters is None else [m for group in masters for m in group]


def teacher_masters(task: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(teacher parameter, its float32 master) for every EMA parameter; none outside 16-bit training."""
    masters = ema_masters(task)
    return [] if masters is None else list(zip(ema_parameters(task), masters, strict=True))


def teacher_tensors(task: nn.Module, stage: int) -> dict[str, torch.Tensor]:
    """EMA teacher parameters (their float32 masters in 16-bit training) and every buffer, whole and on
    CPU (a collective under ZeRO-3)."""
    names = {id(p): n for n, p in task.named_parameters(remove_duplicate=False)}
    params = ema_parameters(task)
    with whole_parameters(stage, params):
        values = ema_masters(task) or [p.detach() for p in params]
        state = {names[id(p)]: v.float().cpu().clone() for p, v in zip(params, values, strict=True)}
    state |= {f"buffer.{n}": b.detach().float().cpu().clone() for n, b in task.named_buffers()}
    return state


def load_teacher_tensors(task: nn.Module, state: dict[str, torch.Tensor], stage: int) -> None:
    named = dict(task.named_parameters(remove_duplicate=False))
    params = [named[n] for n in state if not n.startswith("buffer.")]
    buffers = dict(task.named_buffers())
    with torch.no_grad():
        with gathered_factory(stage)(params):
            for name, value in state.items():
                if not name.startswith("buffer."):
                    named[name].data.copy_(value.to(named[name].dtype))
        names = {id(p): n for n, p in named.items()}
        for param, master in teacher_masters(task):
            master.copy_(state[names[id(param)]])
        for name, value in state.items():
            if name.startswith("buffer."):
                target = buffers[name[len("buffer."):]]
                target.copy_(value.to(target.dtype))


def latest_checkpoint(output: str) -> str | None:
    """URI of the newest complete checkpoint under <output>/ray/<run> (highest step), or None."""
    marks = storage.list_files(storage.join(output, "ray", RUN_NAME), suffixes=(TRAINER_STATE,))
    best, best_step = None, -1
    for mark in marks:
        directory = mark[: -len(TRAINER_STATE) - 1]
        step = int(storage.read_json(mark)["step"])
        if step > best_step:
            best, best_step = directory, step
    return best


def read_trainer_state(checkpoint_dir: str) -> TrainerState:
    raw = storage.read_json(storage.join(checkpoint_dir, TRAINER_STATE))
    return TrainerState(step=raw["step"], epoch=raw["epoch"], run_id=raw.get("run_id"), history=raw["history"])


def write_history(output: str, history: list[dict[str, float]]) -> None:
    storage.write_bytes(storage.join(output, HISTORY_FILE), "".join(json.dumps(r) + "\n" for r in history).encode())


def read_history(output: str) -> list[dict[str, float]]:
    uri = storage.join(output, HISTORY_FILE)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line]


# ---------------------------------------------------------------- the worker


class Worker:
    """One Ray Train rank: engine, data stream, state; `run()` trains to cfg.steps."""

    def __init__(self, plan: Plan, *, rank: int, world: int) -> None:
        self.plan, self.cfg = plan, plan.cfg
        self.rank, self.world = rank, world
        self.device = self._init_distributed()
        import deepspeed

        multi = self.world > 1
        self.task = build_task(plan.job, self.cfg, gather=all_gather_cat if multi else None,
                               reduce_mean=all_reduce_mean if multi else None,
                               reduce_sum=all_reduce_sum if multi else None, rank=self.rank)
        self.stage = self.cfg.engine.zero_stage
        groups = param_groups(self.task.trainable_parameters(), self.cfg.optim,
                              depths=TowerDepths.of(model_config_of(self.cfg)))
        self.scales = [g["lr_scale"] for g in groups]
        optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                      lr=self.cfg.optim.lr, betas=self.cfg.optim.betas)
        broadcast_scalars_safely()
        if self.stage == 3:
            zero3_sees_dataclasses()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.task, optimizer=optimizer, config=deepspeed_config(self.cfg, world=self.world),
            dist_init_required=False)
        if self.stage == 3:
            register_external_parameters(self.task)
        self.dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(self.cfg.engine.precision,
                                                                                        torch.float32)
        if self.dtype != torch.float32 and hasattr(self.task, "keep_ema_masters"):
            self.task.keep_ema_masters(gathered_factory(self.stage))   # the engine cast the teacher too
        self.state = TrainerState(run_id=plan.run_id)
        self.sink: MetricsSink = NullSink()
        self.flops = flops_per_example(self.cfg, teacher_vision(self.task))
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
            load_teacher_tensors(self.task, load_file(str(root / TEACHER_STATE)), self.stage)
            set_rng_state(json.loads(rng.read_text()))
            raw = json.loads((root / TRAINER_STATE).read_text())
        self.state = TrainerState(step=raw["step"], epoch=raw["epoch"], run_id=raw.get("run_id") or self.plan.run_id,
                                  history=raw["history"])

    def save(self, metrics: dict[str, float]) -> None:
        import ray.train
        from safetensors.torch import save_file

        directory = Path(tempfile.mkdtemp(prefix="tipsv2-ckpt-"))
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False)
        teacher = teacher_tensors(self.task, self.stage)
        (directory / f"rng_rank{self.rank}.json").write_text(json.dumps(rng_state()))
        if self.rank == 0:
            save_file(teacher, str(directory / TEACHER_STATE))
            (directory / TRAINER_STATE).write_text(json.dumps(dataclasses.asdict(self.state)))
            write_history(self.plan.output, self.state.history)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         checkpoint_dir_name=f"step_{self.state.step:08d}")
        shutil.rmtree(directory, ignore_errors=True)

    # -- steps ------------------------------------------------------------------------------------
    def stream(self) -> data.RankStream:
        cfg = self.cfg
        masking = cfg.data.masking if self.plan.job == Job.PRETRAIN else None
        spec = data.StreamSpec(batch_size=cfg.data.batch_size, seed=cfg.seed, crops=cfg.data.crops,
                               captions=cfg.data.captions, masking=masking,
                               patch_size=model_config_of(cfg).vision.patch_size)
        tokenizer = Tokenizer(local_copy(self.plan.tokenizer), max_len=model_config_of(cfg).text.max_len)
        return data.RankStream(self.plan.source, ids=self.plan.ids, texts_ref=self.plan.texts_ref, spec=spec,
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

    def maybe_fail(self, step: int) -> None:
        knob = self.plan.knobs.fail_at_step
        if knob != step or self.rank != self.world - 1:
            return
        marker = storage.join(self.plan.output, f"_failed_once_at_{step}")
        if storage.exists(marker):
            return
        storage.write_bytes(marker, b"")
        os._exit(1)

    def step(self, step: int, stream: data.RankStream) -> dict[str, float] | str:
        """One optimiser step over grad_accum micro-batches; the metrics row, or a non-finite message."""
        cfg = self.cfg
        lr = learning_rate(step, total_steps=cfg.steps, cfg=cfg.optim)
        set_learning_rates(self.optimizer, lr, self.scales)
        start = time.perf_counter()
        rows, waited = [], 0.0
        last, held = step + 1 == cfg.steps, []   # on the last step, the tensors held after backward and step
        for _ in range(cfg.engine.grad_accum):
            before = time.perf_counter()
            epoch, batch = next(stream)
            waited += time.perf_counter() - before
            losses = self.engine(self.to_device(batch), step)
            if self.plan.knobs.nan_at_step == step:
                losses["loss/total"] = losses["loss/total"] * float("nan")
            bad = self.nonfinite_terms(losses)
            if bad:
                values = {k: float(losses[k].detach().float()) for k in bad}
                return (f"non-finite loss at step {step} in {bad} (this rank: {values}); the step was not applied "
                        f"and the last checkpoint is the last good state (lower optim.lr, raise "
                        f"optim.warmup_steps, or check the input batch)")
            self.engine.backward(losses["loss/total"])
            if last:
                held.append(live_tensor_mb(self.task.parameters()))
            if manual_clipping(cfg) and self.engine.is_gradient_accumulation_boundary():
                torch.nn.utils.clip_grad_norm_([p for _, p in self.task.trainable_parameters()], cfg.optim.clip_grad)
            self.engine.step()
            rows.append(scalars(losses) | self.memory())
        momentum = self.task.update_teacher(step=step, total_steps=cfg.steps, gathered=gathered_factory(self.stage))
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
                self.maybe_fail(step)
                row = self.step(step, stream)
                if isinstance(row, str):
                    if self.rank == 0:
                        storage.write_json(storage.join(self.plan.output, STOP_FILE), {"step": step, "error": row})
                    return {"nonfinite": row}
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
        model, dino_head, patch_head, head_cfg = export_parts(self.task, self.cfg)
        modules = (model, dino_head, patch_head)
        if self.dtype == torch.float32:
            with whole_parameters(self.stage, [p for module in modules for p in module.parameters()]):
                states = [cpu_state(module) for module in modules] if self.rank == 0 else []
        else:
            masters = {id(p): m for p, m in teacher_masters(self.task)}
            if self.stage == 0:
                masters |= stage0_masters(self.optimizer)
            states = [master_state(module, masters) for module in modules]   # collectives: every rank
        if self.rank == 0:
            copies = cpu_copies(*states, model_cfg=model.cfg, head_cfg=head_cfg)
            tokenizer = Tokenizer(local_copy(self.plan.tokenizer), max_len=model.cfg.text.max_len)
            write_export(self.plan.output, *copies, head_cfg=head_cfg, sink=self.sink, tokenizer=tokenizer,
                         source=self.plan.source, image_size=self.cfg.data.crops.global_size)
            self.sink.close()


class Progress:
    """A one-line progress bar printed every `every_s` seconds and at the end: it reads the same on a
    terminal, through Ray's log forwarding and in `ray job logs` (no carriage returns)."""

    WIDTH = 24

    def __init__(self, name: str, *, total: int, done: int = 0, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] | None = None) -> None:
        self.name, self.total, self.done, self.every_s = name, total, done, every_s
        self.clock, self.emit = clock, emit or (lambda line: print(line, flush=True))
        self.start = self.last = clock()
        self.first = done

    def update(self, *, loss: float, steps: int = 1) -> None:
        self.done += steps
        now = self.clock()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            self.emit(self.line(now, loss))

    def line(self, now: float, loss: float) -> str:
        filled = self.WIDTH * self.done // max(self.total, 1)
        rate = (self.done - self.first) / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"[{self.name}] |{'#' * filled}{'.' * (self.WIDTH - filled)}| {self.done}/{self.total} steps, "
                f"{rate:.2f} step/s, {now - self.start:.0f} s elapsed, eta {eta:.0f} s, loss {loss:.4g}")


@contextlib.contextmanager
def checkpoint_directory(checkpoint, rank: int) -> Iterator[Path]:
    """The checkpoint as a local directory: itself when local, else a download private to this rank.
    Ray's shared download (`Checkpoint.as_directory`) races when several ranks on one node read a
    remote checkpoint at once: one rank deletes the shared copy while another still waits for it."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    directory = Path(tempfile.mkdtemp(prefix=f"tipsv2-restore-rank{rank}-"))
    try:
        checkpoint.to_directory(str(directory))
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def live_tensor_mb(parameters=()) -> float:
    """MiB held by every live tensor storage of this process (weights, gradients, optimizer state and
    ZeRO's flat buffers, each storage counted once): what ZeRO's sharding shrinks, unlike the RSS peak,
    which also holds freed allocator pages and library code. Gradients that autograd made in C++ have no
    Python object for the walk to find, so the parameters' `.grad` are counted explicitly."""
    import gc
    import warnings

    storages: dict[int, int] = {}

    def count(t: torch.Tensor) -> None:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for p in parameters:
        if p.grad is not None:
            count(p.grad)
    with warnings.catch_warnings():   # isinstance() on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    count(obj)
            except (RuntimeError, ReferenceError):   # tensors without storage (sparse, freed weakrefs)
                continue
    storages.pop(0, None)   # empty storages
    return sum(storages.values()) / 2 ** 20


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB), Linux."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict in float32 on CPU (its parameters gathered first, under ZeRO-3)."""
    return {k: v.detach().float().cpu() for k, v in module.state_dict().items()}


def stage0_masters(optimizer) -> dict[int, torch.Tensor]:
    """DeepSpeed's float32 copies of 16-bit parameters at ZeRO stage 0, by parameter id: its FP16 optimizers
    (bf16 at stage 0 uses them too) keep them outside the fragment maps that safe_get_full_fp32_param reads."""
    low = getattr(optimizer, "fp16_groups", [])
    high = getattr(optimizer, "fp32_groups", None)   # the unfused optimizer: one copy per parameter
    if high is None and hasattr(optimizer, "fp32_groups_flat"):   # the fused one: a flat copy per group
        from torch._utils import _unflatten_dense_tensors
        high = [_unflatten_dense_tensors(flat, group) for flat, group in zip(optimizer.fp32_groups_flat, low)]
    return {id(p): m for lows, highs in zip(low, high or []) for p, m in zip(lows, highs, strict=True)}


def master_state(module: nn.Module, masters: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cpu_state of a module trained in 16 bits, from the float32 masters: `masters` (by parameter id: the
    EMA's, ZeRO stage 0's) or else DeepSpeed's partitioned ones (ZeRO 1-3; one collective per parameter:
    call on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state, rounded = {}, []
    for name, param in module.named_parameters():
        value = masters.get(id(param))
        if value is None:
            value = safe_get_full_fp32_param(param)
        if value is None:   # outside the optimiser and the EMA: no float32 copy anywhere (none such today)
            value = param.detach()
            rounded.append(name)
        state[name] = value.detach().float().cpu().reshape(getattr(param, "ds_shape", param.shape))
    if rounded:
        print(f"export: {len(rounded)} parameters ({rounded[0]}, ...) have no float32 master; their 16-bit "
              f"values are exported", flush=True)
    return state | {name: b.detach().float().cpu() for name, b in module.named_buffers()}


def cpu_copies(model_state: dict[str, torch.Tensor], dino_state: dict[str, torch.Tensor],
               patch_state: dict[str, torch.Tensor], *, model_cfg: ModelConfig,
               head_cfg: DinoHeadConfig) -> tuple[TIPSModel, DinoHead, DinoHead]:
    """Fresh float32 CPU modules holding the exported weights."""
    fresh_model = TIPSModel(model_cfg)
    load_strict(fresh_model, model_state, source="the trained model")
    heads = []
    for state in (dino_state, patch_state):
        fresh = DinoHead(fresh_model.width, head_cfg)
        load_strict(fresh, state, source="a head")
        heads.append(fresh)
    return fresh_model, heads[0], heads[1]


def train_worker(config: dict) -> None:
    """Ray Train's per-worker entry."""
    import ray.train

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    plan = config["plan"]
    if os.path.isdir(plan.cwd):   # Ray starts workers elsewhere; on another node the path may not exist
        os.chdir(plan.cwd)
    context = ray.train.get_context()
    Worker(plan, rank=context.get_world_rank(), world=context.get_world_size()).run()


# ---------------------------------------------------------------- export and heatmaps (rank 0 / local)


def write_export(output: str, model: TIPSModel, dino_head: DinoHead, patch_head: DinoHead, *,
                 head_cfg: DinoHeadConfig, sink: MetricsSink, tokenizer: Tokenizer, source: data.Source,
                 image_size: int) -> str:
    """<output>/export: model.safetensors + config.json + heads, the official .npz pair, the transformers
    directory `hf/` (tipsv2.models.hf), heatmap PNGs."""
    with tempfile.TemporaryDirectory(prefix="tipsv2-export-") as tmp:
        root = Path(tmp) / EXPORT_DIR
        save_export(root, model=model, dino_head=dino_head, patch_head=patch_head, head_cfg=head_cfg)
        export_official(model, root / "official_vision.npz", root / "official_text.npz")
        export_hf(model, tokenizer, root / HF_DIR)
        heatmaps = Path(tmp) / "heatmaps"
        heatmaps.mkdir()
        for index, record in enumerate(data.read_validation(source, HEATMAP_IMAGES)):
            plot_heatmap(model, tokenizer, record, image_size=image_size, path=heatmaps / f"heatmap_{index}.png")
        target = storage.join(output, EXPORT_DIR)
        for path in sorted(root.rglob("*")):
            if path.is_file():
                storage.write_bytes(storage.join(target, str(path.relative_to(root))), path.read_bytes())
        for path in sorted(heatmaps.iterdir()):
            storage.write_bytes(storage.join(output, "heatmaps", path.name), path.read_bytes())
        sink.log_artifact(root, EXPORT_DIR)
        sink.log_artifact(heatmaps, "heatmaps")
    return target


@torch.no_grad()
def plot_heatmap(model: TIPSModel, tokenizer: Tokenizer, record, *, image_size: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tipsv2.data.batch import decode_image
    from tipsv2.eval.features import resize_center_crop, to_tensor

    image = resize_center_crop(decode_image(record.image, example_id=record.id), image_size)
    texts = [t.strip() for t in (record.alt_text or "an object").split(",") if t.strip()][:3]
    maps = patch_text_similarity(model, tokenizer, to_tensor(image), texts)
    figure, axes = plt.subplots(1, 1 + len(texts), figsize=(3 * (1 + len(texts)), 3))
    axes[0].imshow(image)
    axes[0].set_title(record.id[:12])
    for axis, text, values in zip(axes[1:], texts, maps):
        axis.imshow(image)
        axis.imshow(values.numpy(), cmap="jet", alpha=0.5, extent=(0, image_size, image_size, 0),
                    interpolation="bilinear")
        axis.set_title(text[:30])
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


# ---------------------------------------------------------------- the driver


def prepare_tokenizer(cfg: Config, output: str, texts) -> str:
    """URI of the SentencePiece model: the configured one, or one trained on the texts once per output."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    uri = storage.join(output, "tokenizer", "spm.model")
    if not storage.exists(uri):
        with tempfile.TemporaryDirectory() as tmp:
            path = train_tokenizer(data.texts_for_tokenizer(texts), vocab_size=cfg.data.tokenizer_vocab,
                                   out_path=Path(tmp) / "spm.model")
            storage.write_bytes(uri, Path(path).read_bytes())
    return uri


def local_ray_cpus(cfg: Config) -> int:
    """Logical CPUs for a local Ray: the workers plus room for Ray Data (2 deadlocks with Data + Train)."""
    return max(4, math.ceil(cfg.engine.workers * cfg.engine.cpus_per_worker) + 2)


def rank_request(job: Job, engine) -> dict[str, float]:
    """What one Ray Train rank asks for (pipelines.resources.training_request)."""
    return training_request(Stage(job.value), use_gpu=engine.use_gpu, cpus_per_worker=engine.cpus_per_worker)


def worker_resources(request: dict[str, float]) -> dict[str, float]:
    """The production request per GPU rank, fitted to a local Ray this process started (one GPU machine):
    there, accelerator pins the node does not advertise are dropped and CPUs capped at what it has."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return request
    available = ray.cluster_resources()
    fitted = {k: v for k, v in request.items() if k in ("CPU", "GPU") or k in available}
    if "CPU" in fitted:
        fitted["CPU"] = min(fitted["CPU"], max(1.0, available.get("CPU", 1.0) // max(1.0, available.get("GPU", 1.0))))
    if fitted != request:
        print(f"local Ray: per-worker request {request} fitted to this machine as {fitted}")
    return fitted


def fit(plan: Plan):
    """One TorchTrainer run into <output>/ray/train; the workers resume from plan.resume_from if set."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    engine = plan.cfg.engine
    resources = rank_request(plan.job, engine)
    if engine.use_gpu:
        resources = worker_resources(resources)
    fs, path = storage.filesystem(storage.join(plan.output, "ray"))
    trainer = TorchTrainer(
        train_worker, train_loop_config={"plan": plan},
        torch_config=TorchConfig(backend="nccl" if engine.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=engine.workers, use_gpu=engine.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=engine.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=engine.keep_checkpoints)))
    return trainer.fit()


def check_same_config(output: str, cfg: Config, *, resuming: bool) -> None:
    """Resuming continues the run in `output`: refuse when its config.json differs from `cfg`."""
    uri = storage.join(output, cli.CONFIG_FILE)
    if not resuming or not storage.exists(uri):
        return
    old = tracking_flatten(storage.read_json(uri))
    new = tracking_flatten(json.loads(json.dumps(config_tree.to_dict(cfg), default=str)))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        raise ValueError(f"{output} holds checkpoints of a run with another config (changed: {changed[:8]}); "
                         "resume with the same config or train into a new --output")


def run(job: Job, cfg: Config, output: str, *, local: bool = False, knobs: Knobs | None = None) -> dict[str, Any]:
    """Train `cfg` into `output` (local path or s3://); resumes or skips a previous run there."""
    clock = cli.Stopwatch()
    summary_uri = storage.join(output, cli.SUMMARY_FILE)
    if storage.exists(summary_uri):
        previous = storage.read_json(summary_uri)
        if previous.get("complete") and previous.get("config") == config_tree.to_dict(cfg):
            print(f"{job.value}: {output} already holds a finished run of this config; nothing to do")
            return previous
    resume_from = None if local else latest_checkpoint(output)
    check_same_config(output, cfg, resuming=resume_from is not None)
    cli.write_resolved_config(output, cfg)
    source = data.prepare_source(cfg.data, output)
    texts = data.read_texts(source)
    tokenizer = prepare_tokenizer(cfg, output, texts)
    run_id = read_trainer_state(resume_from).run_id if resume_from else None
    sink = open_sink(cfg.tracking, output_root=output, run_id=run_id)
    if run_id is None:
        sink.log_params(config_tree.to_dict(cfg))
        log_plan(sink, Stage(job.value), cfg)   # the plan's images/s, step time and memory, beside the run's
        sink.set_tags({"tipsv2.job": job.value, "tipsv2.output": output, "tipsv2.engine": "local" if local else "ray"})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / cli.CONFIG_FILE
            path.write_text(json.dumps(config_tree.to_dict(cfg), indent=2, default=str))
            sink.log_artifact(path)
    try:
        if local:
            history = train_here(job, cfg, output=output, source=source, texts=texts, tokenizer=tokenizer, sink=sink)
        else:
            history = train_distributed(job, cfg, output=output, source=source, texts=texts, tokenizer=tokenizer,
                                        run_id=sink.run_id, tracking_uri=getattr(sink, "uri", None),
                                        resume_from=resume_from, knobs=knobs or Knobs.from_env())
    except BaseException:
        sink.close("FAILED")
        raise
    summary = {"job": job.value, "complete": True, "config": config_tree.to_dict(cfg), "engine": "local" if local else "ray",
               "read": dataclasses.asdict(source), "rows": len(texts), "steps": len(history),
               "final": {k: v for k, v in history[-1].items() if k.startswith("loss/")} if history else {},
               "written": {"export": storage.join(output, EXPORT_DIR), "history": storage.join(output, HISTORY_FILE),
                           "checkpoints": storage.join(output, "ray", RUN_NAME)},
               "mlflow_run_id": sink.run_id, "wall_s": clock.seconds()}
    cli.write_summary(output, summary)
    sink.close()
    return summary


def train_distributed(job: Job, cfg: Config, *, output: str, source: data.Source, texts, tokenizer: str,
                      run_id: str | None, tracking_uri: str | None, resume_from: str | None,
                      knobs: Knobs) -> list[dict[str, float]]:
    import ray

    cli.init_ray(0 if cfg.engine.use_gpu else local_ray_cpus(cfg))   # GPU machines: Ray counts the CPUs
    plan = Plan(job=job, cfg=cfg, output=output, source=source, ids=texts.column("id").to_pylist(),
                texts_ref=ray.put(texts), tokenizer=tokenizer, run_id=run_id, tracking_uri=tracking_uri,
                resume_from=resume_from, knobs=knobs)
    stop = storage.join(output, STOP_FILE)
    storage.delete(stop)
    fit(plan)
    if storage.exists(stop):
        raise NonFiniteLoss(storage.read_json(stop)["error"])
    return read_history(output)


# ---------------------------------------------------------------- one process, no Ray (--local)


def train_local_task(job: Job, cfg: Config, *, records, tokenizer: Tokenizer,
                     on_step: Callable[[int, dict[str, float]], None]) -> nn.Module:
    """tipsv2.loop's plain loop: train_local when pretraining, loop.fit on the DistillTask (the same as
    tipsv2.distill_loop.distill_local, plus `student_init`) when distilling."""
    from tipsv2.loop import endless, fit, train_local

    if job == Job.PRETRAIN:
        init = load_source(ModelSource.parse(cfg.init), fetch=local_copy) if cfg.init else None
        return train_local(cfg, records=records, tokenizer=tokenizer, on_step=on_step, init=init).task
    task = build_task(job, cfg)
    vision = cfg.task.student.vision
    stream = endless(records, data=cfg.data, seed=cfg.seed, patch_size=vision.patch_size, tokenizer=tokenizer,
                     masked=False)
    return fit(task, stream=stream, optim=cfg.optim, steps=cfg.steps, depths=TowerDepths.of(cfg.task.student),
               on_step=on_step).task


def train_here(job: Job, cfg: Config, *, output: str, source: data.Source, texts, tokenizer: str,
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

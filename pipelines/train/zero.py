"""Every DeepSpeed fact the trainer relies on: its config, the collectives the task is handed, what a ZeRO stage
means for the rest of the code (`Zero`), where DeepSpeed keeps float32 masters, and the DeepSpeed 0.19 patches.

deepspeed is imported inside the functions that need it: importing this module must not load it.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from pipelines.train.config import EngineConfig
from tipsv2.configs import Precision
from tipsv2.models.model import TIPSModel


@dataclasses.dataclass(frozen=True)
class Zero:
    """The ZeRO stage, decided once at start-up: the rest of the trainer asks this object instead of testing
    the stage number."""
    stage: int

    @property
    def partitioned(self) -> bool:
        """ZeRO-3: every parameter is split across ranks; reading one whole is a collective."""
        return self.stage == 3

    def gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        """ZeRO-3 partitions every parameter: the EMA update needs them whole, and rank 0's result is kept."""
        if not self.partitioned:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    def whole(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        """Read-only gather of partitioned parameters (a no-op below ZeRO-3); a collective: call on every rank."""
        if not self.partitioned:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def patch_deepspeed(self) -> None:
        """The DeepSpeed 0.19 patches this stage needs, applied before deepspeed.initialize."""
        broadcast_scalars_safely()
        if self.partitioned:
            zero3_sees_dataclasses()

    def after_initialize(self, task: nn.Module, optimizer) -> int:
        """What this stage needs right after deepspeed.initialize (`optimizer`: the engine's): ZeRO-3 is told of
        parameters read outside a module's forward, and its partition padding is set to zero
        (`clear_partition_padding`). Returns the padding elements zeroed on this rank."""
        if not self.partitioned:
            return 0
        register_external_parameters(task)
        return clear_partition_padding(optimizer)

    def fp32_masters(self, optimizer) -> dict[int, torch.Tensor]:
        """DeepSpeed's float32 masters that `master_state` cannot find itself (ZeRO stage 0), by parameter id."""
        return stage0_masters(optimizer) if self.stage == 0 else {}


def manual_clipping(engine: EngineConfig, clip_grad: float) -> bool:
    """ZeRO-0 in fp32 clips with DeepSpeed's own clip_grad_norm_, which fails on 0-dim parameters
    (log_temperature) in DeepSpeed 0.19: the engine clips with torch's instead (same global norm)."""
    return engine.zero_stage == 0 and engine.precision == Precision.FP32 and clip_grad > 0


def deepspeed_config(engine: EngineConfig, *, batch_size: int, clip_grad: float, world: int) -> dict:
    """DeepSpeed's config from the engine slice, the per-rank micro-batch and the optimiser's clipping norm."""
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": engine.grad_accum,
        "train_batch_size": batch_size * engine.grad_accum * world,
        "gradient_clipping": 0.0 if manual_clipping(engine, clip_grad) else float(clip_grad),
        # DeepSpeed's default buckets (5e8 elements) cost ZeRO-3 a 1.9 GB fp32 buffer per worker
        "zero_optimization": {"stage": engine.zero_stage, "reduce_bucket_size": engine.bucket_size,
                              "allgather_bucket_size": engine.bucket_size,
                              "stage3_prefetch_bucket_size": engine.bucket_size},
        "bf16": {"enabled": engine.precision == Precision.BF16},
        "fp16": {"enabled": engine.precision == Precision.FP16, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,     # torch AdamW or Adafactor with per-group lr_scale
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


def clear_partition_padding(optimizer) -> int:
    """Zero the padding of ZeRO-3's partitions; returns how many elements on this rank were padding.

    DeepSpeed 0.19 splits each parameter into equal partitions, one per rank, the last ones padded, and
    allocates a partition with torch.empty, copying in only the parameter's own elements: the padding is
    whatever memory it got (`_partition_param`). The float32 flat tensors the optimiser steps are copies of
    the partitions, padding included. AdamW and SGD never carry one element into another, but torch's
    Adafactor scales a tensor's whole update by the RMS of that tensor: an inf or NaN left in the padding made
    every parameter of its group NaN after the first step (tiny model, 2 ranks, seen in bench.train). A
    partition of `size` elements on rank r holds elements [r * size, (r + 1) * size) of its parameter; those
    past the parameter's end are the padding, in the partition and in the float32 flat at the same offset.
    """
    import torch.distributed as dist

    rank = dist.get_rank(group=optimizer.dp_process_group)
    padding = 0
    for params, flat in zip(optimizer.fp16_groups, optimizer.fp32_partitioned_groups_flat, strict=True):
        offset = 0
        for param in params:
            size = param.partition_numel()
            own = min(size, max(0, param.ds_numel - rank * size))
            if own < size:
                param.ds_tensor.data[own:].zero_()
                flat.data[offset + own:offset + size].zero_()
                padding += size - own
            offset += size
        if offset != flat.numel():
            raise RuntimeError(f"ZeRO-3 float32 flat partition of {flat.numel()} elements, but its parameters' "
                               f"partitions add up to {offset}: DeepSpeed's layout changed; padding not cleared")
    return padding


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

"""Bytes per GPU of a training step: model state under DeepSpeed ZeRO, and activations. One model, used by
the planner (`pipelines/plan.py`), the memory bench (`bench/train.py`) and its test (`tests/test_plan.py`).

    from tipsv2.memory import MemoryInputs, model_state_bytes, parameter_count
    count = parameter_count(preset("vit_b14"))
    model_state_bytes(count, MemoryInputs(stage=2, workers=8, precision=Precision.BF16))   # bytes per worker

Model state, per trained parameter: weights and gradients (4 + 4 bytes in fp32, 2 + 2 in bf16/fp16),
DeepSpeed's fp32 master (4; at ZeRO 1-3 a copy even in fp32, none at ZeRO-0 in fp32) and the optimiser state
(`optimizer_state_bytes`: AdamW's two moments, 8; torch Adafactor's second moments, factored per matrix where
it sees whole parameters, one 4-byte vector over DeepSpeed's flat partitions at ZeRO 1-3); per frozen
parameter (the EMA heads, distillation's teacher) its weights (4 or 2), plus in 16-bit training the EMA's
float32 masters (4, whole on every rank). ZeRO-1 shards masters and moments, ZeRO-2 also the gradients,
ZeRO-3 also the weights. Measured with DeepSpeed 0.19.8 (bench/results/train.json,
B/14, 2 workers): ZeRO-1 holds no more than ZeRO-2 at grad_accum 1 (it reduces and drops the gradients
it does not own before `backward` returns), and full gradients plus one reduce bucket between micro-steps
at grad_accum > 1; ZeRO-3 holds one all-gather bucket (`engine.bucket_size` elements) on top.

Activations: the tensors autograd saves for backward, per image, counted from the modules' code (see
`ActivationConfig`); float32 where the losses run, the training precision elsewhere.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from tipsv2.configs import Config, Precision, model_config_of
from tipsv2.distill import DistillTask, DistillTaskConfig
from tipsv2.models.config import FFN, ModelConfig, VisionConfig
from tipsv2.models.heads import DinoHead, DinoHeadConfig
from tipsv2.models.model import TIPSModel
from tipsv2.models.vision import swiglu_hidden
from tipsv2.optim import Optimizer
from tipsv2.task import ContrastiveView, TaskConfig, TIPSv2Task

GiB = 2 ** 30


@dataclass(frozen=True, kw_only=True)
class ParameterCount:
    trained: int    # in the optimiser
    frozen: int     # outside it: EMA teacher heads (and encoder under full EMA), distillation's teacher
    ema: int        # of `frozen`, those the EMA averages (float32 masters in 16-bit training)
    factored: int = 0   # elements of Adafactor's second moments over the trained parameters kept whole
                        # (adafactor_elements); 0: not counted
    tensors: int = 0    # trained parameter tensors (Adafactor keeps a float32 step per tensor it sees)


def adafactor_elements(shape: tuple[int, ...]) -> int:
    """Elements torch.optim.Adafactor keeps for one parameter's second moments: with 2 or more dimensions a
    row vector (the shape without its last dimension) and a column vector (without the one before), else
    one element per parameter element (torch 2.x `row_var`, `col_var`, `variance`)."""
    if len(shape) < 2:
        return math.prod(shape)
    return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]


@dataclass(frozen=True, kw_only=True)
class MemoryInputs:
    """What the model-state bytes depend on besides the parameters (the `engine.*` settings)."""
    stage: int                              # ZeRO stage 0-3
    workers: int                            # data-parallel ranks sharing the shards
    precision: Precision = Precision.FP32
    grad_accum: int = 1
    bucket_size: int = 50_000_000           # elements per ZeRO bucket (engine.bucket_size)
    optimizer: Optimizer = Optimizer.ADAMW  # optim.optimizer

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.stage}")
        if self.workers < 1 or self.grad_accum < 1:
            raise ValueError(f"workers and grad_accum must be >= 1, got {self.workers}, {self.grad_accum}")


@dataclass(frozen=True, kw_only=True)
class ActivationConfig:
    """Elements autograd saves per token, counted from tipsv2/models (our count; checked against the saved
    tensors of a real forward on CPU in tests/test_plan.py)."""
    # Per block and token, in units of the width: norm1 input, qkv input, q/k/v (3), attention output,
    # proj input, LayerScale-1 input, norm2 input, fc1 input, LayerScale-2 input; flash/memory-efficient
    # attention saves no (tokens x tokens) matrix.
    block_width: float = 11.0
    # ... and in units of the MLP hidden width: GELU input and fc2 input (SwiGLU: w12 output (2), SiLU
    # output, product).
    block_hidden: float = 2.0
    swiglu_hidden: float = 4.0
    # Per head token, in units of the head widths: the input, each hidden layer's pre- and post-GELU
    # output (2 per hidden layer), the bottleneck before and after normalisation (2).
    head_bottleneck: float = 2.0


def parameter_count(cfg: Config, teacher: ModelConfig | None = None) -> ParameterCount:
    """Parameters of the task that `cfg` trains, counted on the meta device (no memory, no init).
    Distillation's frozen teacher: `teacher`, or when None a model of the student's size."""
    return task_parameter_count(cfg.task, teacher)


@functools.lru_cache(maxsize=32)
def task_parameter_count(task_cfg: TaskConfig | DistillTaskConfig, teacher: ModelConfig | None) -> ParameterCount:
    """parameter_count by task config (frozen, hashable): the planner asks many times per preset."""
    with torch.device("meta"):
        task = build_meta_task(task_cfg, teacher)
    unique = {id(p): p for p in task.parameters()}.values()
    ema_ids = {id(p) for module, _ in task.ema_pairs() for p in module.parameters()}
    trained = [p for p in unique if p.requires_grad]
    return ParameterCount(trained=sum(p.numel() for p in trained),
                          frozen=sum(p.numel() for p in unique if not p.requires_grad),
                          ema=sum(p.numel() for p in unique if id(p) in ema_ids),
                          factored=sum(adafactor_elements(tuple(p.shape)) for p in trained), tensors=len(trained))


def build_meta_task(task_cfg: TaskConfig | DistillTaskConfig, teacher: ModelConfig | None) -> torch.nn.Module:
    if isinstance(task_cfg, TaskConfig):
        return TIPSv2Task(task_cfg)
    model = TIPSModel(teacher or task_cfg.student)
    heads = [DinoHead(model.width, task_cfg.head) for _ in range(2)]
    return DistillTask(task_cfg, teacher=model, teacher_dino_head=heads[0], teacher_patch_head=heads[1])


def low_bytes(precision: Precision) -> int:
    """Bytes of a weight or gradient element in the training precision."""
    return 4 if precision == Precision.FP32 else 2


def optimizer_state_bytes(count: ParameterCount, inputs: MemoryInputs) -> float:
    """Bytes of optimiser state over all ranks (ZeRO 1-3 shard it by `inputs.workers`; model_state_bytes).
    AdamW: two float32 moments per parameter. torch Adafactor, no first moment: at ZeRO-0 DeepSpeed hands it
    whole parameters (measured with DeepSpeed 0.19.8: fp32, and bf16 through FP16_UnfusedOptimizer), so it
    keeps factored float32 second moments and a float32 step per tensor; at ZeRO 1-3 it gets DeepSpeed's flat
    float32 partitions, 1-D, so one unfactored float32 vector per parameter element (a step per partition,
    not counted)."""
    if inputs.optimizer == Optimizer.ADAMW:
        return 8 * count.trained
    if inputs.stage == 0:
        if count.tensors == 0:
            raise ValueError("Adafactor's factored state needs the parameter shapes: a ParameterCount from "
                             "parameter_count (factored and tensors), got one without them")
        return 4 * count.factored + 4 * count.tensors
    return 4 * count.trained


def model_state_bytes(count: ParameterCount, inputs: MemoryInputs) -> float:
    """Weights, gradients, optimiser state and ZeRO buffers held per worker (bytes)."""
    low, w = low_bytes(inputs.precision), inputs.workers
    trained, frozen = count.trained, count.frozen
    weights, grads, teacher = low * trained, low * trained, low * frozen
    masters = 4 * trained if (inputs.stage > 0 or inputs.precision != Precision.FP32) else 0
    moments = optimizer_state_bytes(count, inputs)
    ema_masters = 0 if inputs.precision == Precision.FP32 else 4 * count.ema
    bucket = low * inputs.bucket_size
    if inputs.stage == 0:
        return weights + grads + masters + moments + teacher + ema_masters
    if inputs.stage == 3:
        return (weights + grads + masters + moments + teacher) / w + ema_masters + bucket
    if inputs.stage == 1 and inputs.grad_accum > 1:   # full gradients between micro-steps
        return weights + grads + (masters + moments) / w + teacher + ema_masters + bucket
    return weights + (grads + masters + moments) / w + teacher + ema_masters


def tokens(vision: VisionConfig, image_size: int) -> int:
    """Tokens of one image through the ViT: patches plus CLS1 and CLS2."""
    return (image_size // vision.patch_size) ** 2 + 2


def block_elements(width: int, hidden: int, ffn: FFN, act: ActivationConfig) -> float:
    """Elements one transformer block saves per token."""
    if ffn == FFN.SWIGLU:
        return act.block_width * width + act.swiglu_hidden * swiglu_hidden(hidden)
    return act.block_width * width + act.block_hidden * hidden


def head_elements(width: int, head: DinoHeadConfig, act: ActivationConfig) -> float:
    """Elements one head token saves before its logits: input, hidden layers, bottleneck."""
    return width + 2 * head.hidden * (head.layers - 1) + act.head_bottleneck * head.bottleneck


def activation_bytes(cfg: Config, *, precision: Precision, act: ActivationConfig = ActivationConfig()) -> float:
    """Bytes saved for backward per training image (student passes with gradient, heads, float32 loss
    inputs) plus the teacher's targets kept until the losses."""
    crops, head, low = cfg.data.crops, cfg.task.head, low_bytes(precision)
    model = model_config_of(cfg)
    vision, text = model.vision, model.text
    global_passes = 2 if getattr(cfg.task, "contrastive_view", None) == ContrastiveView.CLEAN else 1
    vision_tokens = global_passes * tokens(vision, crops.global_size) + crops.local_crops * tokens(vision, crops.local_size)
    encoder = vision_tokens * vision.depth * block_elements(vision.width, vision.mlp_dim, vision.ffn, act)
    encoder += 2 * text.max_len * text.depth * block_elements(text.width, text.mlp_dim, FFN.MLP, act)
    head_tokens = tokens(vision, crops.global_size) - 2 + crops.local_crops
    heads = head_tokens * head_elements(vision.width, head, act)
    # Logits in the training precision, then float32 log-softmax outputs for the losses (4 bytes each).
    logits = head_tokens * head.prototypes * (low + 4)
    # The teacher's targets: float32 probabilities and its logits, for the patches and the CLS.
    targets = tokens(vision, crops.global_size) * head.prototypes * (4 + low)
    return (encoder + heads) * low + logits + targets


def largest_fitting_batch(*, budget: float, state: float, per_image: float) -> int:
    """The largest per-GPU batch whose activations fit beside the model state in `budget` bytes (0: none)."""
    return max(0, math.floor((budget - state) / per_image)) if per_image > 0 else 0

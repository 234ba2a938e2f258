"""Training FLOPs per image and the peak FLOP/s they are measured against: the arithmetic behind MFU.

Pure arithmetic on configs (torch only for the device query), so the GPU step bench (`bench/gpu_step.py`,
which runs where Ray, DeepSpeed and MLflow are not installed), the trainer (`pipelines/train/`) and the
planner (`pipelines/plan.py`) share one count:

    from tipsv2.flops import flops_per_example
    flops_per_example(preset("vit_b14"))     # FLOPs of one training image (student fwd+bwd, teacher fwd)

FLOPs are 2 x multiply-adds of the matmuls (attention included, norms and activations left out).
"""

from __future__ import annotations

import os
import time

import torch

from tipsv2.configs import Config, Precision, model_config_of
from tipsv2.models.config import FFN, TextConfig, VisionConfig
from tipsv2.models.heads import DinoHeadConfig
from tipsv2.models.vision import swiglu_hidden
from tipsv2.task import ContrastiveView, TeacherMode

# Dense bf16 peak FLOP/s per device (vendor data sheets, without sparsity), matched against
# torch.cuda.get_device_name(); fp32 is counted at half (TF32 tensor cores).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


def vision_flops(vision: VisionConfig, image_size: int) -> float:
    """Forward FLOPs of the ViT on one image of `image_size` px."""
    n = (image_size // vision.patch_size) ** 2
    t, d = n + 2, vision.width
    hidden = vision.mlp_dim if vision.ffn == FFN.MLP else 3 * swiglu_hidden(vision.mlp_dim) // 2
    per_block = 2 * t * (4 * d * d + 2 * d * hidden) + 4 * t * t * d
    return 2 * n * 3 * vision.patch_size ** 2 * d + vision.depth * per_block


def text_flops(text: TextConfig) -> float:
    """Forward FLOPs of the text tower on one text of `max_len` tokens."""
    length, d = text.max_len, text.width
    return text.depth * (2 * length * (4 * d * d + 2 * d * text.mlp_dim) + 4 * length * length * d)


def head_flops(width: int, head: DinoHeadConfig) -> float:
    """Forward FLOPs of a DINO/iBOT head on one token (MLP, bottleneck, prototypes)."""
    dims = [width] + [head.hidden] * (head.layers - 1) + [head.bottleneck]
    return 2 * (sum(a * b for a, b in zip(dims, dims[1:])) + head.bottleneck * head.prototypes)


def flops_per_example(cfg: Config, teacher: VisionConfig | None = None) -> float:
    """Training FLOPs per image and step (an estimate counting matmuls only): 3 x forward for the student
    (forward + backward), 1 x forward for the teacher (`teacher`: its vision config; None = the student's)."""
    crops = cfg.data.crops
    model = model_config_of(cfg)
    head = cfg.task.head
    n_global = (crops.global_size // model.vision.patch_size) ** 2
    # Pretraining with the contrastive loss on the clean crop (the default) runs two global passes with
    # gradient; under head-only EMA the clean one is also the teacher's, so no separate teacher pass.
    clean = getattr(cfg.task, "contrastive_view", None) == ContrastiveView.CLEAN
    shared = clean and cfg.task.teacher.mode == TeacherMode.HEAD_ONLY_EMA
    student = ((2 if clean else 1) * vision_flops(model.vision, crops.global_size)
               + crops.local_crops * vision_flops(model.vision, crops.local_size) + 2 * text_flops(model.text)
               + (n_global + crops.local_crops) * head_flops(model.vision.width, head))
    teacher = teacher or model.vision
    teacher_pass = 0.0 if shared else vision_flops(teacher, crops.global_size)
    return 3 * student + teacher_pass + (n_global + 1) * head_flops(teacher.width, head)


def gpu_peak_flops(name: str, precision: Precision) -> float:
    """Peak FLOP/s of a GPU named `name` (e.g. "NVIDIA H100 80GB HBM3"); NaN when the table lacks it."""
    for key, value in GPU_PEAK_FLOPS.items():
        if key in name:
            return value if precision != Precision.FP32 else value / 2
    return float("nan")


def cpu_matmul_flops(size: int = 1024, repeats: int = 4) -> float:
    """Achieved FLOP/s of a square float32 matmul on this CPU: the practical peak there."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    (a @ b).sum().item()
    start = time.perf_counter()
    for _ in range(repeats):
        (a @ b).sum().item()
    return repeats * 2 * size ** 3 / (time.perf_counter() - start)


def peak_flops(device: torch.device, precision: Precision) -> float:
    """Peak FLOP/s of one worker's device: TIPSV2_PEAK_FLOPS, a known GPU, or a timed CPU matmul."""
    if os.environ.get("TIPSV2_PEAK_FLOPS"):
        return float(os.environ["TIPSV2_PEAK_FLOPS"])
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    return cpu_matmul_flops()

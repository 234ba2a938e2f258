"""TIPSv2Task and DistillTask in one process: phases, teacher handling, EMA, optimiser groups."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from tipsv2.configs import tiny
from tipsv2.data.batch import Batch
from tipsv2.distill import DistillTask, DistillTaskConfig, TeacherHeads
from tipsv2.info import report
from tipsv2.losses.dino import Centering
from tipsv2.models import build_model
from tipsv2.optim import OptimConfig, TowerDepths, learning_rate, param_groups
from tipsv2.task import (ContrastiveView, MomentumSchedule, TeacherConfig, TeacherMode, TIPSv2Task, ema_momentum,
                         ema_update)


def make_batch(b: int = 4, *, size: int = 56, local: int = 28, m: int = 2, length: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    n = (size // 14) ** 2
    ids = torch.randint(2, 200, (b, length), generator=g)
    pads = torch.zeros(b, length)
    pads[:, length - 2:] = 1
    ids[:, length - 2:] = 0
    return Batch(ids=[f"x{i}" for i in range(b)], global_crop=torch.rand(b, 3, size, size, generator=g),
                 local_crops=torch.rand(b, m, 3, local, local, generator=g),
                 masks=torch.rand(b, n, generator=g) < 0.75, alt_ids=ids, alt_paddings=pads,
                 syn_ids=ids.flip(0), syn_paddings=pads, granularity=torch.zeros(b, dtype=torch.long))


def tiny_task_cfg(mode: TeacherMode = TeacherMode.HEAD_ONLY_EMA):
    cfg = tiny().task
    return replace(cfg, teacher=replace(cfg.teacher, mode=mode, momentum=0.9, schedule=MomentumSchedule.CONSTANT))


@pytest.fixture
def task():
    torch.manual_seed(0)
    return TIPSv2Task(tiny_task_cfg())


def test_named_losses_and_metrics(task):
    losses = task(make_batch(), step=0)
    for key in ("loss/clip_alt", "loss/clip_syn", "loss/contrastive", "loss/dino", "loss/patch", "loss/total",
                "metric/temperature", "metric/teacher_entropy", "metric/center_norm", "metric/fraction_masked"):
        assert key in losses and torch.isfinite(losses[key]), key
    expected = losses["loss/contrastive"] + 1.0 * losses["loss/dino"] + 2.0 * losses["loss/patch"]
    torch.testing.assert_close(losses["loss/total"], expected)


def test_no_gradient_reaches_teacher(task):
    task(make_batch(), step=0)["loss/total"].backward()
    assert all(not p.requires_grad and p.grad is None for p in task.teacher_dino_head.parameters())
    assert all(not p.requires_grad and p.grad is None for p in task.teacher_patch_head.parameters())
    teacher = task.teacher_output(batch=make_batch(), step=0)
    assert not teacher.dino_probs.requires_grad and not teacher.patch_probs.requires_grad
    assert task.dino_head.mlp[0].weight.grad is not None and task.model.vision.mask_token.grad is not None


def test_head_only_ema_teacher_encoder_is_the_student(task):
    assert task.teacher_vision is None and task.teacher_encoder() is task.model.vision
    assert {id(p) for p in task.parameters() if not p.requires_grad} == \
        {id(p) for p in list(task.teacher_dino_head.parameters()) + list(task.teacher_patch_head.parameters())}
    # The teacher's features equal a no-grad pass of the student encoder on the clean crop.
    batch = make_batch()
    task.eval()
    teacher = task.teacher_output(batch=batch, step=0)
    with torch.no_grad():
        feats = task.model.encode_image(batch.global_crop)
        torch.testing.assert_close(teacher.dino_logits, task.teacher_dino_head(feats.cls1))


class PassCounter:
    """Counts forward passes of a vision encoder, by input shape and whether gradient was on."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple[int, bool, bool]] = []   # (image side, masked?, grad enabled?)
        module.register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        images, masks = args[0], (args[1] if len(args) > 1 else None)
        self.calls.append((images.shape[-1], masks is not None, torch.is_grad_enabled()))


@pytest.mark.parametrize("mode, view, expected", [
    # head-only EMA, clean view (the default): clean pass with gradient (contrastive + teacher), masked, local
    (TeacherMode.HEAD_ONLY_EMA, ContrastiveView.CLEAN, [(56, False, True), (56, True, True), (28, False, True)]),
    # head-only EMA, masked view: the teacher's no-grad clean pass, masked, local
    (TeacherMode.HEAD_ONLY_EMA, ContrastiveView.MASKED, [(56, True, True), (28, False, True), (56, False, False)]),
    # full EMA, clean view: the EMA encoder's pass is a third global pass
    (TeacherMode.FULL_EMA, ContrastiveView.CLEAN, [(56, False, True), (56, True, True), (28, False, True)]),
])
def test_global_passes_per_step(mode, view, expected):
    cfg = replace(tiny_task_cfg(mode), contrastive_view=view)
    task = TIPSv2Task(cfg)
    student = PassCounter(task.model.vision)
    teacher = PassCounter(task.teacher_vision) if task.teacher_vision is not None else None
    task(make_batch(), step=0)
    assert student.calls == expected
    if teacher is not None:
        assert teacher.calls == [(56, False, False)]
    globals_ = [c for c in student.calls + (teacher.calls if teacher else []) if c[0] == 56]
    assert len(globals_) == (3 if mode == TeacherMode.FULL_EMA else 2)


def test_default_is_the_papers_design():
    cfg = tiny().task
    assert cfg.contrastive_view == ContrastiveView.CLEAN and cfg.teacher.mode == TeacherMode.HEAD_ONLY_EMA


def test_contrastive_loss_uses_the_clean_crop():
    """The contrastive term does not change when the masks change (it never sees the masked crop)."""
    task = TIPSv2Task(tiny_task_cfg())
    batch = make_batch()
    a = task(batch, step=0)["loss/contrastive"]
    b = task(replace(batch, masks=~batch.masks), step=0)["loss/contrastive"]
    torch.testing.assert_close(a, b)
    masked_view = TIPSv2Task(replace(tiny_task_cfg(), contrastive_view=ContrastiveView.MASKED))
    masked_view.load_state_dict(task.state_dict())
    c = masked_view(batch, step=0)["loss/contrastive"]
    d = masked_view(replace(batch, masks=~batch.masks), step=0)["loss/contrastive"]
    assert not torch.allclose(c, d)


@pytest.mark.parametrize("mode", list(TeacherMode))
def test_teacher_targets_ignore_drop_path(mode):
    """In training mode with drop_path 0.4, teacher targets are deterministic and equal the eval-mode
    teacher's; the shared clean pass (head-only EMA) gives the same targets as a separate teacher pass."""
    cfg = tiny_task_cfg(mode)
    cfg = replace(cfg, model=replace(cfg.model, vision=replace(cfg.model.vision, drop_path=0.4)))
    task = TIPSv2Task(cfg).train()
    batch = make_batch()
    first = task.teacher_output(batch=batch, step=0)
    second = task.teacher_output(batch=batch, step=0)
    torch.testing.assert_close(first.patch_probs, second.patch_probs, rtol=0, atol=0)
    shared = task.teacher_output(batch=batch, step=0, clean=task.student_output(batch=batch).clean)
    torch.testing.assert_close(shared.dino_logits, first.dino_logits)
    torch.testing.assert_close(shared.patch_logits, first.patch_logits)
    task.eval()
    evaluated = task.teacher_output(batch=batch, step=0)
    torch.testing.assert_close(evaluated.patch_logits, first.patch_logits)
    # ... while the student's masked pass does use drop path in training mode.
    task.train()
    torch.manual_seed(1)
    a = task.model.encode_image(batch.global_crop, batch.masks).patches
    b = task.model.encode_image(batch.global_crop, batch.masks).patches
    assert not torch.allclose(a, b)


def test_full_ema_keeps_a_vision_copy_only():
    task = TIPSv2Task(tiny_task_cfg(TeacherMode.FULL_EMA))
    assert task.teacher_vision is not task.model.vision
    assert all(not p.requires_grad for p in task.teacher_vision.parameters())
    with torch.no_grad():
        for p in task.model.vision.parameters():
            p.add_(1.0)
    before = [p.clone() for p in task.teacher_vision.parameters()]
    task.update_teacher(step=0, total_steps=10)
    for b, t, s in zip(before, task.teacher_vision.parameters(), task.model.vision.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)


def test_ema_update_is_hand_computable(task):
    with torch.no_grad():
        for p in task.teacher_dino_head.parameters():
            p.fill_(1.0)
        for p in task.dino_head.parameters():
            p.fill_(3.0)
    assert task.update_teacher(step=0, total_steps=10) == pytest.approx(0.9)
    for p in task.teacher_dino_head.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.9 * 1.0 + 0.1 * 3.0))


def test_bf16_ema_runs_on_float32_masters_and_tracks_the_exact_average():
    """A bf16 teacher at momentum 0.996 against a float64 reference, over 300 steps of a slowly drifting
    bf16 student: with float32 masters the teacher is the reference rounded to bf16; in place in bf16 it
    is off by 81 % of what the average moved (measured)."""
    gen = torch.Generator().manual_seed(0)
    start = (torch.randn(4096, generator=gen) * 0.02).to(torch.bfloat16)   # the engine cast the teacher
    student = start.float()
    reference = start.double()
    masters, teacher, in_place = [start.float()], [start.clone()], [start.clone()]
    for _ in range(300):
        student += 1e-5 + 2e-5 * torch.randn(4096, generator=gen)
        bf16_student = [student.to(torch.bfloat16)]
        reference = 0.996 * reference + 0.004 * bf16_student[0].double()
        ema_update(teacher, bf16_student, 0.996, masters)
        ema_update(in_place, bf16_student, 0.996)
    moved = (reference - start.double()).abs().mean()
    assert (masters[0].double() - reference).abs().max() < moved * 1e-3   # measured: 2e-4 of it
    assert torch.equal(teacher[0], masters[0].to(torch.bfloat16))
    assert (in_place[0].double() - reference).abs().mean() > moved * 0.5


def test_keep_ema_masters_makes_update_teacher_use_them(task):
    task.to(torch.bfloat16)
    task.keep_ema_masters()
    assert [m.dtype for m in task.ema_masters[0]] == [torch.float32] * len(task.ema_masters[0])
    with torch.no_grad():
        for p in task.dino_head.parameters():
            p.add_(1.0)
    expected = [0.9 * m + 0.1 * s.float() for m, s in zip(task.ema_masters[0], task.dino_head.parameters())]
    task.update_teacher(step=0, total_steps=10)
    for m, t, e in zip(task.ema_masters[0], task.teacher_dino_head.parameters(), expected):
        torch.testing.assert_close(m, e)
        assert t.dtype == torch.bfloat16 and torch.equal(t, m.to(torch.bfloat16))


def test_ema_momentum_schedules():
    cosine = TeacherConfig(momentum=0.99, momentum_final=1.0, schedule=MomentumSchedule.COSINE)
    assert ema_momentum(0, 101, cosine) == pytest.approx(0.99)
    assert ema_momentum(50, 101, cosine) == pytest.approx(0.995)
    assert ema_momentum(100, 101, cosine) == pytest.approx(1.0)
    assert ema_momentum(70, 101, TeacherConfig(momentum=0.99, schedule=MomentumSchedule.CONSTANT)) == 0.99
    with pytest.raises(ValueError, match="momentum"):
        TeacherConfig(momentum=1.1)


def test_centers_follow_the_teacher():
    cfg = tiny_task_cfg()
    task = TIPSv2Task(replace(cfg, dino=replace(cfg.dino, centering=Centering.CENTER),
                              patch=replace(cfg.patch, centering=Centering.CENTER)))
    batch = make_batch()
    teacher = task.teacher_output(batch=batch, step=0)
    task(batch, step=0)
    expected = 0.9 * torch.zeros_like(task.dino_center) + 0.1 * teacher.dino_logits.mean(0)
    torch.testing.assert_close(task.dino_center, expected)
    torch.testing.assert_close(task.patch_center, 0.1 * teacher.patch_logits.mean((0, 1)))


def test_sinkhorn_targets_leave_the_centers_alone(task):
    assert task.cfg.dino.centering == Centering.SINKHORN_KNOPP
    task(make_batch(), step=0)
    assert torch.count_nonzero(task.dino_center) == 0 and torch.count_nonzero(task.patch_center) == 0


def test_param_groups_decay_and_layer_scales(task):
    cfg = OptimConfig(weight_decay=0.05, layer_decay=0.5)
    groups = param_groups(task.trainable_parameters(), cfg, depths=TowerDepths(vision=4, text=2))
    by_name = {n: g for g in groups for n in g["names"]}
    for name in ("model.vision.cls_token", "model.vision.pos_embed", "model.vision.blocks.0.norm1.weight",
                 "model.vision.blocks.0.attn.qkv.bias", "model.vision.blocks.0.ls1.gamma", "model.log_temperature"):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["model.vision.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["model.vision.blocks.3.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.5 ** 1)
    assert by_name["model.vision.blocks.0.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.5 ** 4)
    assert by_name["model.vision.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.5 ** 5)
    assert by_name["dino_head.mlp.0.weight"]["lr_scale"] == 1.0
    assert not any("teacher" in n for n in by_name)


def test_layer_decay_runs_over_each_towers_own_depth():
    """Vision depth 4, text depth 2, decay 0.5: every parameter's lr scale, by hand."""
    task = TIPSv2Task(tiny_task_cfg())
    assert (task.cfg.model.vision.depth, task.cfg.model.text.depth) == (4, 2)
    expected = {}
    for name, _ in task.trainable_parameters():
        if name.startswith("model.vision."):
            if any(k in name for k in ("patch_embed", "cls_token", "register_tokens", "mask_token", "pos_embed")):
                expected[name] = 0.5 ** 5
            elif ".blocks." in name:
                expected[name] = 0.5 ** (4 - int(name.split(".blocks.")[1].split(".")[0]))
            else:
                expected[name] = 1.0      # the final norm: top of the vision tower
        elif name.startswith("model.text."):
            if "token_embedding" in name:
                expected[name] = 0.5 ** 3
            elif ".resblocks." in name:
                expected[name] = 0.5 ** (2 - int(name.split(".resblocks.")[1].split(".")[0]))
            else:
                expected[name] = 1.0      # ln_final: top of the text tower
        else:
            expected[name] = 1.0          # heads, temperature
    for decay_text in (True, False):
        cfg = OptimConfig(layer_decay=0.5, layer_decay_text=decay_text)
        groups = param_groups(task.trainable_parameters(), cfg, depths=TowerDepths.of(task.cfg.model))
        got = {n: g["lr_scale"] for g in groups for n in g["names"]}
        want = {n: (v if decay_text or not n.startswith("model.text.") else 1.0) for n, v in expected.items()}
        assert got == pytest.approx(want)
    # The text tower's last block is one block below its top: 0.5, not 0.5 ** 3 as the vision depth gave.
    assert expected["model.text.transformer.resblocks.1.mlp.c_fc.weight"] == 0.5


def test_layer_decay_student_names_in_distillation():
    task = DistillTask(distill_cfg(teacher_heads=TeacherHeads.RANDOM), teacher=build_model("tiny"))
    groups = param_groups(task.trainable_parameters(), OptimConfig(layer_decay=0.5),
                          depths=TowerDepths.of(task.cfg.student))
    got = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert got["student.text.transformer.resblocks.1.mlp.c_fc.weight"] == pytest.approx(0.5)
    assert got["student.vision.blocks.3.mlp.fc1.weight"] == pytest.approx(0.5)
    assert got["student.text.token_embedding.weight"] == pytest.approx(0.5 ** 3)
    assert got["dino_head.mlp.0.weight"] == 1.0


def test_learning_rate_schedule():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=4)
    assert [learning_rate(s, total_steps=14, cfg=cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(9, total_steps=14, cfg=cfg) == pytest.approx(0.5)
    assert learning_rate(14, total_steps=14, cfg=cfg) == pytest.approx(0.0)


def test_info_reports_fewer_stored_parameters_for_head_only():
    out = report("tiny")
    head, full = out["head_only_ema"], out["full_ema"]
    assert head["trained"] == full["trained"]
    assert full["stored"] - head["stored"] == head["student_vision"]


# ---------------------------------------------------------------- distillation

def distill_cfg(**changes) -> DistillTaskConfig:
    task = tiny().task
    return DistillTaskConfig(student=task.model, head=task.head, dino=task.dino, patch=task.patch, **changes)


def test_distill_reuses_frozen_teacher_heads_and_trains_only_the_student():
    teacher_task = TIPSv2Task(tiny_task_cfg())
    task = DistillTask(distill_cfg(), teacher=teacher_task.model, teacher_dino_head=teacher_task.teacher_dino_head,
                       teacher_patch_head=teacher_task.teacher_patch_head)
    before = copy.deepcopy(task.teacher.state_dict())
    losses = task(make_batch(), step=0)
    losses["loss/total"].backward()
    assert all(not p.requires_grad for p in task.teacher.parameters())
    assert all(p.grad is None for p in task.teacher_dino_head.parameters())
    assert all(n.startswith(("student.", "dino_head.", "patch_head.")) for n, _ in task.trainable_parameters())
    for k, v in task.teacher.state_dict().items():
        assert torch.equal(v, before[k])
    torch.testing.assert_close(task.teacher_dino_head.prototypes, teacher_task.teacher_dino_head.prototypes)


def test_distill_needs_heads_or_random():
    with pytest.raises(ValueError, match="teacher_heads='random'"):
        DistillTask(distill_cfg(), teacher=build_model("tiny"))
    task = DistillTask(distill_cfg(teacher_heads=TeacherHeads.RANDOM), teacher=build_model("tiny"))
    assert torch.isfinite(task(make_batch(), step=0)["loss/total"])


def test_distill_patch_loss_ignores_masks_and_interpolates_teacher_grid():
    task = DistillTask(distill_cfg(teacher_heads=TeacherHeads.RANDOM, teacher_image_size=84), teacher=build_model("tiny"))
    batch = make_batch()
    torch.manual_seed(0)
    a = task(batch, step=0)["loss/patch"]
    batch = replace(batch, masks=~batch.masks)
    task.dino_center.zero_()
    task.patch_center.zero_()
    torch.manual_seed(0)
    b = task(batch, step=0)["loss/patch"]
    torch.testing.assert_close(a, b)  # masks play no part in distillation
    _, _, patch_logits, _ = task.teacher_output(batch=batch, step=0)
    assert patch_logits.shape[1] == (56 // 14) ** 2  # teacher at 84 px (6x6) resampled to the student's 4x4


def test_distill_honours_sinkhorn_centering():
    """dino.centering / patch.centering = sinkhorn_knopp: SK targets, centers untouched; center: EMA centers."""
    from tipsv2.losses.dino import sinkhorn_knopp, teacher_temperature

    base = distill_cfg(teacher_heads=TeacherHeads.RANDOM)
    sk = replace(base, dino=replace(base.dino, centering=Centering.SINKHORN_KNOPP),
                 patch=replace(base.patch, centering=Centering.SINKHORN_KNOPP))
    task = DistillTask(sk, teacher=build_model("tiny"))
    batch = make_batch()
    dino_logits, dino_probs, patch_logits, patch_probs = task.teacher_output(batch=batch, step=0)
    torch.testing.assert_close(dino_probs, sinkhorn_knopp(dino_logits, teacher_temperature(0, sk.dino)))
    torch.testing.assert_close(patch_probs, sinkhorn_knopp(patch_logits, teacher_temperature(0, sk.patch)))
    task(batch, step=0)
    assert torch.count_nonzero(task.dino_center) == 0 and torch.count_nonzero(task.patch_center) == 0
    centered = replace(base, dino=replace(base.dino, centering=Centering.CENTER),
                       patch=replace(base.patch, centering=Centering.CENTER))
    task = DistillTask(centered, teacher=build_model("tiny"))
    task(batch, step=0)
    assert torch.count_nonzero(task.dino_center) > 0 and torch.count_nonzero(task.patch_center) > 0


def test_distill_teacher_ignores_drop_path():
    teacher = build_model("tiny")
    cfg = distill_cfg(teacher_heads=TeacherHeads.RANDOM)
    noisy = TIPSv2Task(replace(tiny_task_cfg(), model=replace(
        tiny_task_cfg().model, vision=replace(tiny_task_cfg().model.vision, drop_path=0.4)))).model
    noisy.load_state_dict(teacher.state_dict())
    task = DistillTask(cfg, teacher=noisy).train()
    batch = make_batch()
    first = task.teacher_output(batch=batch, step=0)[2]
    second = task.teacher_output(batch=batch, step=0)[2]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_pretrained_student_init_warns():
    with pytest.warns(UserWarning, match="randomly initialised student"):
        DistillTask(distill_cfg(teacher_heads=TeacherHeads.RANDOM), teacher=build_model("tiny"),
                    student=build_model("tiny"))


def test_adafactor_and_adamw_both_train_a_step():
    from tipsv2.loop import fit
    from tipsv2.optim import Optimizer

    for kind in (Optimizer.ADAMW, Optimizer.ADAFACTOR):
        torch.manual_seed(0)
        task = TIPSv2Task(tiny_task_cfg())
        before = task.model.vision.blocks[0].attn.qkv.weight.detach().clone()
        stream = iter([(0, make_batch(seed=s)) for s in range(2)])
        result = fit(task, stream=stream, optim=OptimConfig(optimizer=kind, lr=1e-3, warmup_steps=1), steps=2,
                     depths=TowerDepths(vision=4, text=2))
        assert len(result.history) == 2 and all(math.isfinite(r["loss/total"]) for r in result.history)
        assert not torch.equal(before, task.model.vision.blocks[0].attn.qkv.weight), kind

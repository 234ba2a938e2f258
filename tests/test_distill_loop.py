"""distill_local: a few steps of the tiny distillation preset: the teacher stays exactly as given, the
student moves, losses are finite, the schedule is the pretraining loop's, and a seed fixes the run."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from tipsv2.configs import distill_preset
from tipsv2.data.synthetic import SyntheticConfig
from tipsv2.distill import StudentText, TeacherHeads
from tipsv2.distill_loop import build_distill_task, distill_local
from tipsv2.loop import endless, fit_tokenizer, synthetic_records
from tipsv2.models import build_model
from tipsv2.models.heads import DinoHead
from tipsv2.optim import learning_rate

STEPS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = distill_preset("tiny")
    cfg = replace(cfg, steps=STEPS, data=replace(cfg.data, synthetic=SyntheticConfig(train_size=16)))
    records = synthetic_records(cfg.data.synthetic)
    tokenizer = fit_tokenizer(records, cfg.data.tokenizer_vocab, tmp_path_factory.mktemp("tok") / "spm.model",
                              max_len=cfg.task.student.text.max_len)
    torch.manual_seed(123)
    teacher = build_model("tiny")
    heads = (DinoHead(teacher.width, cfg.task.head), DinoHead(teacher.width, cfg.task.head))
    return cfg, records, tokenizer, teacher, heads


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def run(setup):
    cfg, records, tokenizer, teacher, heads = setup
    before = {"teacher": state(teacher), "dino": state(heads[0]), "patch": state(heads[1])}
    result = distill_local(cfg, teacher=teacher, teacher_heads=heads, records=records, tokenizer=tokenizer)
    return result, before


def test_losses_finite_and_schedule_is_the_pretraining_one(run, setup):
    cfg = setup[0]
    result, _ = run
    assert [row["step"] for row in result.history] == list(range(STEPS))
    for row in result.history:
        assert all(math.isfinite(v) for v in row.values()), row
        assert row["lr"] == learning_rate(row["step"], total_steps=STEPS, cfg=cfg.optim)
    assert {"loss/total", "loss/patch", "loss/dino", "loss/contrastive"} <= set(result.history[0])


def test_teacher_unchanged_student_changed(run, setup):
    cfg, _, _, teacher, heads = setup
    result, before = run
    task = result.task
    # The objects passed in are untouched, and so is the task's frozen copy of them.
    assert same(state(teacher), before["teacher"])
    assert same(state(heads[0]), before["dino"]) and same(state(heads[1]), before["patch"])
    assert same(state(task.teacher), before["teacher"])
    assert same(state(task.teacher_dino_head), before["dino"])
    assert same(state(task.teacher_patch_head), before["patch"])
    assert not any(p.requires_grad for p in task.teacher.parameters())
    # The student starts from the seed's random init and moves away from it.
    torch.manual_seed(cfg.seed)
    initial = build_distill_task(cfg, teacher=teacher, teacher_heads=heads)
    trained, start = state(task.student), state(initial.student)
    changed = [k for k in trained if not torch.equal(trained[k], start[k])]
    assert len(changed) > 0.9 * len(trained), f"only {len(changed)} of {len(trained)} student tensors moved"
    assert not same(state(task.student), state(teacher))


def test_same_seed_same_run(run, setup):
    cfg, records, tokenizer, teacher, heads = setup
    again = distill_local(cfg, teacher=teacher, teacher_heads=heads, records=records, tokenizer=tokenizer)
    assert [r["loss/total"] for r in again.history] == [r["loss/total"] for r in run[0].history]


def test_batches_are_unmasked_at_the_student_geometry(setup):
    cfg, records, tokenizer, _, _ = setup
    vision = cfg.task.student.vision
    _, batch = next(endless(records, data=cfg.data, seed=cfg.seed, patch_size=vision.patch_size, tokenizer=tokenizer,
                            masked=False))
    assert not batch.masks.any()
    assert batch.global_crop.shape[0] == cfg.data.batch_size
    assert batch.masks.shape[1] == (batch.global_crop.shape[-1] // cfg.task.student.vision.patch_size) ** 2


def test_released_encoder_without_heads(setup):
    cfg, records, tokenizer, teacher, _ = setup
    cfg = replace(cfg, steps=1, task=replace(cfg.task, teacher_heads=TeacherHeads.RANDOM))
    result = distill_local(cfg, teacher=teacher, teacher_heads=None, records=records, tokenizer=tokenizer)
    assert math.isfinite(result.history[0]["loss/total"])
    with pytest.raises(ValueError, match="teacher_heads='random'"):
        distill_local(replace(cfg, task=replace(cfg.task, teacher_heads=TeacherHeads.REUSE)), teacher=teacher,
                      teacher_heads=None, records=records, tokenizer=tokenizer)


@pytest.mark.parametrize("start", [StudentText.FROM_TEACHER, StudentText.FROZEN_TEACHER])
def test_the_student_text_tower_can_start_from_the_teachers_trained_or_frozen(setup, start):
    """The paper's Table 2 ablation: the student's text tower from the teacher's, then trained or frozen."""
    cfg, records, tokenizer, teacher, heads = setup
    cfg = replace(cfg, task=replace(cfg.task, student_text=start, student=teacher.cfg))
    task = build_distill_task(cfg, teacher=teacher, teacher_heads=heads)
    assert same(state(task.student.text), state(teacher.text))
    trainable = {n for n, _ in task.trainable_parameters()}
    assert any(n.startswith("student.vision.") for n in trainable)
    assert any(n.startswith("student.text.") for n in trainable) == (start == StudentText.FROM_TEACHER)
    result = distill_local(cfg, teacher=teacher, teacher_heads=heads, records=records, tokenizer=tokenizer)
    assert same(state(result.task.student.text), state(teacher.text)) == (start == StudentText.FROZEN_TEACHER)


def test_a_student_text_tower_of_another_shape_cannot_start_from_the_teachers(setup):
    cfg, _, _, teacher, heads = setup
    student = replace(teacher.cfg, text=replace(teacher.cfg.text, depth=teacher.cfg.text.depth + 1))
    cfg = replace(cfg, task=replace(cfg.task, student_text=StudentText.FROM_TEACHER, student=student))
    with pytest.raises(ValueError, match="student_text=from_teacher copies the teacher's text tower, which needs "
                                         "the same text config"):
        build_distill_task(cfg, teacher=teacher, teacher_heads=heads)


def test_a_teacher_larger_than_its_student(setup):
    """The paper's distillation study teaches a smaller student (g/14 -> L/14): the teacher's heads read its own
    width, the student's heads its own, and both share the teacher's prototypes."""
    cfg, records, tokenizer, _, _ = setup
    small = cfg.task.student
    wide = replace(small, vision=replace(small.vision, width=128, heads=4, mlp_dim=512, depth=small.vision.depth + 2),
                   text=replace(small.text, width=128, heads=4, mlp_dim=512))
    torch.manual_seed(7)
    teacher = build_model(wide)
    heads = (DinoHead(teacher.width, cfg.task.head), DinoHead(teacher.width, cfg.task.head))
    result = distill_local(cfg, teacher=teacher, teacher_heads=heads, records=records, tokenizer=tokenizer)
    assert (result.task.teacher.width, result.task.student.width) == (128, small.vision.width)
    assert all(math.isfinite(row["loss/total"]) for row in result.history)
    assert result.task.patch_head.prototypes.shape == heads[1].prototypes.shape

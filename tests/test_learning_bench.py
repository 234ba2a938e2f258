"""bench.learning without training: which arms run together, the larger teacher, the families' presets."""

from __future__ import annotations

from bench.learning import DEFAULT_ARMS, PRESET, TEACHER, Arm, Family, jobs, larger, pretrain_config
from tipsv2.configs import preset
from tipsv2.data.synthetic import Label
from tipsv2.losses.ibot import PatchLossKind


def test_a_student_runs_after_its_teacher_in_one_process():
    work = jobs(Family.SHAPE, [5, 6], 10, "spm.model")
    assert [job.arms for job in work if job.seed == 5] == [
        (Arm.IBOT_PP, Arm.DISTILLED), (Arm.IBOT, Arm.DISTILLED_IBOT), (Arm.FULL_EMA,), (Arm.SHUFFLED,)]
    assert all(job.family == Family.SHAPE and job.steps == 10 for job in work)
    assert {a for job in work for a in job.arms} == set(DEFAULT_ARMS)
    only = jobs(Family.COLOUR, [0], 10, "spm.model", [Arm.DISTILLED_IBOT_LARGE])
    assert [job.arms for job in only] == [(Arm.IBOT_LARGE, Arm.DISTILLED_IBOT_LARGE)]   # brings its teacher


def test_the_paper_s_distillation_study_teaches_from_masked_only_ibot():
    assert TEACHER[Arm.DISTILLED_IBOT] == Arm.IBOT and TEACHER[Arm.DISTILLED_IBOT_LARGE] == Arm.IBOT_LARGE
    for arm in (Arm.IBOT, Arm.IBOT_LARGE):
        assert pretrain_config(arm, family=Family.COLOUR, steps=1, seed=0).task.patch.kind == PatchLossKind.IBOT


def test_the_larger_teacher_is_wider_and_deeper_with_matching_towers():
    small = preset("learning").task.model
    big = pretrain_config(Arm.IBOT_LARGE, family=Family.SHAPE, steps=1, seed=0).task.model
    assert big == larger(small)
    assert (big.vision.width, big.vision.depth) == (128, 6) and big.text.width == big.vision.width
    assert big.vision.width // big.vision.heads == small.vision.width // small.vision.heads   # same head size


def test_each_family_trains_its_own_scenes():
    for family, label in ((Family.COLOUR, Label.COLOUR), (Family.SHAPE, Label.SHAPE)):
        cfg = pretrain_config(Arm.IBOT_PP, family=family, steps=3, seed=9)
        assert cfg.data.synthetic == preset(PRESET[family]).data.synthetic and cfg.data.synthetic.label == label

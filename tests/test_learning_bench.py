"""bench.learning without training: which arms run together, the larger teacher, the families' presets."""

from __future__ import annotations

import dataclasses
import math

import pytest

from bench.learning import (DEFAULT_ARMS, GOLDEN_FACTOR, PRESET, RULES, TEACHER, Arm, Family, detectable, golden, jobs,
                            larger, pretrain_config, text_tower_comparison, text_tower_markdown, verdict)
from tipsv2.configs import preset
from tipsv2.data.synthetic import Colour, Label, Texts
from tipsv2.losses.ibot import PatchLossKind


def test_a_student_runs_after_its_teacher_in_one_process():
    work = jobs(Family.SHAPE, [5, 6], 10, "spm.model")
    assert [job.arms for job in work if job.seed == 5] == [
        (Arm.IBOT_PP, Arm.DISTILLED), (Arm.IBOT, Arm.DISTILLED_IBOT), (Arm.FULL_EMA,), (Arm.NO_PATCH,),
        (Arm.SHUFFLED,)]
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


def test_the_no_patch_control_drops_only_the_patch_loss():
    plain = pretrain_config(Arm.IBOT_PP, family=Family.COLOUR, steps=1, seed=0)
    cut = pretrain_config(Arm.NO_PATCH, family=Family.COLOUR, steps=1, seed=0)
    assert cut.task.patch.weight == 0 and plain.task.patch.weight > 0
    assert cut.task.patch.__class__(**{**vars(cut.task.patch), "weight": plain.task.patch.weight}) == plain.task.patch


def rule(kind: str):
    return next(r for r in RULES if r.kind == kind)


def test_verdicts_by_hand():
    """d = (0.1, 0.2, 0.3): mean 0.2, sd 0.1, se 0.0577; t(0.975, 2) = 4.303, t(0.95, 2) = 2.920."""
    improves, noninferior = rule("improves"), rule("noninferior")
    got = verdict(improves, [0.1, 0.2, 0.3])
    assert got["ci"] == pytest.approx([0.2 - 4.303 * 0.1 / math.sqrt(3), 0.2 + 4.303 * 0.1 / math.sqrt(3)], abs=1e-3)
    assert got["verdict"] == "inconclusive"                             # low -0.048 < 0 < high
    assert verdict(improves, [0.10, 0.11, 0.12])["verdict"] == "reproduced"
    assert verdict(improves, [-0.10, -0.11, -0.12])["verdict"] == "not reproduced"   # high < +0.02
    # non-inferior at margin 0.05: 90 % CI of (0.0, 0.01, 0.02) is 0.01 +- 2.920 * 0.01 / sqrt(3) = [-0.007, 0.027]
    assert verdict(noninferior, [0.0, 0.01, 0.02])["verdict"] == "reproduced"
    assert verdict(noninferior, [-0.10, -0.11, -0.12])["verdict"] == "not reproduced"
    assert verdict(noninferior, [-0.2, 0.0, 0.2])["verdict"] == "inconclusive"


def test_power_by_hand():
    """sd 0.1 over 16 seeds: se 0.025; t(0.975, 15) = 2.131, t(0.8, 15) = 0.866, t(0.95, 15) = 1.753."""
    improves, noninferior = rule("improves"), rule("noninferior")
    assert detectable(improves, 0.1, 16) == pytest.approx((2.131 + 0.866) * 0.025, abs=1e-4)
    assert detectable(noninferior, 0.1, 16) == pytest.approx(-0.05 + (1.753 + 0.866) * 0.025, abs=1e-4)
    assert detectable(improves, 0.1, 64) < detectable(improves, 0.1, 16)


def test_golden_counts_the_seeds_that_clear_the_bar():
    bar = GOLDEN_FACTOR * 0.2
    by = {("ibot_pp", 0): {"patch/accuracy": bar, "patch/chance": 0.2},
          ("ibot_pp", 1): {"patch/accuracy": bar - 0.01, "patch/chance": 0.2},
          ("no_patch", 0): {"patch/accuracy": 0.1, "patch/chance": 0.2}}
    got = golden(by)["arms"]
    assert (got["ibot_pp"]["cleared"], got["ibot_pp"]["seeds"]) == (1, 2)
    assert (got["no_patch"]["cleared"], got["no_patch"]["seeds"]) == (0, 1)


def _payload(start: str, teacher: dict[int, float], student: dict[int, float]) -> dict:
    metrics = lambda acc: {"patch/accuracy": acc, "retrieval/i2t_r1": 0.2}
    return {"student_text": start, "runs": [{"arm": "ibot", "seed": s, "metrics": metrics(a)} for s, a in teacher.items()]
            + [{"arm": "distilled_ibot", "seed": s, "metrics": metrics(a)} for s, a in student.items()]}


def test_text_tower_ablation_pairs_seeds_with_the_same_teacher_by_hand():
    """Random-text students 0.40, 0.50, 0.60 (seeds 1-3) and 0.30 (seed 4, whose teacher the variant did not retrain
    bit for bit: left out). Trained-from-teacher d = (+0.01, -0.01, 0.00): mean 0, sd 0.01, 90 % CI
    0 +- 2.920 * 0.01 / sqrt(3) = +-0.0169, inside +-0.05: little difference. Frozen d = (0.20, 0.21, 0.19):
    CI 0.20 +- 0.0169, wholly above +0.05: not reproduced."""
    teacher = {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8}
    baseline = _payload("random", teacher, {1: 0.40, 2: 0.50, 3: 0.60, 4: 0.30})
    trained = _payload("from_teacher", {**teacher, 4: 0.81}, {1: 0.41, 2: 0.49, 3: 0.60, 4: 0.9})
    frozen = _payload("frozen_teacher", teacher, {1: 0.60, 2: 0.71, 3: 0.79})
    rows = text_tower_comparison(baseline, [trained, frozen, _payload("frozen_teacher", teacher, {})])
    assert rows[0]["teacher_differs"] == [4] and rows[0]["seeds"] == 3
    assert rows[0]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert rows[0]["ci"] == pytest.approx([-2.920 * 0.01 / math.sqrt(3), 2.920 * 0.01 / math.sqrt(3)], abs=1e-4)
    assert rows[0]["verdict"] == "reproduced" and rows[0]["seeds_agreeing"] == 3
    assert rows[1]["mean"] == pytest.approx(0.20) and rows[1]["verdict"] == "not reproduced"
    assert rows[2]["verdict"] == "inconclusive" and rows[2]["reason"] == "fewer than 2 seeds"
    table = text_tower_markdown(rows, header="h")
    assert "| started from the teacher's and trained | 3 |" in table and "from_teacher: [4]" in table


def test_the_outline_family_is_shape_with_one_red_object_and_label_texts():
    shape, outline = preset(PRESET[Family.SHAPE]), preset(PRESET[Family.OUTLINE])
    scenes = outline.data.synthetic
    assert scenes.label == Label.SHAPE and scenes.colours == (Colour.RED,) and scenes.max_objects == 1
    assert scenes.texts == Texts.LABELS and shape.data.synthetic.texts == Texts.SCENE
    assert outline.steps == 1000 and outline.data.masking.ratio == 0.3 and shape.data.masking.ratio == 0.75
    assert dataclasses.replace(outline, steps=shape.steps, data=dataclasses.replace(
        outline.data, synthetic=shape.data.synthetic, masking=shape.data.masking)) == shape

"""pipelines.report_table: each number beside its baseline and random init, its standing in words."""

from __future__ import annotations

import pytest

from pipelines import report_table
from tipsv2.data.synthetic import Colour, Label, SyntheticConfig


def metrics(patch: float, miou: float) -> dict[str, float]:
    """A suite result: 100 objects at patch chance 0.2 (noise margin 2 x 0.04 = 0.08), all-background mIoU 0.1."""
    return {"num_test": 50.0, "num_train": 200.0, "patch_text/num_objects": 100.0,
            "patch_text/num_foreground_patches": 900.0, "patch_text/accuracy": patch, "baseline/patch_text/accuracy": 0.2,
            "zero_shot_segmentation/miou": miou, "baseline/zero_shot_segmentation/miou": 0.1}


EVALUATION = {"teacher": metrics(0.60, 0.105), "student": metrics(0.25, 0.05), "random_init": metrics(0.19, 0.104)}


def test_margins_follow_the_draws_or_the_relative_band():
    patch, miou = report_table.REPORT_METRICS[0], report_table.REPORT_METRICS[1]
    assert patch.key == "patch_text/accuracy" and miou.key == "zero_shot_segmentation/miou"
    assert report_table.margin(patch, EVALUATION["teacher"]) == pytest.approx(2 * (0.2 * 0.8 / 100) ** 0.5)
    assert report_table.margin(miou, EVALUATION["teacher"]) == pytest.approx(0.01)


def test_table_and_findings_say_where_each_number_stands():
    table = report_table.evaluation_table(EVALUATION)
    assert "| teacher | student | random init | baseline |" in table
    patch_row = next(line for line in table.splitlines() if line.startswith("| foreground patch"))
    assert "0.600 (above chance) | 0.250 (at chance) | 0.190 (at chance) | 0.200 |" in patch_row
    miou_row = next(line for line in table.splitlines() if line.startswith("| zero-shot segmentation"))
    assert "0.105 (at chance) | 0.050 (below chance) | 0.104 (at chance) | 0.100 |" in miou_row
    patch_line, miou_line = report_table.findings(EVALUATION)
    assert "teacher 0.600, above chance, above random init (0.190)" in patch_line
    assert "student 0.250, at chance, no better than random init (0.190)" in patch_line
    assert "student 0.050, below chance, below random init (0.104)" in miou_line
    assert report_table.learned(EVALUATION) == (["foreground patch zero-shot accuracy"],
                                                 ["zero-shot segmentation mIoU"])


def test_summary_names_the_classes_and_refuses_a_missing_baseline():
    scenes = SyntheticConfig(label=Label.COLOUR, colours=(Colour.RED, Colour.BLUE))
    lines = report_table.summary_lines(EVALUATION, scenes)
    assert "class is its colour" in lines[0] and "classes: red, blue" in lines[0] and "50 held-out test" in lines[0]
    assert lines[1].startswith("The teacher is above chance and above random init on: foreground patch")
    assert "shape" in report_table.scenes_note(SyntheticConfig(), EVALUATION["teacher"])
    broken = {name: {k: v for k, v in m.items() if k != "baseline/patch_text/accuracy"}
              for name, m in EVALUATION.items()}
    with pytest.raises(ValueError, match="no 'baseline/patch_text/accuracy'"):
        report_table.evaluation_table(broken)

"""The recipe learns: a golden regression on patch-text alignment, with its negative control.

150 steps of the `learning` preset (tipsv2.configs.learning) must bring foreground patch zero-shot
accuracy to at least 2x chance on held-out scenes; the same run on captions shuffled across images must
stay within chance's noise. This is the test that fails when a loss, a mask or the EMA is broken (a
loss curve can still fall then). About 45 s a run on 2 idle cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.learning import CONTROL_NOISE, GOLDEN_FACTOR, Arm, evaluate, train_arm
from tipsv2.configs import learning
from tipsv2.loop import fit_tokenizer, synthetic_records


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = learning()
    records = synthetic_records(cfg.data.synthetic)
    tokenizer = fit_tokenizer(records, cfg.data.tokenizer_vocab, Path(tmp_path_factory.mktemp("tok")) / "spm.model",
                              max_len=cfg.task.model.text.max_len)
    return cfg, records, tokenizer


def accuracy_after_training(arm: Arm, setup) -> dict[str, float]:
    cfg, records, tokenizer = setup
    _, model, _ = train_arm(arm, seed=0, steps=cfg.steps, records=records, tokenizer=tokenizer)
    return evaluate(model, tokenizer, cfg, probe=False)


@pytest.mark.slow
def test_recipe_learns_patch_text_alignment(setup):
    m = accuracy_after_training(Arm.IBOT_PP, setup)
    assert 1 / 6 <= m["patch/chance"] < 0.3 and m["patch/oracle"] > 0.95   # the task is learnable from a patch
    assert m["patch/accuracy"] >= GOLDEN_FACTOR * m["patch/chance"], m
    assert m["patch/auroc"] > 0.6, m


@pytest.mark.slow
def test_negative_control_stays_at_chance(setup):
    m = accuracy_after_training(Arm.SHUFFLED, setup)
    assert m["patch/accuracy"] <= m["patch/chance"] + CONTROL_NOISE * m["patch/chance_noise"], m

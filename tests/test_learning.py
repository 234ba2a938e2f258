"""The recipe learns: a golden regression on patch-text alignment, with its negative control.

150 steps of the `learning` preset (tipsv2.configs.learning) must bring foreground patch zero-shot
accuracy to at least 2x chance on held-out scenes; the same run on captions shuffled across images must
stay within chance's noise. This is the test that fails when a loss, a mask or the EMA is broken (a
loss curve can still fall then). The two runs train at once in two one-thread processes, as bench.learning
runs its arms (so the bench's seed statistics are this test's): about 60 s for both on 2 idle cores.
"""

from __future__ import annotations

import pytest

from bench.learning import CONTROL_NOISE, GOLDEN_FACTOR, Arm, Family, Job, run_jobs
from tipsv2.configs import learning
from tipsv2.loop import fit_tokenizer, synthetic_records


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[Arm, dict[str, float]]:
    """Patch metrics of the TIPSv2 arm and of its shuffled-caption control, seed 0, no linear probe."""
    cfg = learning()
    tokenizer = tmp_path_factory.mktemp("tok") / "spm.model"
    fit_tokenizer(synthetic_records(cfg.data.synthetic), cfg.data.tokenizer_vocab, tokenizer,
                  max_len=cfg.task.model.text.max_len)
    work = [Job(Family.COLOUR, 0, (arm,), cfg.steps, str(tokenizer), probe=False)
            for arm in (Arm.IBOT_PP, Arm.SHUFFLED)]
    return {Arm(row["arm"]): row["metrics"] for row in run_jobs(work, parallel=True)}


@pytest.mark.slow
def test_recipe_learns_patch_text_alignment(trained):
    m = trained[Arm.IBOT_PP]
    assert 1 / 6 <= m["patch/chance"] < 0.3 and m["patch/oracle"] > 0.95   # the task is learnable from a patch
    assert m["patch/accuracy"] >= GOLDEN_FACTOR * m["patch/chance"], m
    assert m["patch/auroc"] > 0.6, m


@pytest.mark.slow
def test_negative_control_stays_at_chance(trained):
    m = trained[Arm.SHUFFLED]
    assert m["patch/accuracy"] <= m["patch/chance"] + CONTROL_NOISE * m["patch/chance_noise"], m

"""Golden loss curve: 30 steps of the tiny preset on synthetic scenes, single process.

Regenerate after an intended change with `TIPSV2_REGOLD=1 pytest tests/test_golden.py` and say why in
the commit. Tolerance: relative 2e-3 per value (float32 CPU kernels may reorder reductions across
thread counts; the curve is deterministic for a fixed build and thread count).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tipsv2.configs import tiny
from tipsv2.loop import fit_tokenizer, synthetic_records, train_local

GOLDEN = Path(__file__).parent / "golden" / "tiny_pretrain.json"
TERMS = ("loss/total", "loss/contrastive", "loss/dino", "loss/patch")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = tiny()
    records = synthetic_records(cfg.data.synthetic)
    tokenizer = fit_tokenizer(records, cfg.data.tokenizer_vocab, tmp_path_factory.mktemp("tok") / "spm.model",
                              max_len=cfg.task.model.text.max_len)
    return train_local(cfg, records=records, tokenizer=tokenizer)


def test_golden_curve(run):
    curve = {t: [row[t] for row in run.history] for t in TERMS}
    if os.environ.get("TIPSV2_REGOLD"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(curve, indent=1))
    golden = json.loads(GOLDEN.read_text())
    for term in TERMS:
        np.testing.assert_allclose(curve[term], golden[term], rtol=2e-3, err_msg=term)


def test_loss_falls(run):
    total = [row["loss/total"] for row in run.history]
    assert len(total) == 30
    assert np.mean(total[-5:]) < np.mean(total[:5]) - 0.5, total

"""Ray Train storage, checkpoints, resume and export on S3 (moto's server on 127.0.0.1), 2 workers, ZeRO-2."""

from __future__ import annotations

import pytest

from pipelines import storage
from pipelines.train import Job, Knobs, latest_checkpoint, local_copy, read_history, run
from tipsv2.checkpoint import load_export

pytestmark = pytest.mark.slow

LOSSES = ("loss/contrastive", "loss/dino", "loss/patch", "loss/total")


def test_s3_output_checkpoints_resume_and_export(ray_local, s3_endpoint, train_cfg, train_local_reference, tmp_path):
    output = "s3://tipsv2-test/train-run"
    cfg = train_cfg("engine.zero_stage=2", "engine.max_failures=1",
                    f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    summary = run(Job.PRETRAIN, cfg, output, knobs=Knobs(fail_at_step=3))
    assert summary["complete"] and storage.exists(f"{output}/_failed_once_at_3")
    # Restarted from the step-2 checkpoint read back from S3, the run still follows the loop exactly.
    for got, expected in zip(read_history(output), train_local_reference[1], strict=True):
        for key in LOSSES:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7)
    assert latest_checkpoint(output) == f"{output}/ray/train/step_00000004"
    files = storage.list_files(f"{output}/ray/train/step_00000002")
    assert any(f.endswith("rng_rank1.json") for f in files) and any("optim_states" in f for f in files)
    for name in ("model.safetensors", "heads.safetensors", "official_vision.npz", "official_text.npz"):
        assert storage.exists(f"{output}/export/{name}"), name
    model, dino, patch = load_export(local_copy(f"{output}/export"))
    assert model.width == 96 and dino is not None

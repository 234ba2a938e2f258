"""Ray Train storage on S3 (moto's server on 127.0.0.1), 2 workers, ZeRO-2: a worker killed mid-run resumes
from the last checkpoint read back from S3 (both ranks download it at once), with losses identical to the
uninterrupted run's; checkpoints from every rank and the export land on S3."""

from __future__ import annotations

import pytest

from pipelines import storage
from pipelines.train import InjectedFaults, Job, latest_checkpoint, local_copy, read_history, run
from tests.training import assert_identical
from tipsv2.checkpoint import load_export

pytestmark = pytest.mark.slow


def test_a_killed_worker_resumes_from_its_s3_checkpoint_with_identical_losses(ray_local, s3_endpoint, train_cfg,
                                                                              train_zero2_reference, tmp_path):
    output = "s3://tipsv2-test/train-run"
    cfg = train_cfg("engine.zero_stage=2", "engine.max_failures=1",
                    f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    summary = run(Job.PRETRAIN, cfg, output, faults=InjectedFaults(fail_at_step=3))
    assert summary["complete"] and storage.exists(f"{output}/_failed_once_at_3"), "the worker was never killed"
    # Restarted from the step-2 checkpoint on S3: DeepSpeed state, EMA teacher, RNG and data position.
    assert_identical(read_history(output), train_zero2_reference[1])
    assert latest_checkpoint(output) == f"{output}/ray/train/step_00000004"
    files = storage.list_files(f"{output}/ray/train/step_00000002")
    assert any(f.endswith("rng_rank1.json") for f in files) and any("optim_states" in f for f in files)
    for name in ("model.safetensors", "heads.safetensors", "official_vision.npz", "official_text.npz"):
        assert storage.exists(f"{output}/export/{name}"), name
    model, dino, patch = load_export(local_copy(f"{output}/export"))
    assert model.width == 96 and dino is not None

"""Failures on CPU, deterministic: a worker killed mid-run, a non-finite loss, a rerun after the job died.

The reference is an uninterrupted Ray Train + DeepSpeed ZeRO-2 run (2 workers, 4 steps, checkpoints at
steps 2 and 4). Resumed runs restore DeepSpeed state, the EMA teacher, RNG states and the data position
from the step-2 checkpoint, so every loss must equal the reference's to 1e-6.
"""

from __future__ import annotations

import pytest

from pipelines import storage
from pipelines.train import Job, Knobs, latest_checkpoint, read_history, read_trainer_state, run
from tipsv2.loop import NonFiniteLoss

pytestmark = pytest.mark.slow

LOSSES = ("loss/clip_alt", "loss/clip_syn", "loss/contrastive", "loss/dino", "loss/patch", "loss/total")


def assert_identical(got: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [0, 1, 2, 3]
    for a, b in zip(got, expected):
        for key in LOSSES:
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])


def test_a_killed_worker_resumes_from_the_last_checkpoint_with_identical_losses(ray_local, train_cfg,
                                                                                train_zero2_reference, tmp_path):
    output = str(tmp_path / "killed")
    run(Job.PRETRAIN, train_cfg("engine.zero_stage=2", "engine.max_failures=1"), output,
        knobs=Knobs(fail_at_step=3))
    assert storage.exists(f"{output}/_failed_once_at_3"), "the worker was never killed"
    assert_identical(read_history(output), train_zero2_reference[1])


def test_nonfinite_loss_stops_cleanly_and_a_rerun_resumes_the_same_run(ray_local, train_cfg,
                                                                        train_zero2_reference, tmp_path):
    output = str(tmp_path / "nan")
    cfg = train_cfg("engine.zero_stage=2")
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 3 in \['loss/total'\]"):
        run(Job.PRETRAIN, cfg, output, knobs=Knobs(nan_at_step=3))
    checkpoint = latest_checkpoint(output)
    state = read_trainer_state(checkpoint)
    assert checkpoint.endswith("step_00000002") and state.step == 2 and len(state.history) == 2
    # The job died; the same command again resumes from step 2 and reattaches the MLflow run.
    summary = run(Job.PRETRAIN, cfg, output, knobs=Knobs())
    assert summary["mlflow_run_id"] == state.run_id
    assert_identical(read_history(output), train_zero2_reference[1])
    # And once more: the run is complete, nothing to do.
    assert run(Job.PRETRAIN, cfg, output, knobs=Knobs())["wall_s"] == summary["wall_s"]

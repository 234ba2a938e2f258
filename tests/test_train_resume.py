"""Failures on CPU, deterministic: a non-finite loss, then a rerun after the job died (a worker killed
mid-run is tests/test_train_s3.py, with the checkpoints on S3).

The reference is an uninterrupted Ray Train + DeepSpeed ZeRO-2 run (2 workers, 4 steps, checkpoints at
steps 2 and 4). Resumed runs restore DeepSpeed state, the EMA teacher, RNG states and the data position
from the step-2 checkpoint, so every loss must equal the reference's to 1e-6.
"""

from __future__ import annotations

import pytest

from pipelines.train import InjectedFaults, Job, NoFaults, latest_checkpoint, read_history, read_trainer_state, run
from tests.training import assert_identical
from tipsv2.loop import NonFiniteLoss

pytestmark = pytest.mark.slow

def test_nonfinite_loss_stops_cleanly_and_a_rerun_resumes_the_same_run(ray_local, train_cfg,
                                                                        train_zero2_reference, tmp_path):
    output = str(tmp_path / "nan")
    cfg = train_cfg("engine.zero_stage=2")
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 3 in \['loss/total'\]"):
        run(Job.PRETRAIN, cfg, output, faults=InjectedFaults(nan_at_step=3))
    checkpoint = latest_checkpoint(output)
    state = read_trainer_state(checkpoint)
    assert checkpoint.endswith("step_00000002") and state.step == 2 and len(state.history) == 2
    # The job died; the same command again resumes from step 2 and reattaches the MLflow run.
    summary = run(Job.PRETRAIN, cfg, output, faults=NoFaults())
    assert summary["mlflow_run_id"] == state.run_id
    assert_identical(read_history(output), train_zero2_reference[1])
    # And once more: the run is complete, nothing to do.
    assert run(Job.PRETRAIN, cfg, output, faults=NoFaults())["wall_s"] == summary["wall_s"]

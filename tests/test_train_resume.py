"""Failures on CPU, deterministic: a non-finite loss, then a rerun after the job died (a worker killed
mid-run is tests/test_train_s3.py, with the checkpoints on S3).

The reference is an uninterrupted Ray Train + DeepSpeed ZeRO-2 run (2 workers, 4 steps, checkpoints at
steps 2 and 4). Resumed runs restore DeepSpeed state, the EMA teacher, RNG states and the data position
from the step-2 checkpoint, so every loss must equal the reference's to 1e-6.
"""

from __future__ import annotations

import shutil
from pathlib import Path

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


ADAFACTOR_SETS = ("optim.optimizer=adafactor", "optim.lr=1e-2", "optim.weight_decay=0.002")


def optimizer_state_keys(checkpoint: str) -> set[str]:
    """Names of the per-tensor optimiser state in a DeepSpeed checkpoint's rank-0 optimizer state."""
    import torch

    from pipelines.train import DS_TAG

    files = sorted((Path(checkpoint) / DS_TAG).glob("*optim_states.pt"))   # ZeRO 1-3: a file of their own
    if files:
        saved = torch.load(files[0], map_location="cpu", weights_only=False)
    else:   # ZeRO-0: the optimiser's state_dict inside the model states
        path = next((Path(checkpoint) / DS_TAG).glob("*model_states.pt"))
        saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer"]
    keys: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            if "state" in value and isinstance(value["state"], dict):
                for state in value["state"].values():
                    keys.update(state)
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(saved)
    return keys


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_adafactor_is_what_the_worker_builds_and_resumes_identically(ray_local, train_cfg, tmp_path, zero_stage):
    """The paper presets' optimiser through DeepSpeed (2 workers) at ZeRO-0, the presets' engine, and ZeRO-3, whose
    partitions are the most unlike whole parameters (ZeRO-2's step: tests/test_grad_cache_zero.py; its resume with
    AdamW: the test above): the engine's optimizer state is
    Adafactor's (a second moment, no exp_avg), and the run cut back to its step-2 checkpoint (a copy of its
    output without the later one: the job died after step 2) resumes to the uninterrupted losses to 1e-6."""
    reference, output = tmp_path / "reference", tmp_path / "resumed"
    cfg = train_cfg(f"engine.zero_stage={zero_stage}", *ADAFACTOR_SETS)
    run(Job.PRETRAIN, cfg, str(reference), faults=NoFaults())
    keys = optimizer_state_keys(latest_checkpoint(str(reference)))
    assert "variance" in keys and not keys & {"exp_avg", "exp_avg_sq"}, keys
    shutil.copytree(reference, output)
    train = output / "ray" / "train"
    shutil.rmtree(train / "step_00000004")
    for path in (output / "summary.json", train / "checkpoint_manager_snapshot.json"):
        path.unlink()
    assert read_trainer_state(latest_checkpoint(str(output))).step == 2
    run(Job.PRETRAIN, cfg, str(output), faults=NoFaults())
    resumed, uninterrupted = read_history(str(output)), read_history(str(reference))
    assert_identical(resumed, uninterrupted)
    # Steps 0-1 came back from the checkpoint (their timings too); steps 2-3 were trained again.
    assert [r["time/step_s"] for r in resumed[:2]] == [r["time/step_s"] for r in uninterrupted[:2]]
    assert all(a["time/step_s"] != b["time/step_s"] for a, b in zip(resumed[2:], uninterrupted[2:]))

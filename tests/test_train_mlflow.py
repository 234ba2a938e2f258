"""MLflow through a real `mlflow server` on 127.0.0.1: one run per job with config, metrics and artifacts
(the session's Ray Train + DeepSpeed ZeRO-2 reference run, 2 workers), and training that goes on when the
server dies mid-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.testing import start_mlflow_server, stop_mlflow_server
from tests.conftest import REFERENCE_EXPERIMENT
from tests.training import LOSSES

pytestmark = pytest.mark.slow


@pytest.fixture()
def doomed_server(tmp_path):
    """A server of this test's own, which the test kills."""
    process, uri = start_mlflow_server(tmp_path / "server")
    yield process, uri
    stop_mlflow_server(process)


def test_one_run_per_job_with_config_metrics_and_artifacts(mlflow_server, train_zero2_reference):
    from mlflow.tracking import MlflowClient

    _, uri = mlflow_server
    _, rows, summary = train_zero2_reference
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(REFERENCE_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    found = runs[0]
    assert found.info.status == "FINISHED"
    assert found.data.params["engine.zero_stage"] == "2" and found.data.params["task.dino.weight"] == "1.0"
    for key in (*LOSSES, "lr", "ema_momentum", "metric/temperature", "images_per_s", "mfu"):
        assert key in found.data.metrics, key
    history = client.get_metric_history(found.info.run_id, "loss/total")
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([r["loss/total"] for r in rows])
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"config.json", "export", "heatmaps"} <= artifacts
    exported = {a.path for a in client.list_artifacts(found.info.run_id, "export")}
    assert {"export/model.safetensors", "export/config.json", "export/official_vision.npz"} <= exported
    assert "heatmaps/heatmap_0.png" in {a.path for a in client.list_artifacts(found.info.run_id, "heatmaps")}


def test_training_goes_on_when_the_tracking_server_dies(doomed_server, tmp_path):
    """`--local` in a subprocess, a metric per step; the server is killed once the first metrics arrived."""
    from mlflow.tracking import MlflowClient

    process, uri = doomed_server
    output = tmp_path / "run"
    command = [sys.executable, "-m", "pipelines.pretrain", "--config", "tiny", "--local", "--output", str(output),
               "--set", "steps=12", "--set", "log_every=1", "--set", "data.synthetic.train_size=32",
               "--set", "data.synthetic.val_size=2", "--set", "data.synthetic.test_size=2",
               "--set", f"tracking.uri={uri}", "--set", "tracking.experiment=server-dies"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    trainer = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=Path(__file__).resolve().parents[1])
    client = MlflowClient(uri)
    deadline = time.time() + 300
    while time.time() < deadline and trainer.poll() is None:
        experiment = client.get_experiment_by_name("server-dies")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and "loss/total" in runs[0].data.metrics:
            break
        time.sleep(0.2)
    assert trainer.poll() is None, "training finished before the server could be stopped"
    logged_before = len(client.get_metric_history(runs[0].info.run_id, "loss/total"))
    stop_mlflow_server(process)
    log, _ = trainer.communicate(timeout=600)
    assert trainer.returncode == 0, log[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 12
    offline = [json.loads(line) for line in (output / "metrics_offline.jsonl").read_text().splitlines()]
    assert logged_before < 12 and offline and offline[-1]["step"] == 11
    assert (output / "export" / "model.safetensors").is_file()

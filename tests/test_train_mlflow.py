"""MLflow through a real `mlflow server` on 127.0.0.1: one run per job with config, metrics and artifacts
(Ray Train + DeepSpeed ZeRO-1, 2 workers), and training that goes on when the server dies mid-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.testing import free_port
from pipelines.train import Job, Knobs, read_history, run

pytestmark = pytest.mark.slow

LOSSES = ("loss/clip_alt", "loss/clip_syn", "loss/contrastive", "loss/dino", "loss/patch", "loss/total")


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                return process, uri
        except OSError:
            time.sleep(1)
    stop_server(process)
    raise RuntimeError(f"mlflow server on {uri} did not answer /health within 120 s")


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 9)   # the server's own process group (gunicorn/uvicorn workers included)
    process.wait(timeout=30)


@pytest.fixture()
def mlflow_server(tmp_path):
    process, uri = start_server(tmp_path / "server")
    yield process, uri
    if process.poll() is None:
        stop_server(process)


def test_one_run_per_job_with_config_metrics_and_artifacts(ray_local, mlflow_server, train_cfg,
                                                          train_local_reference, tmp_path):
    from mlflow.tracking import MlflowClient

    _, uri = mlflow_server
    output = str(tmp_path / "run")
    cfg = train_cfg("engine.zero_stage=1", f"tracking.uri={uri}", "tracking.experiment=train-mlflow-test")
    summary = run(Job.PRETRAIN, cfg, output, knobs=Knobs())
    # ZeRO-1 reproduces the single-process loop too.
    for got, expected in zip(read_history(output), train_local_reference[1], strict=True):
        for key in LOSSES:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("train-mlflow-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    found = runs[0]
    assert found.info.status == "FINISHED"
    assert found.data.params["engine.zero_stage"] == "1" and found.data.params["task.dino.weight"] == "1.0"
    for key in (*LOSSES, "lr", "ema_momentum", "metric/temperature", "images_per_s", "mfu"):
        assert key in found.data.metrics, key
    assert [m.step for m in client.get_metric_history(found.info.run_id, "loss/total")] == [0, 1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"config.json", "export", "heatmaps"} <= artifacts
    exported = {a.path for a in client.list_artifacts(found.info.run_id, "export")}
    assert {"export/model.safetensors", "export/config.json", "export/official_vision.npz"} <= exported
    assert "heatmaps/heatmap_0.png" in {a.path for a in client.list_artifacts(found.info.run_id, "heatmaps")}


def test_training_goes_on_when_the_tracking_server_dies(mlflow_server, tmp_path):
    """`--local` in a subprocess, a metric per step; the server is killed once the first metrics arrived."""
    from mlflow.tracking import MlflowClient

    process, uri = mlflow_server
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
    stop_server(process)
    log, _ = trainer.communicate(timeout=600)
    assert trainer.returncode == 0, log[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 12
    offline = [json.loads(line) for line in (output / "metrics_offline.jsonl").read_text().splitlines()]
    assert logged_before < 12 and offline and offline[-1]["step"] == 11
    assert (output / "export" / "model.safetensors").is_file()

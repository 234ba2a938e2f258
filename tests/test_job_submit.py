"""`ray job submit` for real: a local head on 127.0.0.1, the tiny chain submitted with --working-dir,
followed with the status `ray job status` reads (the dashboard's REST API, polled without starting a Python
per look) and `ray job logs`, outputs checked, the head stopped.

The head gets its own --temp-dir so that only its processes are stopped afterwards (`ray stop` would
also stop the Ray other tests in this session started).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode:
        raise AssertionError(f"ray {' '.join(args[:2])} exited {done.returncode}:\n{done.stdout[-1500:]}\n"
                             f"{done.stderr[-1200:]}")
    return done


FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_status(dashboard: str, job_id: str, timeout: float = 60) -> str:
    """The job's status as `ray job status` gets it (GET /api/jobs/ID on the dashboard, with this run's token),
    without its 1.5-2 CPU-seconds of Python start-up per look; "" while the head does not answer."""
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{dashboard}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read())["status"]
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return ""


def wait_for_job(dashboard: str, job_id: str, timeout: float, every_s: float = 1.0) -> str:
    """The job's final status, or its last seen one after `timeout` seconds."""
    deadline, status = time.time() + timeout, ""
    while time.time() < deadline:
        status = job_status(dashboard, job_id)
        if status in FINAL:
            break
        time.sleep(every_s)
    return status


def start_job(env: dict, entrypoint: list[str], runtime_env: dict, job_id: str) -> None:
    """`ray job submit --no-wait --working-dir .`."""
    args = ["job", "submit", "--no-wait", f"--submission-id={job_id}", "--working-dir", ".",
            "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    for _ in range(30):  # the job agent comes up some seconds after `ray start` returns
        done = ray_cli(*args, env=env, check=False)
        if done.returncode == 0 or "No available agent" not in done.stderr + done.stdout:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]


def finish_job(env: dict, job_id: str, timeout: float) -> tuple[str, str]:
    """(final status, `ray job logs`) of a started job."""
    return wait_for_job(env["RAY_ADDRESS"], job_id, timeout), \
        ray_cli("job", "logs", job_id, env=env, check=False, timeout=300).stdout


def stop_head(temp_dir: str) -> None:
    """Kill every process of this head (their command lines name its temp dir), the job driver too."""
    out = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()
    for pid in map(int, out):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def head(tmp_path):
    temp_dir = f"/tmp/rj{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths must fit in 107 bytes
    gcs, dashboard = free_port(), free_port()
    env = os.environ | {"RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}",
                        "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}", "PYTHONUNBUFFERED": "1"}
    start_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4", f"--temp-dir={temp_dir}",
            # Every listening port explicit and free: another Ray in this session holds the defaults.
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}", "--disable-usage-stats", env=start_env, timeout=180)
    try:
        yield env
    finally:
        stop_head(temp_dir)


@pytest.mark.slow
def test_submit_tiny_chain(head, tmp_path):
    env = head
    out = tmp_path / "run"
    job_id = f"tipsv2-{uuid.uuid4().hex[:6]}"
    start_job(env, ["python", "-m", "pipelines.run_all", "--config", "tiny", "--output", str(out),
                    "--set", "pretrain.steps=6", "--set", "distill.steps=6", "--set", "evaluate_suite=tiny",
                    "--set", "source.skimage_samples=false"],
              {"excludes": [".venv", ".git", "outputs", "bench/results"]}, job_id)
    status, logs = finish_job(env, job_id, timeout=900)
    assert status == "SUCCEEDED", status + "\n" + logs[-5000:]
    assert "[run_all] finished" in logs
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["where"]) == {"source", "ingest", "caption", "tokenizer", "pretrain", "distill", "evaluate",
                                     "report"}
    for model in ("teacher", "student"):
        metrics = json.loads((out / "evaluate" / model / "summary.json").read_text())["metrics"]
        assert "zero_shot_segmentation/miou" in metrics
    assert (out / "pretrain" / "export" / "model.safetensors").is_file()
    assert (out / "distill" / "export" / "model.safetensors").is_file()
    assert (out / "report" / "report.md").is_file()

"""bench/gpu_train.sh on CPU (DEVICE=cpu): its commands, config keys and report, without a GPU.

This machine has no GPU, so the CUDA branch (NCCL, the GPU peak FLOP/s, GPU memory) is not run here;
everything else in the script is: the pretrain command line with every `--set` key it passes (unknown keys
fail loudly), in bf16 through DeepSpeed as on the GPU, the history it reads back and the JSON it writes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_train_script_runs_end_to_end_on_cpu(ray_local, tmp_path):
    result = tmp_path / "gpu_train.json"
    env = {**os.environ, "DEVICE": "cpu", "MODELS": "tiny:8", "STEPS": "4", "SCENES": "64", "WARMUP": "1", "PER_MODEL_S": "400",
           "OUT": str(tmp_path / "runs"), "RESULT": str(result), "PY": sys.executable,
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    (tmp_path / "runs").mkdir()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_train.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(result.read_text())
    assert report["device"] == "cpu" and report["precision"] == "bf16" and len(report["rows"]) == 1, report
    row = report["rows"][0]
    assert row["model"] == "tiny" and row["status"] == "ok" and row["steps"] == 3, (row, proc.stdout[-3000:])
    assert row["images_per_s_median"] > 0 and 0 < row["mfu_median"] < 1
    assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])


def test_gpu_train_script_rejects_an_unknown_device(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_train.sh")], capture_output=True, text=True,
                          env={**os.environ, "DEVICE": "tpu", "OUT": str(tmp_path)}, timeout=60)
    assert proc.returncode == 2 and "DEVICE must be gpu or cpu, got 'tpu'" in proc.stderr

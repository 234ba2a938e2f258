"""bench/gpu_step.py on CPU at tiny size, in a process where Ray, DeepSpeed, MLflow, vLLM, pyarrow and
pipelines/ cannot be imported (the GPU machine has torch, transformers, timm and torchvision, none of
those): the step, the report and the JSON it writes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "deepspeed", "mlflow", "vllm", "pyarrow", "pipelines")


def run_bench(*args: str) -> subprocess.CompletedProcess:
    code = ("import sys\n"
            f"for name in {BLOCKED!r}:\n"
            "    sys.modules[name] = None   # any import of it now fails\n"
            "from bench.gpu_step import main\n"
            "main(sys.argv[1:])\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_gpu_step_runs_tiny_on_cpu_with_torch_and_this_repository_only(tmp_path):
    result = tmp_path / "gpu_step.json"
    proc = run_bench("--device", "cpu", "--runs", "tiny:112:2", "--steps", "1", "--warmup", "1",
                     "--result", str(result))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(result.read_text())
    assert report["device"] == "cpu" and report["precision"] == "bf16" and report["compile"] is False
    [row] = report["rows"]
    assert row["model"] == "tiny" and row["status"] == "ok" and row["steps"] == 1, row
    assert row["images_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_memory_gib"] > 0
    assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
    assert row["predicted_memory_gib"] > 0
    assert "images_per_s" in proc.stdout and f"wrote {result}" in proc.stdout


def test_gpu_step_rejects_a_bad_run_spec(tmp_path):
    proc = run_bench("--device", "cpu", "--runs", "tiny:112", "--result", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "--runs takes MODEL:PX:BATCH (e.g. vit_b14:224:64), got 'tiny:112'" in proc.stderr
    proc = run_bench("--device", "cpu", "--runs", "vit_x99:224:8", "--result", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "unknown preset 'vit_x99'" in proc.stderr

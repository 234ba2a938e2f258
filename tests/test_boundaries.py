"""The library stays pure: nothing under tipsv2/ imports Ray, DeepSpeed, MLflow, boto3 or vLLM."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

FORBIDDEN = {"ray", "deepspeed", "mlflow", "boto3", "botocore", "vllm"}
ROOT = pathlib.Path(__file__).resolve().parents[1]


def imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_forbidden_imports_in_source():
    offenders = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & FORBIDDEN)
                 for p in (ROOT / "tipsv2").rglob("*.py") if imported_roots(p) & FORBIDDEN}
    assert not offenders, f"tipsv2/ must not import {sorted(FORBIDDEN)}: {offenders}"


def test_no_forbidden_modules_loaded_at_runtime():
    # Importing every tipsv2 module must not pull them in transitively either.
    code = ("import importlib, pkgutil, sys, tipsv2\n"
            "for m in pkgutil.walk_packages(tipsv2.__path__, 'tipsv2.'):\n"
            "    importlib.import_module(m.name)\n"
            f"print(sorted(set(k.split('.')[0] for k in sys.modules) & {FORBIDDEN!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

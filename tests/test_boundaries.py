"""Boundaries: nothing under tipsv2/ imports Ray, DeepSpeed, MLflow, boto3 or vLLM; no import circle in pipelines/."""

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


def pipeline_imports() -> dict[str, set[str]]:
    """Module -> the pipelines modules it imports anywhere in its body (an import inside a function counts:
    it dodges a circle at import time but keeps it). `from pkg import sub` names the submodule `pkg.sub`."""
    def name(path: pathlib.Path) -> str:
        parts = path.relative_to(ROOT).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name(p): p for p in (ROOT / "pipelines").rglob("*.py") if p.name != "__main__.py"}
    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
        graph[module] = {d for d in deps if d in modules and d != module}
    return graph


def test_pipelines_imports_have_no_circle():
    # Imports run one way: stage -> shared pipeline modules -> tipsv2 (CONVENTIONS.md).
    graph = pipeline_imports()
    assert "pipelines.storage" in graph["pipelines.caption.stage"]   # the graph sees package submodules

    def circle(start: str, module: str, path: tuple[str, ...], seen: set[str]) -> tuple[str, ...] | None:
        for dep in sorted(graph[module]):
            if dep == start:
                return (*path, dep)
            if dep not in seen:
                seen.add(dep)
                if found := circle(start, dep, (*path, dep), seen):
                    return found
        return None

    circles = [found for m in sorted(graph) if (found := circle(m, m, (m,), set()))]
    assert not circles, f"import circles in pipelines/: {circles}"


# pipelines/train/: imports run one way, down this list (a module imports only those below it), and none
# inside a function (deepspeed, ray, safetensors and the like excepted: heavy, loaded only where used).
TRAIN_LAYERS = ["driver", "local", "worker", "accumulate", "checkpoint", "export", "jobs", "zero", "perf", "config"]


def train_imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """(sibling modules imported at the top, sibling modules imported inside a function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipelines.train."):
            (nested if id(node) in inner else top).add(node.module.split(".")[2])
    return top, nested


def test_the_trainer_imports_run_one_way():
    modules = {p.stem for p in (ROOT / "pipelines" / "train").glob("*.py")} - {"__init__"}
    assert modules == set(TRAIN_LAYERS), f"a new module of pipelines/train/ wants a place in TRAIN_LAYERS: {modules}"
    for rank, name in enumerate(TRAIN_LAYERS):
        top, nested = train_imports(ROOT / "pipelines" / "train" / f"{name}.py")
        upward = {m for m in top if TRAIN_LAYERS.index(m) <= rank}
        assert not upward, f"pipelines/train/{name}.py imports {sorted(upward)}, which sit above it in {TRAIN_LAYERS}"
        assert not nested, f"pipelines/train/{name}.py imports {sorted(nested)} inside a function"


def test_the_library_holds_no_engine_or_tracking_config():
    """How a run is distributed and where it is recorded belong to pipelines/ (pipelines/train/config.py,
    pipelines/tracking.py); the library's configs describe the recipe alone."""
    import dataclasses

    from tipsv2 import configs

    roots = [configs.PretrainConfig, configs.DistillConfig, configs.RunConfig]
    assert all(not {"engine", "tracking"} & {f.name for f in dataclasses.fields(root)} for root in roots)
    assert not hasattr(configs, "EngineConfig") and not hasattr(configs, "TrackingConfig")


def test_no_pipeline_module_holds_many_concerns():
    """A file over about 350 lines in pipelines/ has grown a second concern: split it (CONTRIBUTING.md)."""
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "pipelines").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 350}
    assert not long, f"split these by concern: {long}"

"""Shared fixtures: real services started once per session (moto S3, local Ray) and tiny local models."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# ---------------------------------------------------------------- a fresh machine, every run
# The suite never reads or writes the user's home, Ray's default temp dir (/tmp/ray: its ray_current_cluster
# record) or any cache: each run sees a machine as CI's fresh one is, so state an earlier run left (a Ray token
# left in the home directory hid a failure once) can neither hide a failure nor be changed by a test. Everything
# lives under FRESH, removed at the end. Short path: Ray's socket paths under its temp dir must fit in 107 bytes.
FRESH = Path(tempfile.mkdtemp(prefix="tt", dir="/tmp"))
REPOSITORY = Path(__file__).resolve().parents[1]
USER_STATE = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
              "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "HF_HOME", "HF_HUB_CACHE",
              "TRANSFORMERS_CACHE", "TORCH_HOME", "TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME",
              "XDG_DATA_HOME", "MPLCONFIGDIR")


def fresh_machine(root: Path) -> dict[str, str]:
    """The environment of a fresh machine under `root`: an empty home, Ray's temp dir and an auth token of
    this run (through Ray's documented RAY_AUTH_TOKEN_PATH; `ray start --head` under token auth refuses to
    start without one, and a local `ray.init()` would otherwise write one into the home directory)."""
    home = root / "home"
    home.mkdir()
    token = root / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    return {"HOME": str(home), "RAY_TMPDIR": str(root), "RAY_AUTH_TOKEN_PATH": str(token)}


for _name in USER_STATE:
    os.environ.pop(_name, None)
os.environ.update(fresh_machine(FRESH))
# DeepSpeed's CPU accelerator JIT-compiles its shared-memory comm op (about 30 s on 2 cores) on the first
# init_distributed of a fresh home; `make venv` compiles it once into the venv, an install product like the venv's
# wheels, and every DeepSpeed process of the suite (Ray workers, job drivers, `ray start` nodes) loads it from there.
# Every process runs with the venv's bin first on PATH, as in an activated venv: torch builds with whichever `ninja`
# PATH finds, and the venv's (1.13, log v7) and the system's (1.11, log v5) each discard the other's build log, so a
# mixed PATH recompiled the op three times per suite.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
if (PREBUILT_OPS := Path(sys.prefix) / "torch_extensions").is_dir():   # the venv running the suite: .venv
    os.environ["TORCH_EXTENSIONS_DIR"] = str(PREBUILT_OPS)


def pytest_unconfigure(config):
    shutil.rmtree(FRESH, ignore_errors=True)


LEFT_ALONE = (".venv/", ".pytest_cache/", "__pycache__/", ".egg-info/")   # what running Python itself writes


def repository_changes() -> set[str] | None:
    """Paths git sees as changed, untracked or ignored in the repository (None without git or a .git)."""
    done = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPOSITORY,
                          capture_output=True, text=True)
    if done.returncode:
        return None
    return {line for line in done.stdout.splitlines() if not any(part in line for part in LEFT_ALONE)}


@pytest.fixture(scope="session", autouse=True)
def repository_left_as_found():
    """The suite writes nothing into the repository (an MLflow experiment without an artifact location put its
    artifacts in ./mlruns once): every file a test makes goes under a temp dir."""
    before = repository_changes()
    yield
    after = repository_changes()
    if before is not None and after is not None:
        assert after <= before, f"the tests left these in the repository: {sorted(after - before)}"


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server on 127.0.0.1 (bucket `tipsv2-test`); AWS env vars point at it."""
    from pipelines.testing import moto_server

    with moto_server(bucket="tipsv2-test") as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A local Ray with 4 logical CPUs (the vLLM pipeline waits forever with 2, ENVIRONMENT.md).

    Started after moto so that every Ray worker inherits the S3 endpoint and credentials.
    """
    import ray

    if not ray.is_initialized():
        # Idle workers kept warm (Ray's default keeps num_cpus of them): the trainer tests' Ray Data tasks
        # then reuse processes that imported torch already; measured 72 -> 59 s per later 4-step run.
        # address="local": always a Ray of our own, never one a `ray start` on this machine left in
        # /tmp/ray/ray_current_cluster (which a plain ray.init() would join).
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _system_config={"num_workers_soft_limit": 12})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A random-weight 2-layer Llama (head size 64) with a locally trained tokenizer, built once."""
    from pipelines.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "model")


@pytest.fixture(scope="session")
def tiny_paligemma(tmp_path_factory) -> str:
    """A random-weight PaliGemma (SigLIP 56 px + Gemma) with its processor, built once."""
    from pipelines.testing import build_tiny_paligemma

    return build_tiny_paligemma(tmp_path_factory.mktemp("tiny_paligemma") / "model")


# ---------------------------------------------------------------- training (pipelines/train/)

# The tiny preset shrunk for tests: 32 synthetic scenes, 4 rows per worker x 2 workers, 4 steps.
TRAIN_TEST_SETS = ("steps=4", "log_every=1", "data.batch_size=4", "data.synthetic.train_size=32",
                   "data.synthetic.val_size=4", "data.synthetic.test_size=4", "engine.workers=2",
                   "engine.cpus_per_worker=0.5", "engine.checkpoint_every=2")


@pytest.fixture(scope="session")
def train_cfg():
    """Factory: `train_cfg("engine.zero_stage=3", ...)` -> the test PretrainJobConfig with those overrides."""
    from pipelines.train.config import preset
    from tipsv2 import config_tree

    def make(*sets: str, base=lambda: preset("tiny")):
        cfg = base()
        for assignment in (*TRAIN_TEST_SETS, *sets):
            cfg = config_tree.override(cfg, assignment)
        return cfg

    return make


@pytest.fixture(scope="session")
def train_local_reference(train_cfg, tmp_path_factory):
    """The single-process loop (`--local`) on the same data with the global batch of 2 workers: 8 rows."""
    from pipelines.train import Job, read_history, run

    output = str(tmp_path_factory.mktemp("train_local_reference"))
    run(Job.PRETRAIN, train_cfg("data.batch_size=8", "engine.workers=1"), output, local=True)
    return output, read_history(output)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 for the session: (process, URI)."""
    from pipelines.testing import start_mlflow_server, stop_mlflow_server

    process, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    yield process, uri
    stop_mlflow_server(process)


REFERENCE_EXPERIMENT = "train-zero2-reference"


@pytest.fixture(scope="session")
def train_zero2_reference(ray_local, mlflow_server, train_cfg, tmp_path_factory):
    """An uninterrupted Ray Train + DeepSpeed ZeRO-2 run, 2 workers, tracked on the MLflow server (experiment
    REFERENCE_EXPERIMENT): the reference of the loop-equivalence, resume and S3 tests, and the run the
    MLflow test inspects. Returns (output, history, summary)."""
    from pipelines.train import Job, NoFaults, read_history, run

    output = str(tmp_path_factory.mktemp("train_zero2_reference"))
    cfg = train_cfg("engine.zero_stage=2", f"tracking.uri={mlflow_server[1]}", f"tracking.experiment={REFERENCE_EXPERIMENT}")
    summary = run(Job.PRETRAIN, cfg, output, faults=NoFaults())
    return output, read_history(output), summary

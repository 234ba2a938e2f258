"""The cluster as users meet it, simulated on one machine (#13): Ray's fake multi-node autoscaler with the node
types of cluster/aws.yaml (GPUs and accelerator types as declared resources; work runs on CPU), moto's S3 server,
and a real `mlflow server` whose artifact store is on that S3. cluster/README.md's per-stage commands go in, in
its order, each with `ray job submit --working-dir .` and cluster/runtime_env.yaml, to an s3:// run root:
ingest, caption, pretrain, distill, evaluate, with nothing but `--output` given to connect them (sizes are
small and captions come from the template backend: `SMALL`, `PRESET`). Checked: the autoscaler starts the
node types the stages ask for (the production requests of pipelines/resources.py land on their GPU node
types) and removes them when idle; outputs, checkpoints and MLflow artifacts are in S3 or on the MLflow
server; nothing is written to any node's copy of the working directory; the server holds one run per stage
with params, artifacts, and the trainers' step metrics (logged by rank 0 on another node).

The head owns its own temp dir and GCS port (the provider's `gcs_address`), and only its processes are
stopped afterwards (never `ray stop`, which would stop every Ray on the machine); its temp dirs are removed.
Worker CPU counts are capped at CPU_CAP: every fake node runs on this machine's cores. About 3 minutes on an
idle 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from pipelines import tracking_store
from pipelines.testing import healthy
from tests.test_job_submit import finish_job, free_port, ray_cli, start_job, stop_head

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "tipsv2-test"
CPU_CAP = 8            # logical CPUs of a fake node (aws.yaml's 32-192 would oversubscribe two cores)
IDLE_MINUTES = 0.5     # a fake node goes away after 30 idle seconds (less: nodes churn between stages)

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def fake_cluster_config(gcs_port: int, temp_dir: str = "/tmp/unused") -> dict:
    """cluster/aws.yaml's node types on the fake multi-node provider: same resources (CPU capped), one node each."""
    aws = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "min_workers": 0, "max_workers": 0}}
    for name, spec in aws["available_node_types"].items():
        if name == aws["head_node_type"]:
            continue
        resources = dict(spec["resources"])
        resources["CPU"] = min(resources["CPU"], CPU_CAP)
        types[name] = {"resources": resources, "node_config": {}, "min_workers": 0, "max_workers": 1}
    return {
        "cluster_name": "tipsv2-fake", "max_workers": len(types) - 1, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_MINUTES,
        # Ray's fake multi-node provider, each node with a temp dir of its own (tests/fake_nodes.py says why).
        "provider": {"type": "external", "module": "tests.fake_nodes.NodesWithOwnDisk", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": f"127.0.0.1:{gcs_port}", "node_temp_dir": temp_dir},
        "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "head_node_type": "ray.head.default", "available_node_types": types,
    }


def node_ip() -> str:
    """The address Ray gives this machine's nodes, which the trainer hands its ranks for MLflow."""
    import ray.util

    return ray.util.get_node_ip_address()


def start_mlflow_on_s3(root: Path, endpoint: str) -> tuple[subprocess.Popen, str]:
    """`mlflow server`: runs in sqlite under `root`, artifacts proxied to s3://BUCKET/mlflow on moto."""
    port = free_port()
    env = os.environ | {"MLFLOW_S3_ENDPOINT_URL": endpoint}
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         # 0.0.0.0 as on the cluster head (cluster/aws.yaml): the trainer hands ranks this node's address
         # (tracking_store.for_every_node), which is not 127.0.0.1 when Ray sees the machine's IP.
         "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--serve-artifacts", "--host", "0.0.0.0",
         # MLflow answers only Host headers it allows: localhost and RFC 1918 addresses by default, which a cloud
         # head's IP is; this machine's may not be (192.0.2.2 here).
         "--allowed-hosts", f"localhost:*,127.0.0.1:*,{node_ip()}:*",
         "--port", str(port), "--workers", "1"], env=env, stdout=(root / "mlflow.log").open("w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    if healthy(uri, within_s=600):   # about 15 s on an idle machine; minutes on a loaded one
        return process, uri
    os.killpg(process.pid, 9)
    raise RuntimeError(f"mlflow server did not start:\n{(root / 'mlflow.log').read_text()[-2000:]}")


class Autoscaler:
    """What the head's autoscaler did, from its own log (monitor.log): node types it launched, removed as idle,
    failed to launch (a node that does not register within Ray's 30 s, on a loaded machine), and the nodes
    its latest status report lists as active. Reading the log costs nothing; `ray status` would start a
    Python process per look."""

    def __init__(self, temp_dir: str) -> None:
        self.log = Path(temp_dir) / "session_latest" / "logs" / "monitor.log"

    def events(self, verb: str) -> list[str]:
        pattern = {"added": r":event_summary:Adding \d+ node\(s\) of type (\S+)\.",
                   "removed": r":event_summary:Removing \d+ nodes of type (\S+) \(idle\)\.",
                   "failed": r":event_summary:Failed to launch \d+ node\(s\) of type (\S+)\."}[verb]
        return re.findall(pattern, self.log.read_text(errors="replace"))

    def active(self) -> set[str]:
        reports = self.log.read_text(errors="replace").split("\nActive:\n")
        if len(reports) < 2:
            return set()
        block = reports[-1].split("Pending:")[0]
        return {m for m in re.findall(r"^ \d+ (\S+)$", block, re.M)} - {"ray.head.default"}


@pytest.fixture
def cluster(s3_endpoint, tmp_path):
    """(env for `ray` commands, GCS address, temp dir, MLflow URI) of a fresh fake autoscaling cluster."""
    gcs_port, dashboard = free_port(), free_port()
    temp_dir = f"/tmp/ra{uuid.uuid4().hex[:8]}"   # short: Ray's socket paths must fit in 107 bytes
    config = tmp_path / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(gcs_port, temp_dir)))
    mlflow_root = tmp_path / "mlflow"
    mlflow_root.mkdir()
    mlflow, mlflow_uri = start_mlflow_on_s3(mlflow_root, s3_endpoint)
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                        "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
                        "PYTHONPATH": str(ROOT),   # the head's autoscaler imports tests.fake_nodes
                        "RAY_agent_register_timeout_ms": "300000",   # a loaded machine starts agents slowly
                        "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    start_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    try:
        for attempt in range(3):   # Ray gives a raylet 30 s to register: a loaded machine can miss that
            done = ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=0",
                           f"--autoscaling-config={config}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
                           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                           f"--ray-client-server-port={free_port()}", "--disable-usage-stats", env=start_env,
                           timeout=240, check=attempt == 2)
            if done.returncode == 0:
                break
            stop_head(temp_dir)
        yield env, f"127.0.0.1:{gcs_port}", temp_dir, mlflow_uri
    finally:
        stop_head(temp_dir)
        os.killpg(mlflow.pid, 9)
        for path in Path("/tmp").glob(f"{Path(temp_dir).name}*"):   # the head's and the fake nodes' temp dirs
            shutil.rmtree(path, ignore_errors=True)


def submit(env: dict, entrypoint: list[str], runtime_env: dict, job_id: str, timeout: float) -> tuple[str, str]:
    """`ray job submit --working-dir .`; (final status, logs)."""
    start_job(env, entrypoint, runtime_env, job_id)
    return finish_job(env, job_id, timeout)


PROBE = """
import json, ray
from pipelines.resources import RESOURCE_REQUESTS, Stage, ray_remote_options
ray.init()
@ray.remote
def where():
    import os
    return os.environ.get("RAY_NODE_TYPE_NAME", "?")
placed = {s.value: ray.get(where.options(**ray_remote_options(RESOURCE_REQUESTS[s])).remote())
          for s in (Stage.CAPTION, Stage.PRETRAIN)}
print("PLACED " + json.dumps(placed))
"""


def probe_and_refusal(env: dict, runtime_env: dict, run: str, temp_dir: str) -> dict:
    """Two jobs at once: the probe (production resource requests: where each lands) and, on the head, a run with
    no tracking server and a local output: a sqlite file on the head, which runs no tasks, so every rank would
    log to a file of its own node's. Refused before any rank starts, naming the fix. Run between caption and
    pretrain: the caption node is still up, and the train node the probe starts serves pretrain next."""
    start_job(env, ["python", "-c", PROBE], {"excludes": runtime_env["excludes"]}, f"probe-{run}")
    local = {**runtime_env, "env_vars": runtime_env["env_vars"] | {"MLFLOW_TRACKING_URI": ""}}
    start_job(env, ["python", "-m", "pipelines.pretrain", "--config", "tiny", "--output", f"{temp_dir}-local/tiny",
                    "--set", "steps=1"], local, f"file-{run}")
    status, probe_logs = finish_job(env, f"probe-{run}", timeout=300)
    assert status == "SUCCEEDED", probe_logs[-3000:]
    status, refused_logs = finish_job(env, f"file-{run}", timeout=300)
    assert status == "FAILED" and "runs no tasks (0 CPUs" in refused_logs and "MLFLOW_TRACKING_URI" in refused_logs, \
        refused_logs[-3000:]
    return json.loads(probe_logs.rsplit("PLACED ", 1)[1].splitlines()[0])   # the last: the log echoes the script


def packed_files() -> set[str]:
    """What `--working-dir .` can have packed, relative to the repository: git's files (tracked, or untracked and
    not ignored); in a checkout without .git, every file under it."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout:
        return set(listed.stdout.split())
    return {str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()}


def s3_keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    keys, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **({"ContinuationToken": token} if token else {}))
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


# What the cluster README's commands become on this machine: only sizes, and the caption backend (a VLM needs
# vLLM on a GPU: ENVIRONMENT.md's torchvision trap keeps every VLM off CPU vLLM). Every other word is the README's.
SMALL = {
    "ingest": ["--set", "read_blocks=2"],
    "caption": [],
    "pretrain": ["--set", "steps=2", "--set", "log_every=1", "--set", "engine.checkpoint_every=1",
                 "--set", "engine.cpus_per_worker=0.5"],
    "distill": ["--set", "steps=2", "--set", "log_every=1", "--set", "engine.cpus_per_worker=0.5"],
    "evaluate": [],
}
PRESET = {("caption", "default"): "template", ("pretrain", "vit_b14"): "tiny", ("distill", "vit_b14"): "tiny"}


def readme_commands(root: str, images: str) -> list[tuple[str, list[str]]]:
    """cluster/README.md's per-stage `$SUBMIT -- python -m pipelines.<stage> ...` lines, in their order, as
    (stage, argv) with $OUT = `root`, the README's image bucket = `images`, and the sizes above."""
    text = (ROOT / "cluster" / "README.md").read_text()
    commands = []
    for line in re.findall(r"^\$SUBMIT -- (python -m pipelines\.\w+ [^#\n]*)", text, re.M):
        argv = shlex.split(line.replace("$OUT", root).replace("s3://YOUR-BUCKET/images/", images))
        stage = argv[2].removeprefix("pipelines.")
        if stage == "run_all":
            continue
        if "--config" in argv:
            at = argv.index("--config") + 1
            argv[at] = PRESET.get((stage, argv[at]), argv[at])
        commands.append((stage, argv + SMALL[stage]))
    return commands


def readme_runtime_env(mlflow_uri: str) -> dict:
    """cluster/runtime_env.yaml, pointed at this test's MLflow server (`--working-dir .` is on the command line)."""
    runtime_env = {k: v for k, v in yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text()).items()
                   if k != "working_dir"}
    runtime_env["excludes"] += ["/bench/results"]
    runtime_env["env_vars"] |= {"MLFLOW_TRACKING_URI": mlflow_uri, "TIPSV2_GIT_COMMIT": "test",
                                # a loaded machine's server answers slowly (tracking.MlflowSink's 10 s, no retry)
                                "MLFLOW_HTTP_REQUEST_TIMEOUT": "120", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"}
    return runtime_env


def run_stages(env: dict, commands: list[tuple[str, list[str]]], runtime_env: dict, run: str, logs_dir: Path) -> dict:
    """Each command as its own job, in order; each must succeed. Seconds per stage."""
    seconds = {}
    for stage, argv in commands:
        started = time.perf_counter()
        status, logs = submit(env, argv, runtime_env, f"{stage}-{run}", timeout=1200)
        seconds[stage] = round(time.perf_counter() - started)
        (logs_dir / f"{stage}.log").write_text(logs)   # the driver's and (forwarded) every worker's output
        assert status == "SUCCEEDED", f"{shlex.join(argv)}\n{status}\n{logs[-6000:]}"
    return seconds


def check_autoscaler(autoscaler: Autoscaler, placed: dict, added: list, removed: list, failed: list) -> None:
    """The autoscaler started what the stages asked for, and removed every worker node once idle."""
    assert placed == {"caption": "caption_gpu", "pretrain": "train_gpu"}, placed
    assert {"cpu_worker", "caption_gpu", "train_gpu"} <= set(added), added
    assert not autoscaler.active(), f"still active after the idle timeout: {autoscaler.active()}"
    for kind in set(added):
        assert added.count(kind) - failed.count(kind) == removed.count(kind), (kind, added, failed, removed)


def check_s3(endpoint: str, root: str) -> None:
    """Outputs and checkpoints on S3; MLflow artifacts in S3, through the server."""
    prefix = root.split(f"{BUCKET}/", 1)[1]
    keys = set(s3_keys(endpoint, prefix + "/"))
    for wanted in ("ingest/summary.json", "caption/summary.json", "pretrain/export/model.safetensors",
                   "distill/export/model.safetensors", "evaluate/summary.json"):
        assert f"{prefix}/{wanted}" in keys, wanted
    assert any(k.startswith(f"{prefix}/ingest/images/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith(f"{prefix}/pretrain/ray/train/") for k in keys), "no checkpoint on S3"
    assert not any("mlflow.db" in k or "metrics_offline" in k for k in keys)
    assert s3_keys(endpoint, "mlflow/"), "no MLflow artifact on S3"


def check_runs(mlflow_uri: str, root: str, logs_dir: Path) -> None:
    """One run per stage on the server, with params, step metrics and artifacts; evaluate's on the distilled model."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    stage_of = {r.info.run_id: r.data.tags.get("tipsv2.stage") or r.data.tags.get("tipsv2.job") for r in runs}
    assert sorted(stage_of.values()) == ["caption", "distill", "evaluate", "ingest", "pretrain"], stage_of
    for run in runs:
        stage = stage_of[run.info.run_id]
        assert run.data.params and run.info.status == "FINISHED", (stage, run.info)
        assert client.list_artifacts(run.info.run_id), f"{stage}: no artifacts"
        if stage in ("pretrain", "distill"):   # logged by rank 0, on a train node: the address check
            assert len(client.get_metric_history(run.info.run_id, "loss/total")) == 2, logs_dir / f"{stage}.log"
    evaluated = next(r for r in runs if stage_of[r.info.run_id] == "evaluate")
    assert evaluated.data.params["checkpoint"] == f"{root}/distill/export"
    assert any(name.startswith("eval/tiny/") for name in evaluated.data.metrics), evaluated.data.metrics


def check_working_dirs(temp_dir: str, node_types: set[str]) -> None:
    """Nothing written to the job's working directory on any node: every file there is one `--working-dir .`
    packed (what git tracks or would track; Ray honours .gitignore), none new."""
    packed = packed_files()
    unpacked = [d for d in Path("/tmp").glob(f"{Path(temp_dir).name}*/session_*/runtime_resources/working_dir_files/"
                                             "_ray_pkg_*") if d.is_dir()]
    assert len(unpacked) >= 1 + len(node_types), unpacked   # the head's and every worker node's
    written = [f"{d}/{rel}" for d in unpacked for p in d.rglob("*") if p.is_file()
               and "__pycache__" not in p.parts and (rel := str(p.relative_to(d))) not in packed]
    assert not written, written


def test_the_cluster_readme_on_a_simulated_autoscaling_cluster(cluster, s3_endpoint, tmp_path):
    from pipelines import run_all
    from tipsv2.data.synthetic import SyntheticConfig

    env, gcs, temp_dir, mlflow_uri = cluster
    autoscaler = Autoscaler(temp_dir)
    run = uuid.uuid4().hex[:6]
    root, source = f"s3://{BUCKET}/runs/{run}", f"s3://{BUCKET}/images-{run}"
    run_all.write_source(run_all.SourceConfig(skimage_samples=False, synthetic=SyntheticConfig(
        train_size=16, val_size=4, test_size=4)), source)   # a user's bucket of images + alt-text
    commands = readme_commands(root, f"{source}/images/")
    assert [stage for stage, _ in commands] == ["ingest", "caption", "pretrain", "distill", "evaluate"], commands
    runtime_env = readme_runtime_env(mlflow_uri)

    clock = time.perf_counter()
    seconds = run_stages(env, commands[:2], runtime_env, run, tmp_path)
    placed = probe_and_refusal(env, runtime_env, run, temp_dir)
    seconds["probe"] = round(time.perf_counter() - clock) - sum(seconds.values())
    seconds |= run_stages(env, commands[2:], runtime_env, run, tmp_path)
    stages_s = time.perf_counter() - clock
    # What the jobs left, checked while the nodes idle out.
    check_s3(s3_endpoint, root)
    # The server's Host check, as ranks meet it: an address it does not allow is refused at start with the fix.
    with pytest.raises(ValueError, match=r"does not answer at http://127.0.0.2:\d+.*\(Host header refused\)"):
        tracking_store.shared_server(mlflow_uri, "127.0.0.2", nodes=3)
    check_runs(mlflow_uri, root, tmp_path)
    deadline = time.time() + 60 * IDLE_MINUTES + 120   # idle nodes are removed after IDLE_MINUTES
    while time.time() < deadline and autoscaler.active():
        time.sleep(2)
    total_s = time.perf_counter() - clock
    added, removed, failed = (autoscaler.events(v) for v in ("added", "removed", "failed"))
    print(f"\nautoscaling test: stage jobs {seconds} ({stages_s:.0f} s), total {total_s:.0f} s; launched {added}, "
          f"removed when idle {removed}, failed to start in time {failed}")

    check_autoscaler(autoscaler, placed, added, removed, failed)
    check_working_dirs(temp_dir, set(added))
    assert total_s < 3000

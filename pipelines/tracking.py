"""MLflow tracking behind one sink: rank 0 logs, everyone else (and tests that want silence) gets a no-op.

    sink = open_sink(cfg.tracking, output_root="outputs/run", rank=rank, run_id=resumed_run_id)
    sink.log_params(config_tree.to_dict(cfg)); sink.log_metrics({"loss/total": 1.2}, step=0); sink.close()

- Tracking URI: the config's, else MLFLOW_TRACKING_URI, else a sqlite file under a local output root
  (`<output>/mlflow.db`, artifacts in `<output>/mlartifacts`). Refused at start, with the fix, where a file
  store would lose runs or other nodes could not reach the server (`pipelines/tracking_store.py`).
- A run is reattached by id on resume (the trainer stores the id in its checkpoints).
- If the server is unreachable, metrics are buffered in memory and appended to
  `<output>/metrics_offline.jsonl`; they are sent when a later call succeeds. Tracking never crashes
  training.
- Credentials never reach MLflow: params and tags whose key or value looks like a secret are redacted.
- Every new run carries the context MLflow's fluent API would set (`run_context`): user, source (the
  `python -m` module), source type and the git commit of the code (`git rev-parse`, or TIPSV2_GIT_COMMIT
  where the working dir has no .git, as under `ray job submit`); with
  MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true, MLflow's system metrics monitor samples CPU, memory and GPU.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipelines.tracking_store import REDACTED, redact_uri, store_uri

log = logging.getLogger(__name__)

# "token" only as a whole name part: `session_token` is a secret, `max_tokens` and `tokenizer` are not.
SECRET_KEY = re.compile(r"(secret|password|passwd|credential|api[_-]?key|access[_-]?key|auth(?!or)|"
                        r"(^|[._-])token($|[._-]))", re.I)
SECRET_VALUE = re.compile(r"(AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|://[^/\s:@]+:[^/\s@]+@)")
COMMIT_ENV = "TIPSV2_GIT_COMMIT"
SYSTEM_METRICS_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
REPOSITORY = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Where a stage's MLflow run goes (every stage's config has one, as `tracking`)."""
    uri: str | None = None                # MLflow tracking URI; None = MLFLOW_TRACKING_URI or sqlite under the output
    experiment: str = "tipsv2"
    run_name: str | None = None
    parent_run_id: str | None = None      # nest this run under that one (run_all sets it for its steps)
    # MLflow registered model every training export becomes a version of ({job}: pretrain | distill); None: none
    registered_model: str | None = "tipsv2-{job}"


def git_commit(directory: Path = REPOSITORY) -> str | None:
    """The commit of the code that runs: TIPSV2_GIT_COMMIT, else `git rev-parse HEAD` in its repository
    (None outside one, e.g. a Ray job's working dir, which ships without .git)."""
    if env := os.environ.get(COMMIT_ENV):
        return env
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def run_context() -> dict[str, str]:
    """The tags MLflow's fluent `start_run` sets, which the client API used here does not."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    source = spec.name if spec is not None else Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    tags = {"mlflow.user": getpass.getuser(), "mlflow.source.name": source, "mlflow.source.type": "LOCAL"}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    return tags


class MetricsSink(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullSink:
    """Does nothing: ranks other than 0, and runs with tracking turned off."""
    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; secrets redacted by key name or value shape."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, name + ".")
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        flat[name] = REDACTED if SECRET_KEY.search(name) or SECRET_VALUE.search(text) else text[:6000]
    return flat


def numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a summary as metric names (`written/images`); booleans and text left out."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in numbers(value, f"{prefix}{key}/").items()}
    ok = isinstance(tree, (int, float)) and not isinstance(tree, bool)
    return {prefix.rstrip("/"): float(tree)} if ok else {}


class MlflowSink:
    """Logs to one MLflow run through MlflowClient; buffers and spills to disk when the server is down."""

    def __init__(self, *, uri: str, experiment: str, run_name: str | None = None, run_id: str | None = None,
                 parent_run_id: str | None = None, offline_dir: str | None = None) -> None:
        # Fail fast instead of MLflow's default minutes of retries when the server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        # The registry too at `uri`: without it MlflowClient takes MLflow's global registry URI, which the
        # fluent API (pipelines/registry.py) may have pointed at another store earlier in this process.
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.offline = Path(offline_dir) / "metrics_offline.jsonl" if offline_dir else None
        self.pending: list[tuple[dict[str, float], int, int]] = []
        if run_id is not None:
            self.run_id = run_id
            # Reattaching happens on resume, possibly while the server is down: never fatal.
            self._safely(lambda: self.client.update_run(run_id, status="RUNNING"), what="run status")
        else:
            experiment_id = self._experiment(experiment, offline_dir)
            tags = run_context() | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        self.monitor = self._system_metrics()

    def _system_metrics(self):
        """MLflow's CPU / memory / GPU sampler on this run, when MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is true."""
        if os.environ.get(SYSTEM_METRICS_ENV, "").lower() not in ("1", "true"):
            return None
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.uri)
        return monitor if self._safely(monitor.start, what="system metrics") else None

    def _experiment(self, name: str, output_root: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(name, artifact_location=artifact_location(self.uri, output_root))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        items = [Param(k, v) for k, v in flatten(params).items()]
        self._safely(lambda: [self.client.log_batch(self.run_id, params=items[i:i + 100])
                              for i in range(0, len(items), 100)], what="params")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.pending.append(({k: float(v) for k, v in metrics.items()}, step, int(time.time() * 1000)))
        if self._safely(self._flush, what="metrics"):
            return
        if self.offline is not None:  # keep a durable copy of what could not be sent
            self.offline.parent.mkdir(parents=True, exist_ok=True)
            with self.offline.open("a") as f:
                f.write(json.dumps({"step": step, "metrics": self.pending[-1][0]}) + "\n")

    def _flush(self) -> None:
        from mlflow.entities import Metric
        while self.pending:
            values, step, stamp = self.pending[0]
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])
            self.pending.pop(0)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's whole tree (under `artifact_path`)."""
        log = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
        self._safely(lambda: log(self.run_id, str(path), artifact_path), what="artifact")

    def set_tags(self, tags: dict[str, str]) -> None:
        safe = flatten(tags)
        self._safely(lambda: [self.client.set_tag(self.run_id, k, v) for k, v in safe.items()], what="tags")

    def close(self, status: str = "FINISHED") -> None:
        if self.monitor is not None:
            self._safely(self.monitor.finish, what="system metrics")
        self._safely(self._flush, what="metrics")
        self._safely(lambda: self.client.set_terminated(self.run_id, status=status), what="run status")

    def _safely(self, action, *, what: str) -> bool:
        try:
            action()
            return True
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            log.warning("MLflow %s not logged to %s (%s: %s); training goes on", what, redact_uri(self.uri),
                        type(err).__name__, str(err)[:200])
            return False


def artifact_location(uri: str, output_root: str | None) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: under a local output, else beside the database
    file. MLflow's own default is ./mlruns of whatever directory the process runs in (runs' exports and plots
    scattered into the working directory, a repository's too); a server or a remote store decides for itself."""
    if not uri.startswith("sqlite:"):
        return None
    if output_root and "://" not in output_root:
        return (Path(output_root).resolve() / "mlartifacts").as_uri()
    database = Path(uri.removeprefix("sqlite:///"))   # sqlite:////abs/x.db -> /abs/x.db; sqlite:///x.db -> x.db
    return (database.resolve().parent / "mlartifacts").as_uri()


def open_sink(cfg: TrackingConfig, *, output_root: str | None, rank: int = 0, run_id: str | None = None,
              parent_run_id: str | None = None) -> MetricsSink:
    """The sink for this process: MLflow on rank 0, NullSink elsewhere.

    A run started inside `pipelines.run_all` becomes a child of its parent run: run_all hands every step
    its tracking config with `uri` and `parent_run_id` set.
    """
    if rank != 0:
        return NullSink()
    parent_run_id = parent_run_id or cfg.parent_run_id
    offline = output_root if output_root and "://" not in output_root else None
    return MlflowSink(uri=store_uri(cfg.uri, output_root), experiment=cfg.experiment, run_name=cfg.run_name,
                      run_id=run_id, parent_run_id=parent_run_id, offline_dir=offline)

"""Where a run's records go: the tracking URI of a stage (`store_uri`) and the one its ranks on other nodes use
(`for_every_node`). A file store that would lose runs (a remote output, several nodes, a CPU-less head) and
a server that the other nodes cannot reach are refused at start with the fix; cluster/README.md, "MLflow on
a cluster". No MLflow import: the checks are plain HTTP and Ray's node table.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from pipelines.errors import UsageError

log = logging.getLogger(__name__)

REDACTED = "***"


LOOPBACK = re.compile(r"^(https?://)(127\.0\.0\.1|localhost)([:/]|$)")
FIX = ("set MLFLOW_TRACKING_URI (or --set tracking.uri=...) to an MLflow server every node reaches, e.g. the "
       "one cluster/aws.yaml starts on the head: http://HEAD_IP:5000 (cluster/README.md, 'MLflow on a cluster')")


def is_local_store(uri: str) -> bool:
    """A tracking store in this node's file system (sqlite file, file store, plain path)."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def ray_nodes() -> int:
    """Alive nodes of the Ray cluster this process joined; 0 when it joined none (Ray is never started here)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 0
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def require_shared_store(uri: str, output_root: str | None) -> str:
    """`uri`, or ValueError with the fix when it is a local file store and the Ray cluster this process joined
    has several nodes: ranks on the others would open files of their own ("run not found")."""
    nodes = ray_nodes()
    if is_local_store(uri) and nodes > 1:
        raise ValueError(f"MLflow tracking store {redact_uri(uri)} is a file on this node, but the Ray cluster has "
                         f"{nodes} nodes: runs logged from the others would not find it and a deleted cluster takes "
                         f"it along; {FIX}")
    return uri


def store_uri(configured: str | None, output_root: str | None) -> str:
    """The tracking URI of a run: the configured one, MLFLOW_TRACKING_URI, else a sqlite file under a local
    output. ValueError naming the fix where a file store would lose runs: the output is remote (s3://, gs://)
    and no URI is set, or a file store on a cluster of several nodes (require_shared_store)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and output_root and "://" in output_root:
        raise ValueError(f"MLflow: the output {output_root} is remote and no tracking URI is set (a sqlite file on "
                         f"this node would be lost with it); {FIX}")
    return require_shared_store(uri or default_uri(output_root), output_root)


def for_every_node(uri: str, output_root: str | None) -> str:
    """The tracking URI as ranks on other nodes reach it. In a cluster this process joined (`ray job submit`, whose
    drivers run on the head, or a driver started on a node of a running cluster) a loopback server
    (http://127.0.0.1:5000, the one the cluster configs start on the head) becomes this node's IP, checked to
    answer there (`shared_server`); an autoscaling cluster may have no other node yet, so the count of nodes now
    does not decide it. A local file store is refused on several nodes (`require_shared_store`), and where this
    node runs no tasks (a joined cluster's CPU-less head: every rank starts elsewhere)."""
    if not joined_cluster():
        return require_shared_store(uri, output_root)
    if LOOPBACK.match(uri):
        import ray.util

        return shared_server(uri, ray.util.get_node_ip_address(), nodes=ray_nodes())
    if is_local_store(uri) and not driver_node_runs_tasks():
        raise ValueError(f"MLflow tracking store {redact_uri(uri)} is a file on this node, but this node of the Ray "
                         f"cluster runs no tasks (0 CPUs, as the cluster configs' head): the ranks start on other "
                         f"nodes, which would not find it; {FIX}")
    return require_shared_store(uri, output_root)


def joined_cluster() -> bool:
    """Whether this process joined a Ray cluster that it did not start (ray.init() found a running one)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    node = ray._private.worker._global_node   # `ray_init_cluster`: ray.init() started this cluster itself
    return not getattr(node, "ray_init_cluster", True)


def driver_node_runs_tasks() -> bool:
    """Whether the node this driver runs on offers CPUs (a head with 0, as in cluster/, sends every rank away)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return any(node["NodeID"] == here and node.get("Resources", {}).get("CPU", 0) > 0 for node in ray.nodes())


def shared_server(uri: str, node_ip: str, *, nodes: int) -> str:
    """`uri` (a loopback MLflow server on this node) with `node_ip` for its host, once a real API call answers
    there. If it does not (a server listening on 127.0.0.1 only, or MLflow's Host check refusing the address),
    ranks on other nodes would lose every metric: ValueError with the fix on a cluster of several nodes; on a
    single node `uri` itself, with a warning (nodes added later would not reach it)."""
    shared = LOOPBACK.sub(lambda m: f"{m.group(1)}{node_ip}{m.group(3)}", uri)
    problem = _refusal(shared)
    if problem is None:
        return shared
    message = (f"MLflow server {redact_uri(uri)} does not answer at {redact_uri(shared)}, where ranks on other "
               f"nodes reach it ({problem}); start it with `--host 0.0.0.0 --allowed-hosts {node_ip}:*,localhost:*` "
               f"(MLflow answers only Host headers it allows: localhost and private IPs by default), or set "
               f"tracking.uri to an address every node reaches")
    if nodes > 1:
        raise ValueError(message)
    log.warning("%s; this Ray cluster has one node now, so runs log to %s", message, redact_uri(uri))
    return uri


def check_answers(uri: str, timeout_s: float = 5) -> None:
    """UsageError when `uri` names an MLflow server (http, https) that does not answer: every run and metric of
    the stage would be lost, or the stage would fail later with a traceback."""
    if not uri.startswith(("http://", "https://")):
        return
    problem = _refusal(uri, timeout_s)
    if problem is not None:
        raise UsageError(f"MLflow tracking URI {redact_uri(uri)} does not answer ({problem}); start the server "
                         "(`mlflow server --backend-store-uri sqlite:///PATH/mlflow.db --host 127.0.0.1 --port 5000`), "
                         "or leave tracking.uri and MLFLOW_TRACKING_URI unset to log to a sqlite file under --output")


def _refusal(uri: str, timeout_s: float = 10) -> str | None:
    """None when the server at `uri` answers an API request (not /health, which skips MLflow's Host check); else
    why not, in a few words. Any HTTP answer but MLflow's Host refusal counts: credentials are the client's
    concern (a 401 here would be answered with them)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1",
                               timeout=timeout_s).close()
        return None
    except urllib.error.HTTPError as err:
        refused = err.code == 403 and b"Invalid Host header" in err.read()
        return "Host header refused" if refused else None
    except OSError as err:   # connection refused, timed out, no route
        return f"{type(err).__name__}: {str(err)[:160]}"


def default_uri(output_root: str | None) -> str:
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    root = output_root if output_root and "://" not in output_root else str(Path.home() / ".tipsv2")
    Path(root).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def redact_uri(uri: str) -> str:
    return re.sub(r"://[^/@]+@", "://" + REDACTED + "@", uri)

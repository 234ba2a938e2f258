"""What a Ray cluster launcher YAML offers: its node types with their resources, caps and on-demand prices,
and which node type a stage's worker lands on.

    cluster = read_cluster("cluster/aws.yaml")          # prices from cluster/prices.yaml
    node = choose_node("pretrain", {"GPU": 1, "CPU": 8}, cluster)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines.resources import ResourceDict, accelerator, fitting_node_types, node_type_resources, workers_per_node

ROOT = Path(__file__).resolve().parents[1]
PRICES = ROOT / "cluster" / "prices.yaml"


class PlanError(ValueError):
    """A plan that cannot be made: a bad input, or a stage no node type can run."""


@dataclass(frozen=True, kw_only=True)
class NodeType:
    name: str
    instance: str                         # InstanceType (AWS) or machineType (GCP)
    resources: dict[str, float]
    max_workers: int
    price: float | None                   # USD per node-hour, on demand; None when the price table lacks it

    @property
    def gpu(self) -> str | None:
        return accelerator(self.resources)

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))


@dataclass(frozen=True, kw_only=True)
class Cluster:
    path: str
    provider: str
    max_workers: int                      # the whole cluster's cap on worker nodes
    node_types: dict[str, NodeType]
    price_source: str


def read_prices(path: Path, provider: str) -> tuple[dict[str, float], str]:
    """(USD per hour by instance type, "source (as of)") of `provider` in a prices file."""
    if not path.is_file():
        raise PlanError(f"price file {path} not found; expected a YAML like cluster/prices.yaml")
    table = yaml.safe_load(path.read_text()) or {}
    if provider not in table:
        raise PlanError(f"price file {path} has no prices for provider {provider!r}; it has {sorted(table)}")
    entry = table[provider]
    return {k: float(v) for k, v in entry["instances"].items()}, f"{entry['source']} (as of {entry['as_of']})"


def read_cluster(path: str | Path, prices: Path = PRICES) -> Cluster:
    """The node types of a Ray cluster launcher YAML with their instance types, caps and prices."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"cluster config {path} not found; expected a Ray cluster launcher YAML such as "
                        f"cluster/aws.yaml or cluster/gcp.yaml")
    config = yaml.safe_load(path.read_text())
    resources = node_type_resources(path)
    provider = config["provider"]["type"]
    table, source = read_prices(prices, provider)
    types = {}
    for name, node in config["available_node_types"].items():
        instance = node["node_config"].get("InstanceType") or node["node_config"].get("machineType", "")
        types[name] = NodeType(name=name, instance=instance, resources=resources[name],
                               max_workers=int(node.get("max_workers", 0)), price=table.get(instance))
    return Cluster(path=str(path), provider=provider, max_workers=int(config.get("max_workers", 0)),
                   node_types=types, price_source=source)


def choose_node(stage: str, request: ResourceDict, cluster: Cluster) -> NodeType:
    """The node type a request runs on: among those it fits, the cheapest per worker (Ray's autoscaler
    is free to pick another fitting type; the plan names the alternatives in its notes)."""
    names = [n for n in fitting_node_types(request, {k: v.resources for k, v in cluster.node_types.items()})
             if cluster.node_types[n].max_workers > 0]
    if not names:
        offered = {k: v.resources for k, v in cluster.node_types.items()}
        raise PlanError(f"stage {stage}: a worker asking for {dict(request)} fits no node type of {cluster.path}; "
                        f"node types offer {offered}")

    def per_worker(name: str) -> float:
        node = cluster.node_types[name]
        return (node.price if node.price is not None else math.inf) / workers_per_node(request, node.resources)
    return cluster.node_types[min(names, key=per_worker)]


def node_cap(node: NodeType, cluster: Cluster) -> int:
    return min(node.max_workers, cluster.max_workers) if cluster.max_workers else node.max_workers


def cost(node: NodeType, nodes: int, wall_s: float) -> float | None:
    return None if node.price is None else node.price * nodes * wall_s / 3600

"""What each pipeline stage asks Ray for, and what the cluster configs offer.

`RESOURCE_REQUESTS` is the one table the production stages read when they ask Ray for a worker
(a Ray Data task or actor, a vLLM engine replica, a Ray Train rank). The node types live in
cluster/aws.yaml, cluster/gcp.yaml and cluster/kuberay/*.yaml; `node_type_resources` reads them back
(through Ray's own KubeRay translation for the manifests) so tests/test_cluster.py can prove every
request fits a worker node type in every config, without GPUs stranded by a CPU request.

Accelerator pinning follows Ray's convention (`ray.remote(accelerator_type=...)`,
`ScalingConfig(accelerator_type=...)`): a node with that GPU advertises `accelerator_type:<X>` = 1,
and a worker asks for a sliver of it, so any number of workers can share the node.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import yaml

ACCELERATOR_PREFIX = "accelerator_type:"  # ray._common.utils.RESOURCE_CONSTRAINT_PREFIX
ACCELERATOR_SLIVER = 0.001  # what Ray itself requests for `accelerator_type=` (unitless)
L4 = f"{ACCELERATOR_PREFIX}L4"  # inference GPU, 24 GB
H100 = f"{ACCELERATOR_PREFIX}H100"  # training GPU, 80 GB, NVLink within the node

ResourceDict = Mapping[str, float]


class Stage(enum.StrEnum):
    INGEST = "ingest"
    CAPTION = "caption"
    PRETRAIN = "pretrain"
    DISTILL = "distill"
    EVALUATE = "evaluate"


def _frozen(request: dict[str, float]) -> ResourceDict:
    return MappingProxyType(request)


# Per worker, production presets. Units: CPU and GPU in cores / devices, accelerator_type unitless.
RESOURCE_REQUESTS: Mapping[Stage, ResourceDict] = MappingProxyType(
    {
        # One Ray Data read / decode / validate / dedup task.
        Stage.INGEST: _frozen({"CPU": 1}),
        # One vLLM engine replica, tensor parallel 1: a 7-8B VLM in bf16 fits one 24 GB L4.
        Stage.CAPTION: _frozen({"CPU": 1, "GPU": 1, L4: ACCELERATOR_SLIVER}),
        # One Ray Train rank under DeepSpeed; 8 CPUs per rank keep the CPU-side crops and masks fed
        # and leave the rest of an 8-GPU node to Ray Data's streaming preprocessing.
        Stage.PRETRAIN: _frozen({"CPU": 8, "GPU": 1, H100: ACCELERATOR_SLIVER}),
        Stage.DISTILL: _frozen({"CPU": 8, "GPU": 1, H100: ACCELERATOR_SLIVER}),
        # Frozen-feature suites: one forward-only worker; inference GPUs are enough up to vit_g14.
        Stage.EVALUATE: _frozen({"CPU": 4, "GPU": 1, L4: ACCELERATOR_SLIVER}),
    }
)


def training_request(stage: Stage, *, use_gpu: bool, cpus_per_worker: float) -> dict[str, float]:
    """What one Ray Train rank of `stage` (pretrain, distill) asks for: on GPUs the stage's production
    request, which the cluster node types offer; on CPU machines `cpus_per_worker` CPUs."""
    return dict(RESOURCE_REQUESTS[stage]) if use_gpu else {"CPU": cpus_per_worker}


def accelerator(request: ResourceDict) -> str | None:
    """The accelerator type a request pins (`"L4"` for `accelerator_type:L4`), or None."""
    pins = [name.removeprefix(ACCELERATOR_PREFIX) for name in request if name.startswith(ACCELERATOR_PREFIX)]
    if len(pins) > 1:
        raise ValueError(f"request {dict(request)} pins {len(pins)} accelerator types; expected at most one")
    return pins[0] if pins else None


def ray_remote_options(request: ResourceDict) -> dict:
    """`request` as keyword arguments for `ray.remote` / `.options` / Ray Data `map_batches`.

    Ray takes CPU and GPU as `num_cpus` / `num_gpus` and refuses them inside `resources`. `num_cpus`
    is always set: left out, Ray would give a task 1 CPU that the request did not ask for.
    """
    options = {
        "num_cpus": request.get("CPU", 0),
        "resources": {name: amount for name, amount in request.items() if name not in ("CPU", "GPU")},
    }
    if "GPU" in request:
        options["num_gpus"] = request["GPU"]
    return options


def node_type_resources(path: str | Path) -> dict[str, dict[str, float]]:
    """Resources per node type of a cluster config: a Ray cluster launcher YAML, a KubeRay
    RayCluster, or a RayJob (its embedded rayClusterSpec). Includes the head node type."""
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a YAML mapping, got {type(config).__name__}")
    kind = config.get("kind")
    if kind == "RayCluster":
        return _kuberay_node_types(config["metadata"], config["spec"])
    if kind == "RayJob":
        return _kuberay_node_types(config["metadata"], config["spec"]["rayClusterSpec"])
    if kind is not None:
        raise ValueError(f"{path}: kind {kind!r} is not a cluster; expected RayCluster or RayJob")
    if "available_node_types" not in config:
        raise ValueError(f"{path}: a cluster launcher config needs available_node_types")
    return {name: dict(node["resources"]) for name, node in config["available_node_types"].items()}


def _kuberay_node_types(metadata: dict, spec: dict) -> dict[str, dict[str, float]]:
    # Ray's autoscaler derives node types from the CR this way on a real KubeRay cluster. Imported
    # here: the autoscaler package is not needed by stages that only read RESOURCE_REQUESTS.
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    ray_cr = {"metadata": {"namespace": "default", **metadata}, "spec": spec}
    node_types = _derive_autoscaling_config_from_ray_cr(ray_cr)["available_node_types"]
    return {name: dict(node["resources"]) for name, node in node_types.items()}


def workers_per_node(request: ResourceDict, node: Mapping[str, float]) -> int:
    """How many workers asking for `request` one node with resources `node` can hold at once."""
    counts = []
    for name, amount in request.items():
        if amount < 0:
            raise ValueError(f"resource {name!r}: negative request {amount}")
        if amount > 0:
            # + 1e-9 absorbs float error (0.3 / 0.1 == 2.9999999999999996); Ray counts in 1e-4 units.
            counts.append(math.floor(node.get(name, 0) / amount + 1e-9))
    if not counts:
        raise ValueError(f"request {dict(request)} asks for nothing")
    return min(counts)


def fitting_node_types(request: ResourceDict, node_types: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Names of the node types on which at least one worker asking for `request` fits."""
    return [name for name, node in node_types.items() if workers_per_node(request, node) >= 1]

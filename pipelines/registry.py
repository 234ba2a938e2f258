"""MLflow model registry: every training export becomes a version of a registered model; `models:/NAME/VERSION`
names it again for evaluation and comparison.

    register_export(sink, cfg.tracking, job="pretrain", hf_dir=".../export/hf", datasets=[images, captions])
    with resolved("models:/tipsv2-pretrain/3", tracking_uri) as checkpoint: ...   # -> "hf:LOCAL_DIR"

The logged model is a pyfunc (pipelines/pyfunc_model.py, models from code: nothing is pickled) holding the
export's `hf/` directory, so one copy of the weights serves `mlflow.pyfunc.load_model` and `transformers`
alike; signature: rows of `image` (bytes) and/or `text` (str) -> `cls1`, `cls2`, `text` embeddings, with an
input example. (The `transformers` flavour does not fit: TIPSv2 is no transformers pipeline task and its
image processor needs torchvision, which this project leaves out.) Requirements are pinned from the
installed versions, so MLflow infers nothing and reaches no network.

The run's metrics at its last step are linked to the logged model (MLflow's `log_model(step=...)`); the
version carries the caption and image digests as tags. An evaluation of `models:/NAME/VERSION` links its metrics to the same logged model and
tags the version with its run (`link_evaluation`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

from pipelines import storage
from pipelines.lineage import DIGEST_TAG, ParquetSet
from pipelines.tracking import MetricsSink

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
LIBRARY = Path(__file__).resolve().parents[1] / "tipsv2"     # shipped with the model (code_paths)
ARTIFACT = "model"                     # the logged model's name in its run
HF_ARTIFACT = "hf"                     # pipelines.pyfunc_model.HF_ARTIFACT
REQUIREMENTS = ("torch", "numpy", "pandas", "pillow", "safetensors", "sentencepiece", "mlflow")
VERSION_URI = re.compile(r"^(?:models:/)?(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def model_name(template: str | None, job: str) -> str | None:
    """`tracking.registered_model` with `{job}` filled in; None disables registration."""
    if not template:
        return None
    try:
        return template.format(job=job)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"tracking.registered_model={template!r}: only the placeholder {{job}} is known "
                         f"({type(err).__name__}: {err})") from None


def pip_requirements() -> list[str]:
    pins = []
    for package in REQUIREMENTS:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def example_image() -> bytes:
    """A small PNG (a colour gradient) for the input example."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 32, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (32, 1)), np.tile(ramp[:, None], (1, 32)), np.full((32, 32), 128, np.uint8)], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def signature_and_example():
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "text", required=False)])
    outputs = Schema([ColSpec(Array("double"), name, required=False) for name in ("cls1", "cls2", "text")])
    example = pd.DataFrame({"image": [example_image()], "text": ["a red cube on a green floor"]})
    return ModelSignature(inputs=inputs, outputs=outputs), example


def relink_metrics(client, run_id: str, keys: list[str], *, model_id: str) -> int:
    """Log each key's last point of the run again with the model id: MLflow links it to the logged model
    and, the point being identical, adds nothing to the run's history."""
    from mlflow.entities import Metric

    points = []
    for key in keys:
        history = client.get_metric_history(run_id, key)
        if history:
            last = max(history, key=lambda m: (m.step, m.timestamp))
            points.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id))
    for start in range(0, len(points), 500):
        client.log_batch(run_id, metrics=points[start:start + 500])
    return len(points)


URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def tracking_at(uri: str) -> Iterator[None]:
    """MLflow's fluent API (which log_model needs) pointed at `uri` for a moment."""
    import mlflow

    from mlflow.tracking import _model_registry, _tracking_service

    # MLflow's own module globals (None = unset), put back as they were: get_*_uri() would return a default
    # that set_*_uri() then pins, and later clients without an explicit registry URI would follow it.
    # set_*_uri() also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI: the next run of this process would take
    # this store (store_uri reads the variable) whatever its own output.
    before = _tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri
    environment = {name: os.environ.get(name) for name in URI_VARIABLES}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        _tracking_service.utils._tracking_uri = before[0]
        _model_registry.utils._registry_uri = before[1]
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def register_export(sink: MetricsSink, tracking, *, job: str, hf_dir: str, step: int,
                    datasets: list[ParquetSet]) -> dict[str, Any] | None:
    """Log the export's transformers directory `hf_dir` as a pyfunc model of the sink's run and register it
    as a version of `tracking.registered_model`; {name, version, model_id, model_uri}, or None when disabled
    or when MLflow failed (a warning; the export on disk stands). `step`: the run's last step, whose metrics
    go with it."""
    name = model_name(tracking.registered_model, job)
    client = getattr(sink, "client", None)
    if name is None or client is None:
        return None
    try:
        return _register(sink, client, name, job=job, hf_dir=hf_dir, step=step, datasets=datasets)
    except Exception as err:  # noqa: BLE001 - as MlflowSink: the trained model is on disk whatever MLflow says
        log.warning("export %s not registered as MLflow model %r (%s: %s)", hf_dir, name, type(err).__name__,
                    str(err)[:300])
        return None


def _register(sink, client, name: str, *, job: str, hf_dir: str, step: int,
              datasets: list[ParquetSet]) -> dict[str, Any]:
    import mlflow

    digests = {DIGEST_TAG.format(kind=d.kind.value): d.digest for d in datasets}
    signature, example = signature_and_example()
    with tempfile.TemporaryDirectory(prefix="tipsv2-register-") as tmp, tracking_at(sink.uri):
        hf = storage.local_copy(hf_dir, tmp)
        with mlflow.start_run(run_id=sink.run_id):
            info = mlflow.pyfunc.log_model(
                name=ARTIFACT, python_model=str(MODEL_CODE), artifacts={HF_ARTIFACT: hf}, code_paths=[str(LIBRARY)],
                signature=signature, input_example=example, pip_requirements=pip_requirements(),
                registered_model_name=name, tags={"tipsv2.job": job, **digests}, step=step)
    registered = info.registered_model_version
    for key, value in {"tipsv2.job": job, "tipsv2.export": hf_dir, **digests}.items():
        client.set_model_version_tag(name, str(registered), key, value)
    found = {"name": name, "version": str(registered), "model_id": info.model_id,
             "model_uri": f"models:/{name}/{registered}"}
    print(f"registered {found['model_uri']} (MLflow logged model {info.model_id})", flush=True)
    return found


# ---------------------------------------------------------------- models:/NAME/VERSION


def parse_version(spec: str) -> tuple[str, str | None, str | None] | None:
    """(name, version, alias) of "models:/NAME/VERSION", "NAME/VERSION" or "...@ALIAS"; None otherwise."""
    found = VERSION_URI.match(spec.strip())
    return (found["name"], found["version"], found["alias"]) if found else None


def model_version(client, spec: str):
    """The ModelVersion `spec` names; a clear error when it is malformed or not registered."""
    parsed = parse_version(spec)
    if parsed is None:
        raise ValueError(f"model {spec!r}: expected models:/NAME/VERSION, NAME/VERSION or NAME@ALIAS")
    name, number, alias = parsed
    try:
        return client.get_model_version(name, number) if number else client.get_model_version_by_alias(name, alias)
    except Exception as err:  # MLflow raises its own exception types
        raise ValueError(f"model {spec!r} is not a registered model version at {client.tracking_uri}: "
                         f"{type(err).__name__}: {str(err)[:200]}") from err


def logged_model_id(entry) -> str | None:
    """The id of the logged model a ModelVersion was registered from (its source `models:/m-...`; the
    registry's own store keeps no model_id column)."""
    if entry.model_id:
        return entry.model_id
    source = entry.source or ""
    return source[len("models:/"):] if re.fullmatch(r"models:/m-[0-9a-f]+", source) else None


def runs_of(client, specs: list[str]) -> dict[str, str]:
    """{run id: NAME/VERSION} of the runs that registered the versions `specs` name."""
    found = {}
    for spec in specs:
        entry = model_version(client, spec)
        if not entry.run_id:
            raise ValueError(f"model {spec!r} (version {entry.version}) names no MLflow run")
        found[entry.run_id] = f"{entry.name}/{entry.version}"
    return found


def is_registered(spec: str | None) -> bool:
    return bool(spec) and spec.startswith("models:/")


@contextlib.contextmanager
def resolved(spec: str, tracking_uri: str | None) -> Iterator[str]:
    """`spec` itself, or for "models:/NAME/VERSION" the version's `hf/` directory downloaded, as "hf:DIR"."""
    if not is_registered(spec):
        yield spec
        return
    if not tracking_uri:
        raise ValueError(f"model {spec!r} is a registered version: name the registry with --tracking-uri or "
                         "MLFLOW_TRACKING_URI")
    import mlflow
    from mlflow.tracking import MlflowClient

    found = model_version(MlflowClient(tracking_uri, registry_uri=tracking_uri), spec)
    with tempfile.TemporaryDirectory(prefix="tipsv2-model-") as tmp:
        with tracking_at(tracking_uri):   # models:/ URIs resolve against the fluent registry URI
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{found.name}/{found.version}",
                                                        dst_path=tmp)
        yield f"hf:{Path(local) / 'artifacts' / HF_ARTIFACT}"


def link_evaluation(sink: MetricsSink, spec: str, keys: list[str], *, suite: str) -> None:
    """An evaluation of "models:/NAME/VERSION": its run tagged with the version, its metrics linked to the
    version's logged model, the version tagged with the run. Nothing for other checkpoints."""
    client = getattr(sink, "client", None)
    if client is None or not is_registered(spec):
        return
    from mlflow.tracking import MlflowClient

    registry = MlflowClient(sink.uri, registry_uri=sink.uri)
    found = model_version(registry, spec)
    model_id = logged_model_id(found)
    sink.set_tags({"tipsv2.model": f"{found.name}/{found.version}", "tipsv2.model_id": model_id or ""})
    if model_id:
        relink_metrics(client, sink.run_id, keys, model_id=model_id)
    registry.set_model_version_tag(found.name, found.version, f"tipsv2.eval.{suite}.run_id", sink.run_id)

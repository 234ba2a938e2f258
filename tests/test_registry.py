"""The MLflow model registry and caption lineage of a real training run (Ray Train + DeepSpeed, 1 worker) on
the session's `mlflow server`: the run stops after its step-1 checkpoint, its caption Parquet changes, a
rerun that resumes is refused naming both digests, and with `data.on_caption_change=warn` resumes, logs
both caption sets and registers its export. The version then loads as a pyfunc that matches our model,
is evaluated (`models:/NAME/VERSION`) and compared by version."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import compare, evaluate, lineage, registry, storage
from pipelines.lineage import CaptionSetChanged, Kind
from pipelines.tracking import TrackingConfig
from pipelines.tracking_store import store_uri
from pipelines.train import EXPORT_DIR, InjectedFaults, Job, NoFaults, run
from tipsv2.loop import NonFiniteLoss

pytestmark = pytest.mark.slow

NAME = "lineage-test-{job}"


def change_a_caption(output: str) -> None:
    """One short caption of the synthetic caption Parquet (the ground truth table) rewritten in place."""
    path = storage.join(output, "data", "synthetic", "train", "ground_truth", "part-00000.parquet")
    table = pq.read_table(path)
    short = table["caption_short"].to_pylist()
    short[0] = short[0] + " (edited)"
    index = table.schema.get_field_index("caption_short")
    pq.write_table(table.set_column(index, table.schema.field(index), [short]), path)


@pytest.fixture(scope="module")
def resumed(ray_local, mlflow_server, train_cfg, tmp_path_factory) -> dict:
    _, uri = mlflow_server
    patch = pytest.MonkeyPatch()   # MlflowSink's 10 s per request is too short for a server on a loaded machine
    patch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    try:
        yield resumed_run(uri, train_cfg, str(tmp_path_factory.mktemp("lineage_run")))
    finally:
        patch.undo()


def resumed_run(uri: str, train_cfg, output: str) -> dict:
    sets = ("engine.workers=1", "steps=2", "engine.checkpoint_every=1", f"tracking.uri={uri}",
            "tracking.experiment=lineage", f"tracking.registered_model={NAME}")
    with pytest.raises(NonFiniteLoss):   # stops at step 1, after the checkpoint of step 0
        run(Job.PRETRAIN, train_cfg(*sets), output, faults=InjectedFaults(nan_at_step=1))
    before = storage.read_json(storage.join(output, lineage.LINEAGE_FILE))["captions"]["digest"]
    change_a_caption(output)
    after = lineage.describe(storage.join(output, "data", "synthetic", "train", "ground_truth"), Kind.CAPTIONS).digest
    with pytest.raises(CaptionSetChanged) as refused:
        run(Job.PRETRAIN, train_cfg(*sets), output, faults=NoFaults())
    with pytest.warns(UserWarning, match="caption set changed"):
        summary = run(Job.PRETRAIN, train_cfg(*sets, "data.on_caption_change=warn"), output, faults=NoFaults())
    return {"output": output, "uri": uri, "before": before, "after": after, "refused": str(refused.value),
            "summary": summary}


def test_a_resume_on_changed_captions_is_refused_naming_both_digests(resumed):
    assert resumed["before"] != resumed["after"]
    assert f"started on digest {resumed['before']}" in resumed["refused"]
    assert f"now finds digest {resumed['after']}" in resumed["refused"]
    assert "data.on_caption_change=warn" in resumed["refused"]


def test_the_warned_resume_logs_both_caption_sets_as_training_inputs(resumed):
    from mlflow.tracking import MlflowClient

    summary = resumed["summary"]
    assert summary["complete"] and summary["steps"] == 2
    found = MlflowClient(resumed["uri"]).get_run(summary["mlflow_run_id"])
    inputs = {(i.dataset.name, i.dataset.digest): {t.key: t.value for t in i.tags}["mlflow.data.context"]
              for i in found.inputs.dataset_inputs}
    assert inputs[("captions", resumed["before"])] == inputs[("captions", resumed["after"])] == lineage.TRAINING
    assert {name for name, _ in inputs} == {"captions", "images"}
    assert found.data.tags["tipsv2.captions.digest"] == resumed["after"] == lineage.caption_digest(found)
    assert resumed["before"] in found.data.tags["tipsv2.captions.changed"]


def test_the_registered_version_loads_as_a_pyfunc_that_matches_our_model(resumed):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from tipsv2.checkpoint import load_export
    from tipsv2.eval.features import resize_center_crop, to_tensor
    from tipsv2.tokenizer import Tokenizer

    model_info = resumed["summary"]["registered_model"]
    assert model_info["name"] == "lineage-test-pretrain" and model_info["model_uri"].startswith("models:/")
    client = MlflowClient(resumed["uri"], registry_uri=resumed["uri"])
    version = client.get_model_version(model_info["name"], model_info["version"])
    assert version.run_id == resumed["summary"]["mlflow_run_id"]
    assert version.tags["tipsv2.captions.digest"] == resumed["after"] and version.tags["tipsv2.job"] == "pretrain"
    assert registry.logged_model_id(version) == model_info["model_id"]
    assert "loss/total" in {m.key for m in client.get_logged_model(model_info["model_id"]).metrics}
    with registry.tracking_at(resumed["uri"]):
        pyfunc = mlflow.pyfunc.load_model(model_info["model_uri"])
    png, text = registry.example_image(), ["a red cube on a green floor", "two blue spheres"]
    out = pyfunc.predict(pd.DataFrame({"image": [png, None, png], "text": [None, text[0], text[1]]}))
    ours = load_export(storage.join(resumed["output"], EXPORT_DIR))[0].eval()
    tokenizer = Tokenizer(storage.join(resumed["output"], EXPORT_DIR, "hf", "tokenizer.model"),
                          max_len=ours.cfg.text.max_len)
    with torch.no_grad():
        image = to_tensor(resize_center_crop(Image.open(io.BytesIO(png)), ours.cfg.vision.image_size))[None]
        features = ours.encode_image(image, stochastic_depth=False)
        embedded = ours.encode_text(*tokenizer(text))
    for row in (0, 2):
        np.testing.assert_allclose(out["cls1"][row], features.cls1[0].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["cls2"][row], features.cls2[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array([out["text"][1], out["text"][2]]), embedded.numpy(), rtol=1e-5, atol=1e-6)
    assert out["text"][0] is None and out["cls1"][1] is None


def test_evaluation_of_a_version_logs_against_it(resumed, tmp_path):
    from mlflow.tracking import MlflowClient

    spec = resumed["summary"]["registered_model"]["model_uri"]
    cfg = evaluate.EvaluateConfig(checkpoint=spec, suite="tiny",
                                  tracking=TrackingConfig(uri=resumed["uri"], experiment="lineage-eval"))
    summary = evaluate.run(cfg, str(tmp_path / "eval"))
    client = MlflowClient(resumed["uri"], registry_uri=resumed["uri"])
    found = client.get_run(summary["mlflow_run_id"])
    name, number = spec[len("models:/"):].split("/")
    assert found.data.tags["tipsv2.model"] == f"{name}/{number}" and found.data.params["checkpoint"] == spec
    version = client.get_model_version(name, number)
    assert version.tags["tipsv2.eval.tiny.run_id"] == summary["mlflow_run_id"]
    linked = {m.key for m in client.get_logged_model(registry.logged_model_id(version)).metrics}
    assert "eval/tiny/zero_shot_classification/cls1/top1" in linked
    with pytest.raises(ValueError, match="'models:/lineage-test-pretrain/99' is not a registered model version"):
        evaluate.run(evaluate.EvaluateConfig(checkpoint="models:/lineage-test-pretrain/99", suite="tiny",
                                             tracking=TrackingConfig(uri=resumed["uri"])), str(tmp_path / "bad"))


def test_compare_selects_runs_by_version_and_shows_their_caption_set(resumed, tmp_path):
    spec = resumed["summary"]["registered_model"]["model_uri"]
    out = compare.run(experiment=None, models=[spec], output=str(tmp_path / "cmp"), tracking_uri=resumed["uri"])
    (row,) = out["table"]
    assert row["run_id"] == resumed["summary"]["mlflow_run_id"]
    assert row["model"] == spec[len("models:/"):] and row["captions"] == resumed["after"]
    assert "| model | captions |" in (tmp_path / "cmp" / "comparison.md").read_text()
    with pytest.raises(ValueError, match="expected models:/NAME/VERSION"):
        compare.run(experiment=None, models=["no-version"], output=str(tmp_path / "bad"), tracking_uri=resumed["uri"])


def test_registering_leaves_mlflows_global_uris_as_they_were(tmp_path):
    """The bug this caught: after one registration in a process, MLflow's global registry URI stayed pinned
    to that store, so the next run's MlflowClient (no explicit registry URI) registered nowhere:
    "Registered Model ... not found"."""
    from mlflow.tracking import _model_registry, _tracking_service

    from pipelines.tracking import MlflowSink

    before = _tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri
    environment = {name: os.environ.get(name) for name in registry.URI_VARIABLES}
    with registry.tracking_at(f"sqlite:///{tmp_path / 'a.db'}"):
        assert _model_registry.utils._registry_uri.endswith("a.db")
    assert (_tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri) == before
    # And the variables MLflow exports: bench.train's second run in one process trained into the first run's
    # deleted store ("attempt to write a readonly database") through MLFLOW_TRACKING_URI.
    assert {name: os.environ.get(name) for name in registry.URI_VARIABLES} == environment
    assert store_uri(None, str(tmp_path / "next")) == f"sqlite:///{(tmp_path / 'next' / 'mlflow.db').resolve()}"
    uri = f"sqlite:///{tmp_path / 'b.db'}"
    sink = MlflowSink(uri=uri, experiment="registry-uri")
    assert sink.client._registry_uri == uri
    sink.close()

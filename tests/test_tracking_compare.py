"""MLflow sink and run comparison against a real MLflow (sqlite store in tmp_path)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipelines import compare
from pipelines.tracking import REDACTED, MlflowSink, NullSink, TrackingConfig, flatten, open_sink


def test_flatten_redacts_secrets():
    kept = flatten({"data": {"tokenizer": "/x/spm.model", "tokenizer_vocab": 8}, "prompts": {"max_tokens": 4}})
    assert kept == {"data.tokenizer": "/x/spm.model", "data.tokenizer_vocab": "8", "prompts.max_tokens": "4"}
    assert flatten({"aws_session_token": "t", "hub": {"token": "t"}}) == {"aws_session_token": REDACTED,
                                                                        "hub.token": REDACTED}
    flat = flatten({"engine": {"workers": 2}, "storage": {"aws_secret_access_key": "abc", "endpoint": "http://h"},
                    "note": "AKIAABCDEFGHIJKLMNOP", "url": "https://user:pw@host/x", "sizes": [1, 2]})
    assert flat["engine.workers"] == "2" and flat["sizes"] == "[1, 2]" and flat["storage.endpoint"] == "http://h"
    assert flat["storage.aws_secret_access_key"] == REDACTED
    assert flat["note"] == REDACTED and flat["url"] == REDACTED


def test_rank_nonzero_gets_null_sink(tmp_path):
    assert isinstance(open_sink(TrackingConfig(), output_root=str(tmp_path), rank=1), NullSink)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    # One sqlite store for the module: creating one runs MLflow's schema migrations (seconds each).
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def make_runs(uri: str) -> list[str]:
    ids = []
    for lr, name in ((1e-3, "a"), (5e-4, "b")):
        sink = MlflowSink(uri=uri, experiment="exp", run_name=name)
        sink.log_params({"optim": {"lr": lr, "min_lr": 0.0}, "steps": 3, "secret_token": "x"})
        for step in range(3):
            sink.log_metrics({"loss/total": 10 - step * lr * 1000, "loss/dino": 1.0}, step=step)
        sink.close()
        ids.append(sink.run_id)
    return ids


def test_compare_table_plots_and_artifacts(tmp_path, uri):
    ids = make_runs(uri)
    out = compare.run(experiment="exp", output=str(tmp_path / "cmp"), tracking_uri=uri)
    assert out["runs"] == 2 and out["differing_params"] == ["optim.lr"]
    rows = {r["run"]: r for r in out["table"]}
    assert rows["a"]["loss/total"] == "8" and rows["b"]["loss/total"] == "9"   # last values: 10 - 2*1, 10 - 2*0.5
    assert (tmp_path / "cmp" / "loss_total.png").stat().st_size > 1000
    header = (tmp_path / "cmp" / "comparison.md").read_text().splitlines()[0]
    assert header == "| run | run_id | optim.lr | loss/total | loss/dino |"
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    assert client.get_run(ids[0]).data.params["secret_token"] == REDACTED
    artifacts = [a.path for a in client.list_artifacts(out["compare_run_id"], "comparison")]
    assert "comparison/comparison.json" in artifacts and "comparison/loss_total.png" in artifacts
    again = compare.run(experiment="exp", output=str(tmp_path / "cmp2"), tracking_uri=uri)
    assert again["runs"] == 2  # the compare run itself is not compared
    assert json.loads((tmp_path / "cmp2" / "comparison.json").read_text())["params"] == ["optim.lr"]


def test_reattach_by_run_id(uri):
    first = MlflowSink(uri=uri, experiment="reattach")
    first.log_metrics({"x": 1.0}, step=0)
    first.close(status="KILLED")
    again = MlflowSink(uri=uri, experiment="reattach", run_id=first.run_id)
    again.log_metrics({"x": 2.0}, step=1)
    again.close()
    from mlflow.tracking import MlflowClient
    history = MlflowClient(uri).get_metric_history(first.run_id, "x")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [1.0, 2.0]


def test_unknown_experiment_is_named(tmp_path, uri):
    with pytest.raises(ValueError, match="no MLflow experiment named 'nope'"):
        compare.run(experiment="nope", output=str(tmp_path / "c"), tracking_uri=uri)


def test_runs_carry_commit_user_and_source(uri, monkeypatch):
    """The context MLflow's fluent API sets: git commit (from the repository, or TIPSV2_GIT_COMMIT where
    a Ray job ships no .git), user and source (issue #14 item 4)."""
    import getpass
    import subprocess

    from mlflow.tracking import MlflowClient
    from pipelines.tracking import REPOSITORY

    sink = MlflowSink(uri=uri, experiment="context", run_name="c")
    sink.close()
    tags = MlflowClient(tracking_uri=uri).get_run(sink.run_id).data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head and len(head) == 40
    assert tags["mlflow.user"] == getpass.getuser() and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"]
    monkeypatch.setenv("TIPSV2_GIT_COMMIT", "0123abcd")
    sink = MlflowSink(uri=uri, experiment="context", run_name="d")
    sink.close()
    assert MlflowClient(tracking_uri=uri).get_run(sink.run_id).data.tags["mlflow.source.git.commit"] == "0123abcd"


def test_system_metrics_when_asked(uri, monkeypatch):
    import time

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    sink = MlflowSink(uri=uri, experiment="context", run_name="system")
    assert sink.monitor is not None
    time.sleep(1.5)
    sink.close()
    metrics = MlflowClient(tracking_uri=uri).get_run(sink.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    quiet = MlflowSink(uri=uri, experiment="context", run_name="quiet")
    quiet.close()
    assert quiet.monitor is None


def test_the_chain_hands_each_step_its_tracking_in_its_config_not_the_environment(tmp_path, uri, monkeypatch):
    """run_all's steps log under its parent run because their configs say so; the process env is untouched."""
    import os

    from mlflow.tracking import MlflowClient

    from pipelines.run_all import PRESETS, Chain

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = dict(os.environ)
    cfg = PRESETS["tiny"]()
    chain = Chain(dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=uri)), str(tmp_path))
    assert dict(os.environ) == before
    assert (chain.tracking.uri, chain.tracking.parent_run_id) == (uri, chain.parent.run_id)
    child = open_sink(chain.tracking, output_root=str(tmp_path))
    child.close()
    assert MlflowClient(uri).get_run(child.run_id).data.tags["mlflow.parentRunId"] == chain.parent.run_id
    chain.parent.close()

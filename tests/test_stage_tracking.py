"""MLflow where runs would be lost: a remote output without a tracking URI, or a file store on a Ray cluster of
several nodes, is refused at start with the fix; ingest and caption are MLflow runs of their own (params,
metrics, summary.json artifact, the run id in their summary), checked through MLflow's own client."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from pipelines import caption, ingest, tracking_store
from pipelines.testing import sample_images


@pytest.fixture
def no_tracking_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


def test_a_remote_output_without_a_tracking_uri_is_refused_with_the_fix(no_tracking_env, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"output s3://b/run/caption is remote and no tracking URI is set.*"
                                         r"set MLFLOW_TRACKING_URI"):
        tracking_store.store_uri(None, "s3://b/run/caption")
    assert tracking_store.store_uri("http://mlflow:5000", "s3://b/x") == "http://mlflow:5000"
    assert tracking_store.store_uri(None, str(tmp_path)) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "images").mkdir()
    with pytest.raises(SystemExit) as exited:   # the command line: one line, exit 2, before Ray or MLflow start
        caption.main(["--config", "template", "--set", f"input={tmp_path}", "--output", "gs://b/run/caption"])
    assert exited.value.code == 2
    assert "gs://b/run/caption is remote and no tracking URI is set" in capsys.readouterr().err


def test_a_file_store_is_refused_on_a_cluster_of_several_nodes(monkeypatch):
    # A fake only for the node count (the autoscaling cluster test runs the real several-node case).
    monkeypatch.setattr(tracking_store, "ray_nodes", lambda: 3)
    with pytest.raises(ValueError, match=r"sqlite:///x/m.db is a file on this node, but the Ray cluster has 3 nodes"):
        tracking_store.require_shared_store("sqlite:///x/m.db", "/x")
    with pytest.raises(ValueError, match="HEAD_IP:5000"):
        tracking_store.for_every_node("/x/mlruns", "/x")
    assert tracking_store.require_shared_store("http://10.0.0.1:5000", "/x") == "http://10.0.0.1:5000"
    monkeypatch.setattr(tracking_store, "ray_nodes", lambda: 1)
    assert tracking_store.require_shared_store("sqlite:///x/m.db", "/x") == "sqlite:///x/m.db"
    assert tracking_store.for_every_node("http://127.0.0.1:5000", "/x") == "http://127.0.0.1:5000"   # no RAY_ADDRESS


def test_a_loopback_server_is_handed_to_other_nodes_only_where_it_answers(mlflow_server, ray_local, monkeypatch,
                                                                          caplog):
    uri = mlflow_server[1]   # listens on 127.0.0.1 only, as `mlflow server` does by default
    port = uri.rsplit(":", 1)[1]
    assert tracking_store.shared_server(uri, "127.0.0.1", nodes=3) == uri   # answers there
    # 127.0.0.2 stands in for the head's IP: the server does not listen on it, so a rank elsewhere would lose
    # every metric. Refused on several nodes, with the fix; kept (warned) on one.
    with pytest.raises(ValueError, match=rf"does not answer at http://127.0.0.2:{port}, where ranks on other nodes "
                                         r"reach it \(.*\); start it with `--host 0.0.0.0 --allowed-hosts 127.0.0.2"):
        tracking_store.shared_server(uri, "127.0.0.2", nodes=3)
    with caplog.at_level("WARNING", logger="pipelines.tracking_store"):
        assert tracking_store.shared_server(uri, "127.0.0.2", nodes=1) == uri
    assert "this Ray cluster has one node now" in caplog.text
    # This process started its own Ray: no other node will ever join it, so the URI is left as it is, even with
    # RAY_ADDRESS set (the autoscaling test runs the case of a joined cluster).
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert not tracking_store.joined_cluster() and tracking_store.driver_node_runs_tasks()   # its 4 CPUs
    assert tracking_store.for_every_node("http://127.0.0.1:5000", "/x") == "http://127.0.0.1:5000"


def test_ingest_and_caption_are_mlflow_runs(ray_local, no_tracking_env, tmp_path):
    source = tmp_path / "raw"
    source.mkdir()
    for name, data in sample_images(("astronaut", "coffee")).items():
        (source / f"{name}.png").write_bytes(data)
        (source / f"{name}.txt").write_text(f"a photo of {name}")
    root = tmp_path / "run"
    first = ingest.run(ingest.IngestConfig(source=str(source)), str(root / "ingest"))
    cap = caption.run(caption.template().__class__(**{**vars(caption.template()), "input": str(root / "ingest")}),
                      str(root / "caption"))
    for stage, summary in (("ingest", first), ("caption", cap)):
        client = MlflowClient(f"sqlite:///{root / stage / 'mlflow.db'}")
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.run_name == stage and run.info.status == "FINISHED"
        assert run.data.tags["tipsv2.stage"] == stage
        assert json.loads((root / stage / "summary.json").read_text())["mlflow_run_id"] == run.info.run_id
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.json"]
        (written,) = run.inputs.dataset_inputs   # its Parquet set, in its own run (pipelines/lineage.py)
        assert {t.key: t.value for t in written.tags}["mlflow.data.context"] == "output"
        assert written.dataset.name == {"ingest": "images", "caption": "captions"}[stage]
    client = MlflowClient(f"sqlite:///{root / 'ingest' / 'mlflow.db'}")
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.params["source"] == str(source)
    assert run.data.metrics["written/images"] == 2.0
    assert MlflowClient(f"sqlite:///{root / 'caption' / 'mlflow.db'}").get_run(
        cap["mlflow_run_id"]).data.metrics["written/rows_this_run"] == 2.0

    again = ingest.run(ingest.IngestConfig(source=str(source)), str(root / "ingest"))   # skipped: no new run
    assert again["skipped"] and again["mlflow_run_id"] == first["mlflow_run_id"]
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [first["mlflow_run_id"]]

    with pytest.raises(ValueError, match="no images, tar shards or manifest rows"):
        ingest.run(ingest.IngestConfig(source=str(tmp_path / "run" / "caption" / "captions")), str(tmp_path / "bad"))
    failed = MlflowClient(f"sqlite:///{tmp_path / 'bad' / 'mlflow.db'}")
    assert [r.info.status for r in failed.search_runs([failed.get_experiment_by_name("tipsv2").experiment_id])] == [
        "FAILED"]

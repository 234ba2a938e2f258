"""pipelines.evaluate end to end: an exported tiny model and the same weights in the released .npz format
give the same metrics; results JSON, summary and MLflow (real, sqlite) agree; S3 in and out (moto)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipelines import evaluate, storage
from tipsv2.checkpoint import save_export
from tipsv2.configs import tiny
from tipsv2.loop import fit_tokenizer, synthetic_records
from tipsv2.models import export_official
from tipsv2.task import TIPSv2Task

EXPECTED = {
    "num_train", "num_test", "zero_shot_segmentation/miou", "zero_shot_segmentation/pixel_accuracy",
    "zero_shot_segmentation/num_images", "linear_segmentation/miou", "linear_segmentation/pixel_accuracy",
    "linear_depth/rmse",
    *(f"{task}/{cls}/{m}" for cls in ("cls1", "cls2")
      for task, ms in (("zero_shot_classification", ("top1", "top5")), ("knn", ("top1", "top5")),
                       ("retrieval", ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"))) for m in ms),
    *(f"patch_text/{m}" for m in ("accuracy", "auroc", "null/mean", "null/p95", "chance", "chance/uniform",
                                  "chance/majority", "num_foreground_patches", "num_patches", "num_objects")),
    *(f"baseline/{m}" for m in ("zero_shot_classification/top1", "knn/top1", "retrieval/i2t_r1", "retrieval/t2i_r1",
                                "zero_shot_segmentation/miou", "linear_segmentation/miou", "linear_depth/rmse",
                                "patch_text/accuracy")),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny task's model exported both ways, with a tokenizer beside each."""
    root = tmp_path_factory.mktemp("checkpoints")
    cfg = tiny()
    torch.manual_seed(0)
    task = TIPSv2Task(cfg.task)
    export = save_export(root / "export", model=task.model, dino_head=task.teacher_dino_head,
                         patch_head=task.teacher_patch_head, head_cfg=cfg.task.head)
    fit_tokenizer(synthetic_records(cfg.data.synthetic), cfg.data.tokenizer_vocab, export / "tokenizer.model")
    (root / "npz").mkdir()
    export_official(task.model, root / "npz" / "vision.npz", root / "npz" / "text.npz")
    return {"export": export, "npz": root / "npz", "tokenizer": export / "tokenizer.model"}


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def pretrain_run(mlflow_uri, tmp_path_factory) -> str:
    """A run standing in for the pretraining run that the evaluation attaches to (its artifacts beside the
    store: MLflow's default, ./mlruns, would write into the repository)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_uri)
    artifacts = (tmp_path_factory.mktemp("mlartifacts")).as_uri()
    run = client.create_run(client.create_experiment("pretrain", artifact_location=artifacts), run_name="pretrain")
    client.log_param(run.info.run_id, "checkpoint", "unrelated")   # an existing param must not be overwritten
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture(scope="module")
def exported_eval(checkpoints, mlflow_uri, pretrain_run, tmp_path_factory) -> Path:
    """The command line on the exported model, logging into the existing run at step 30."""
    out = tmp_path_factory.mktemp("eval_export")
    evaluate.main(["--checkpoint", str(checkpoints["export"]), "--suite", "tiny", "--output", str(out),
                   "--run-id", pretrain_run, "--tracking-uri", mlflow_uri, "--step", "30"])
    return out


def check_results(results: dict, *, suite: str = "tiny") -> None:
    assert results["suite"] == suite
    assert set(results["metrics"]) == EXPECTED
    assert all(math.isfinite(v) for v in results["metrics"].values()), results["metrics"]
    assert results["metrics"]["num_test"] == 16 and results["metrics"]["num_train"] == 32
    for key, value in results["metrics"].items():
        if not key.endswith("linear_depth/rmse") and not key.split("/")[-1].startswith("num_"):
            assert 0.0 <= value <= 1.0, (key, value)


def test_exported_model_writes_results_summary_and_config(exported_eval, checkpoints, pretrain_run):
    results = json.loads((exported_eval / "eval_tiny.json").read_text())
    check_results(results)
    assert results["checkpoint"] == str(checkpoints["export"])
    summary = json.loads((exported_eval / "summary.json").read_text())
    assert summary["metrics"] == results["metrics"]
    assert summary["mlflow_run_id"] == pretrain_run and summary["skipped"] is False
    assert summary["read"]["tokenizer"] == str(checkpoints["tokenizer"])    # found beside the checkpoint
    assert summary["wall_s"] > 0
    assert json.loads((exported_eval / "config.json").read_text())["suite"] == "tiny"


def test_metrics_logged_into_the_given_run(exported_eval, mlflow_uri, pretrain_run):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_uri)
    results = json.loads((exported_eval / "eval_tiny.json").read_text())
    run = client.get_run(pretrain_run)
    logged = {k[len("eval/tiny/"):]: v for k, v in run.data.metrics.items() if k.startswith("eval/tiny/")}
    assert logged == pytest.approx(results["metrics"], rel=1e-6)
    assert {m.step for m in client.get_metric_history(pretrain_run, "eval/tiny/zero_shot_segmentation/miou")} == {30}
    assert run.data.params["checkpoint"] == "unrelated"
    assert run.data.tags["eval.tiny.checkpoint"] == results["checkpoint"]
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(pretrain_run, "eval")] == ["eval/eval_tiny.json"]


def test_released_npz_gives_the_same_metrics_in_a_new_run(checkpoints, exported_eval, mlflow_uri, tmp_path,
                                                           monkeypatch):
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    npz = checkpoints["npz"]
    (npz / "tokenizer.model").write_bytes(checkpoints["tokenizer"].read_bytes())   # found beside vision.npz
    cfg = evaluate.EvaluateConfig(checkpoint=f"{npz / 'vision.npz'},{npz / 'text.npz'}", suite="tiny",
                                  vision_heads=3, text_heads=3, text_max_len=32)   # the tiny text length
    summary = evaluate.run(cfg, str(tmp_path))
    results = json.loads((tmp_path / "eval_tiny.json").read_text())
    check_results(results)
    exported = json.loads((exported_eval / "eval_tiny.json").read_text())["metrics"]
    assert results["metrics"] == pytest.approx(exported, rel=1e-4, abs=1e-6)
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "eval-tiny" and run.data.params["suite"] == "tiny"
    assert run.data.tags["tipsv2.stage"] == "evaluate" and run.data.tags["tipsv2.output"] == str(tmp_path)
    assert run.data.metrics["eval/tiny/linear_depth/rmse"] == pytest.approx(results["metrics"]["linear_depth/rmse"])

    again = evaluate.run(cfg, str(tmp_path))   # same config and output: skipped, nothing new logged
    assert again["skipped"] is True and again["metrics"] == results["metrics"]
    experiment = MlflowClient(tracking_uri=mlflow_uri).get_experiment_by_name("tipsv2-eval")
    assert len(MlflowClient(tracking_uri=mlflow_uri).search_runs([experiment.experiment_id])) == 1


def test_unknown_run_id_fails_before_evaluating(checkpoints, mlflow_uri, tmp_path):
    cfg = evaluate.EvaluateConfig(checkpoint=str(checkpoints["export"]), run_id="no-such-run",
                                  tracking=evaluate.TrackingConfig(uri=mlflow_uri))
    with pytest.raises(ValueError, match="cannot open MLflow run 'no-such-run'"):
        evaluate.run(cfg, str(tmp_path))
    assert not (tmp_path / "eval_tiny.json").exists()


def test_missing_tokenizer_names_the_flag(checkpoints, tmp_path):
    npz = tmp_path / "bare"
    npz.mkdir()
    (npz / "vision.npz").write_bytes((checkpoints["npz"] / "vision.npz").read_bytes())
    cfg = evaluate.EvaluateConfig(checkpoint=str(npz / "vision.npz"), vision_heads=3)
    with pytest.raises(ValueError, match="pass --tokenizer"):
        evaluate.run(cfg, str(tmp_path / "out"))


def test_bad_flags_fail_with_the_valid_values(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", "x", "--suite", "imagenet21k", "--output", "/tmp/unused"])
    assert "expected one of" in capsys.readouterr().err


def test_checkpoint_and_output_on_s3(checkpoints, exported_eval, s3_endpoint):
    base = "s3://tipsv2-test/evaluate"
    for path in checkpoints["export"].iterdir():
        storage.write_bytes(f"{base}/export/{path.name}", path.read_bytes())
    evaluate.main(["--checkpoint", f"{base}/export", "--suite", "tiny", "--output", f"{base}/eval"])
    results = storage.read_json(f"{base}/eval/eval_tiny.json")
    check_results(results)
    exported = json.loads((exported_eval / "eval_tiny.json").read_text())["metrics"]
    assert results["metrics"] == pytest.approx(exported, rel=1e-4, abs=1e-6)
    assert storage.read_json(f"{base}/eval/summary.json")["read"]["tokenizer"] == f"{base}/export/tokenizer.model"

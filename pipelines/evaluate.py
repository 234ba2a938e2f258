r"""Evaluate a frozen model on a named suite; write the results JSON and log them to MLflow.

    python -m pipelines.evaluate --checkpoint outputs/tiny/export --suite tiny --output outputs/tiny/eval
    python -m pipelines.evaluate --checkpoint s3://b/tips/vit_b14_vision.npz,s3://b/tips/vit_b14_text.npz \
        --tokenizer s3://b/tips/spm.model --suite ade20k --data s3://b/ADEChallengeData2016 \
        --option max_items=100 --output s3://b/evals/ade20k --run-id RUN_ID --tracking-uri http://mlflow:5000

With `--output ROOT/evaluate` (a run root, pipelines/layout.py) an unset checkpoint is ROOT/distill/export and
its tokenizer pretrain's. Checkpoint: an exported model directory (tipsv2.checkpoint.save_export: model.safetensors + config.json),
"hf:DIR", a transformers Tipsv2Model directory (tipsv2.models.load_hf: the export's `hf/` or one from the
Hub), or released checkpoints "VISION.npz[,TEXT.npz]" (tipsv2.models.load_official), local or s3://; or
a registered model version "models:/NAME/VERSION" (pipelines/registry.py): its run is then tagged
`tipsv2.model=NAME/VERSION`, its metrics are linked to the version's logged model and the version is tagged
`tipsv2.eval.<suite>.run_id`.
Tokenizer: `--tokenizer URI`, else `tokenizer.model` in the checkpoint directory (beside VISION.npz for
released checkpoints) when there is one; suites that embed text fail without one, naming the flag.
Suites and their data layouts: tipsv2.eval.suites (`tiny` renders its scenes in memory; `synthetic`
reads `--data` written by tipsv2.data.synthetic.write_parquet, or renders without it).

Writes `<output>/eval_<suite>.json` ({suite, checkpoint, data, metrics, seconds, mlflow_run_id, config}),
`<output>/config.json` and `<output>/summary.json`. MLflow: with `--run-id` the metrics go into that
run (as `eval/<suite>/<metric>` at `--step`, e.g. the pretraining run at its last step); otherwise a
new run in `tracking.experiment` when a tracking URI is configured (`--tracking-uri` or
MLFLOW_TRACKING_URI). The results JSON is logged as an artifact under `eval/`. A rerun with the same
config and output is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from pipelines import cli, registry, storage
from pipelines.tracking import MetricsSink, NullSink, TrackingConfig, open_sink
from pipelines.tracking_store import default_uri
from tipsv2 import config_tree
from tipsv2.checkpoint import ModelSource, load_source
from tipsv2.eval.suites import SUITES, DataLocation, run_suite
from tipsv2.models import TIPSModel
from tipsv2.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.model"


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    checkpoint: str = ""                 # exported model dir, "hf:DIR" or "VISION.npz[,TEXT.npz]" (local or s3://)
    suite: str = "tiny"                  # a name in tipsv2.eval.suites.SUITES
    data: str | None = None              # dataset root URI; None for suites that render their data
    tokenizer: str | None = None         # SentencePiece .model URI; None = tokenizer.model beside the checkpoint
    vision_heads: int | None = None      # released checkpoints only: attention heads when not width / 64
    text_heads: int | None = None
    text_max_len: int | None = None      # tokens per text; None = the model's (64 for released checkpoints)
    options: dict[str, str] = field(default_factory=dict)   # suite keyword arguments, values as JSON
    device: str = "cpu"                  # torch device the model runs on ("cuda" on a GPU node)
    run_id: str | None = None            # MLflow run to add the metrics to (e.g. the pretraining run)
    step: int = 0                        # MLflow step of the metrics (the checkpoint's training step)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="tipsv2-eval"))

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"unknown evaluation suite {self.suite!r}; expected one of {sorted(SUITES)}")


def default() -> EvaluateConfig:
    return EvaluateConfig()


PRESETS = {"default": default}


# ---------------------------------------------------------------- inputs


def load_model(cfg: EvaluateConfig, scratch: str) -> TIPSModel:
    """An exported model directory, "hf:DIR" or released "VISION.npz[,TEXT.npz]", local or s3://."""
    if not cfg.checkpoint:
        raise ValueError("no checkpoint given: pass --checkpoint DIR, hf:DIR or VISION.npz[,TEXT.npz]")
    model, _, _ = load_source(ModelSource.parse(cfg.checkpoint), fetch=lambda uri: storage.local_copy(uri, scratch),
                              vision_heads=cfg.vision_heads, text_heads=cfg.text_heads,
                              max_len=cfg.text_max_len or 64)
    return model


def default_tokenizer_uri(checkpoint: str) -> str | None:
    """`tokenizer.model` in the checkpoint's directory (beside VISION.npz; in an hf: directory), if it exists."""
    if registry.is_registered(checkpoint):   # a registered version carries its own, in its hf/ directory
        return None
    uri = storage.join(ModelSource.parse(checkpoint).directory, TOKENIZER_FILE)
    return uri if storage.exists(uri) else None


class MissingTokenizer:
    """Stands in when no tokenizer was found: suites that never embed text (nyuv2) still run."""

    def __init__(self, checkpoint: str) -> None:
        self.checkpoint = checkpoint

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        raise ValueError(f"this suite embeds text but no tokenizer was found: pass --tokenizer PATH_OR_S3 (no "
                         f"{TOKENIZER_FILE} beside checkpoint {self.checkpoint!r})")


def load_tokenizer(cfg: EvaluateConfig, model: TIPSModel, scratch: str) -> Tokenizer | MissingTokenizer:
    uri = cfg.tokenizer or default_tokenizer_uri(cfg.checkpoint)
    if uri is None:
        return MissingTokenizer(cfg.checkpoint)
    return Tokenizer(storage.local_copy(uri, scratch), max_len=cfg.text_max_len or model.cfg.text.max_len)


def suite_options(options: dict[str, str]) -> dict[str, Any]:
    """Option values are JSON ("8", "[\"cat\"]", "null"); anything that is not JSON stays a string."""
    parsed = {}
    for key, value in options.items():
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def data_location(uri: str | None) -> DataLocation | None:
    if uri is None:
        return None
    filesystem, path = storage.filesystem(uri)
    return DataLocation(filesystem=filesystem, root=path)


# ---------------------------------------------------------------- tracking


def tracking_configured(cfg: EvaluateConfig) -> bool:
    return bool(cfg.run_id or cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))


def require_run(uri: str, run_id: str) -> None:
    """Fail before any work when the run to log into cannot be read (wrong id, wrong or unreachable URI)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")   # as MlflowSink: fail fast, not after minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except Exception as err:  # MLflow raises its own exception types
        raise ValueError(f"cannot open MLflow run {run_id!r} at the configured tracking URI "
                         f"(--tracking-uri or MLFLOW_TRACKING_URI): {type(err).__name__}: {str(err)[:300]}") from err


def open_tracking(cfg: EvaluateConfig, output: str) -> MetricsSink:
    """The run the metrics go to; fails before any work when `run_id` cannot be reached."""
    if not tracking_configured(cfg):
        return NullSink()
    local_root = None if storage.is_remote(output) else output
    tracking = dataclasses.replace(cfg.tracking, uri=cfg.tracking.uri or default_uri(local_root),
                                   run_name=cfg.tracking.run_name or f"eval-{cfg.suite}")
    if cfg.run_id is not None:
        require_run(tracking.uri, cfg.run_id)
    sink = open_sink(tracking, output_root=local_root, run_id=cfg.run_id)
    if cfg.run_id is None:
        sink.log_params(config_tree.to_dict(cfg))
        sink.set_tags({"tipsv2.stage": "evaluate", "tipsv2.output": output})   # as ingest's and caption's runs
    else:   # an existing run's params cannot change: record what was evaluated as tags
        sink.set_tags({f"eval.{cfg.suite}.checkpoint": cfg.checkpoint, f"eval.{cfg.suite}.data": str(cfg.data)})
    return sink


def log_results(sink: MetricsSink, cfg: EvaluateConfig, results: dict[str, Any]) -> None:
    sink.log_metrics({f"eval/{cfg.suite}/{k}": v for k, v in results["metrics"].items()}, step=cfg.step)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, f"eval_{cfg.suite}.json")
        path.write_text(json.dumps(results, indent=2, sort_keys=True))
        sink.log_artifact(path, "eval")


# ---------------------------------------------------------------- the stage


def results_uri(output: str, suite: str) -> str:
    return storage.join(output, f"eval_{suite}.json")


def evaluate(cfg: EvaluateConfig) -> dict[str, float]:
    """Load the model and tokenizer, run the suite; the metrics dict ("<task>/<variant>/<metric>" -> float)."""
    with tempfile.TemporaryDirectory(prefix="tipsv2-eval-") as scratch:
        model = load_model(cfg, scratch).to(cfg.device)
        tokenizer = load_tokenizer(cfg, model, scratch)
        try:
            return run_suite(cfg.suite, model, tokenizer, data_location(cfg.data), **suite_options(cfg.options))
        except TypeError as err:   # an option the suite does not take
            raise ValueError(f"suite {cfg.suite!r} rejected options {sorted(cfg.options)}: {err}") from err


def summarize(cfg: EvaluateConfig, *, target: str, metrics: dict[str, float], run_id: str | None,
              wall_s: float, skipped: bool) -> dict[str, Any]:
    return {"stage": "evaluate", "suite": cfg.suite, "skipped": skipped,
            "read": {"checkpoint": cfg.checkpoint, "data": cfg.data,
                     "tokenizer": cfg.tokenizer or default_tokenizer_uri(cfg.checkpoint)},
            "wrote": {"results": target}, "metrics": metrics, "mlflow_run_id": run_id, "wall_s": wall_s}


def run(cfg: EvaluateConfig, output: str) -> dict[str, Any]:
    """Evaluate and write `<output>/eval_<suite>.json`, config.json and summary.json; returns the summary.
    Skipped (nothing recomputed or logged) when the results of this exact config are already there."""
    watch = cli.Stopwatch()
    target = results_uri(output, cfg.suite)
    previous = cli.done_before(target, cfg)
    if previous is not None:
        print(f"{target} already holds this config's results: skipped")
        summary = summarize(cfg, target=target, metrics=previous["metrics"], run_id=previous.get("mlflow_run_id"),
                            wall_s=watch.seconds(), skipped=True)
        cli.write_summary(output, summary)
        return summary
    sink = open_tracking(cfg, output)
    status = "FAILED"
    try:
        uri = getattr(sink, "uri", None) or cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
        with registry.resolved(cfg.checkpoint, uri) as checkpoint:   # models:/NAME/VERSION -> hf:DOWNLOADED
            metrics = evaluate(dataclasses.replace(cfg, checkpoint=checkpoint))
        results = cli.done_record(cfg, suite=cfg.suite, checkpoint=cfg.checkpoint, data=cfg.data, metrics=metrics,
                                  seconds=watch.seconds(), mlflow_run_id=sink.run_id)
        storage.write_json(target, results)
        cli.write_resolved_config(output, cfg)
        log_results(sink, cfg, results)
        registry.link_evaluation(sink, cfg.checkpoint, [f"eval/{cfg.suite}/{k}" for k in metrics], suite=cfg.suite)
        status = "FINISHED"
    finally:
        sink.close(status)
    summary = summarize(cfg, target=target, metrics=metrics, run_id=sink.run_id, wall_s=watch.seconds(),
                        skipped=False)
    cli.write_summary(output, summary)
    return summary


# ---------------------------------------------------------------- command line

FLAGS = {"checkpoint": "checkpoint", "suite": "suite", "data": "data", "tokenizer": "tokenizer", "run_id": "run_id",
         "device": "device", "step": "step", "tracking_uri": "tracking.uri", "experiment": "tracking.experiment", "vision_heads": "vision_heads",
         "text_heads": "text_heads", "text_max_len": "text_max_len"}


class Flags:
    """evaluate's own flags (`--checkpoint`, `--suite`, ...): each is a `--set` of its config key, applied after
    the shared `--config` / `--set`; `--option KEY=JSON` adds a suite keyword argument."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--checkpoint", help='exported model dir, "hf:DIR" or "VISION.npz[,TEXT.npz]"')
        parser.add_argument("--suite", help=f"one of {sorted(SUITES)}")
        parser.add_argument("--data", help="dataset root (local or s3://)")
        parser.add_argument("--tokenizer", help=f"SentencePiece model; default: {TOKENIZER_FILE} beside the checkpoint")
        parser.add_argument("--run-id", dest="run_id", help="MLflow run to log the metrics into")
        parser.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow tracking URI")
        parser.add_argument("--experiment", help="MLflow experiment of a new run")
        parser.add_argument("--vision-heads", dest="vision_heads", help="released checkpoints: vision attention heads")
        parser.add_argument("--text-heads", dest="text_heads", help="released checkpoints: text attention heads")
        parser.add_argument("--text-max-len", dest="text_max_len", help="tokens per text (default: the model's)")
        parser.add_argument("--device", help="torch device, e.g. cpu or cuda")
        parser.add_argument("--step", help="MLflow step of the metrics")
        parser.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=JSON",
                            help="keyword argument of the suite, e.g. max_items=100 (repeatable)")

    def apply(self, cfg: EvaluateConfig, args: argparse.Namespace) -> EvaluateConfig:
        for flag, path in FLAGS.items():
            if getattr(args, flag) is not None:
                cfg = config_tree.override(cfg, f"{path}={getattr(args, flag)}")
        for option in args.options:
            if "=" not in option:
                raise ValueError(f"--option expects KEY=VALUE, got {option!r}")
            key, value = option.split("=", 1)
            cfg = dataclasses.replace(cfg, options={**cfg.options, key.strip(): value})
        return cfg


def print_metrics(summary: dict[str, Any], output: str) -> None:
    width = max(len(k) for k in summary["metrics"])
    for key, value in summary["metrics"].items():
        print(f"{key.ljust(width)}  {value:.4f}")
    print(f"wrote {summary['wrote']['results']} ({summary['wall_s']:.1f} s)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.stage_main(argv, PRESETS, run, description=__doc__, flags=Flags(),
                          show=print_metrics, stage="evaluate")


if __name__ == "__main__":
    main()

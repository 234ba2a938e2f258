"""One MLflow run for a stage that does not track itself (ingest, caption): `@tracked("ingest")` on its `run`.

    @tracked("caption")
    def run(cfg: CaptionConfig, output: str) -> dict: ...

Before the stage starts (before Ray): its inputs exist (pipelines.layout.check_inputs) and its tracking store
is one every node reaches (pipelines.tracking.store_uri refuses a file store for a remote output). Then a run
in MLFLOW_EXPERIMENT_NAME (default "tipsv2"; pipelines.run_all exports its own, and its parent run id)
named after the stage: the resolved config as params, the summary's numbers as metrics (step 0), summary.json
as an artifact; the run id goes into the summary (`mlflow_run_id`). A failed stage leaves a FAILED run; a
rerun the stage skipped (summary `skipped`) keeps the earlier run and leaves no new one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from pipelines import cli, layout
from pipelines.tracking import PARENT_ENV, MlflowSink, store_uri
from tipsv2 import config_tree

DEFAULT_EXPERIMENT = "tipsv2"
log = logging.getLogger(__name__)


def numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a summary as metric names (`written/images`); booleans and text left out."""
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for key, value in tree.items():
            out |= numbers(value, f"{prefix}{key}/")
        return out
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("/"): float(tree)}
    return {}


def open_run(stage: str, cfg: Any, output: str) -> MlflowSink:
    sink = MlflowSink(uri=store_uri(None, output), experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or
                      DEFAULT_EXPERIMENT, run_name=stage, parent_run_id=os.environ.get(PARENT_ENV) or None,
                      offline_dir=output if "://" not in output else None)
    sink.log_params(config_tree.to_dict(cfg))
    sink.set_tags({"tipsv2.stage": stage, "tipsv2.output": output})
    return sink


def record(sink: MlflowSink, summary: dict[str, Any], output: str) -> dict[str, Any]:
    summary = {**summary, "mlflow_run_id": sink.run_id}
    sink.log_metrics(numbers({k: v for k, v in summary.items() if k != "config"}), step=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / cli.SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=2, default=str))
        sink.log_artifact(path)
    cli.write_summary(output, summary)
    return summary


def tracked(stage: str) -> Callable:
    def wrap(run: Callable[[Any, str], dict[str, Any]]) -> Callable[[Any, str], dict[str, Any]]:
        @functools.wraps(run)
        def tracked_run(cfg: Any, output: str) -> dict[str, Any]:
            layout.check_inputs(stage, cfg)
            sink = open_run(stage, cfg, output)
            try:
                summary = run(cfg, output)
            except BaseException:
                sink.close("FAILED")
                raise
            if summary.get("skipped") and summary.get("mlflow_run_id"):
                sink.close()
                try:   # the earlier run holds this output's record
                    sink.client.delete_run(sink.run_id)
                except Exception as err:  # noqa: BLE001 - tracking never fails a stage
                    log.warning("MLflow run %s of a skipped rerun not deleted (%s)", sink.run_id, err)
                return summary
            summary = record(sink, summary, output)
            sink.close()
            return summary
        return tracked_run
    return wrap

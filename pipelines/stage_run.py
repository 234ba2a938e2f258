"""One MLflow run for a stage that does not track itself (ingest, caption): `@tracked("ingest")` on its `run`.

    @tracked("caption", writes=(Kind.CAPTIONS, "captions_path"))
    def run(cfg: CaptionConfig, output: str) -> dict: ...

Before the stage starts (before Ray): its inputs exist (pipelines.layout.check_inputs) and its tracking store
is one every node reaches (pipelines.tracking_store.store_uri refuses a file store for a remote output). Then a run
where the stage's `tracking` config says (experiment "tipsv2" by default; pipelines.run_all sets the uri and
its own run as the parent) named after the stage: the resolved config as params, the summary's numbers as metrics (step 0), summary.json
as an artifact, the Parquet set it wrote as a dataset (pipelines/lineage.py); the run id goes into the summary
(`mlflow_run_id`). A failed stage leaves a FAILED run; a
rerun the stage skipped (summary `skipped`) keeps the earlier run and leaves no new one.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

from pipelines import cli, layout, lineage
from pipelines.tracking import MlflowSink, numbers
from pipelines.tracking_store import store_uri
from tipsv2 import config_tree

log = logging.getLogger(__name__)


def open_run(stage: str, cfg: Any, output: str) -> MlflowSink:
    """The stage's run, where its `tracking` config says (run_all sets `uri` and `parent_run_id`)."""
    tracking = cfg.tracking
    sink = MlflowSink(uri=store_uri(tracking.uri, output), experiment=tracking.experiment,
                      run_name=tracking.run_name or stage, parent_run_id=tracking.parent_run_id,
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


def tracked(stage: str, *, writes: tuple[lineage.Kind, str] | None = None) -> Callable:
    """`writes`: (kind, key of the summary's `written`) of the Parquet set the stage writes, logged as a dataset
    of its run (context `output`, pipelines/lineage.py)."""
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
            if writes is not None:
                lineage.log_output(sink, writes[0], summary["written"][writes[1]])
            sink.close()
            return summary
        return tracked_run
    return wrap

r"""Compare MLflow runs: the config fields that differ, final metrics, and overlay plots.

    python -m pipelines.compare --experiment tipsv2 [--runs ID ...] [--metrics loss/total ...] \
        --output outputs/compare [--tracking-uri http://127.0.0.1:5000]
    python -m pipelines.compare --models tipsv2-pretrain/1 models:/tipsv2-pretrain/2 --output outputs/compare

`--models` selects the runs that registered those model versions (pipelines/registry.py; NAME/VERSION,
models:/NAME/VERSION or NAME@ALIAS) and names the version in a `model` column; the experiment is then the
first run's unless given. A `captions` column shows the digest of the caption set each run trained on
(pipelines/lineage.py), so runs on different captions stand apart.

Writes `comparison.md`, `comparison.csv`, `comparison.json` and one `<metric>.png` overlay per metric to
the output, and logs them as artifacts of a run tagged `tipsv2.kind=compare` (which later comparisons
skip). Works against any tracking URI (sqlite file or server).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipelines import lineage, registry, storage

KIND_TAG = "tipsv2.kind"
DEFAULT_METRICS = ("loss/total", "loss/contrastive", "loss/dino", "loss/patch")


@dataclass
class RunRow:
    run_id: str
    name: str
    params: dict[str, str]
    final: dict[str, float]         # last logged value of every metric
    captions: str = ""              # digest of the caption set it trained on (pipelines.lineage)
    model: str = ""                 # NAME/VERSION when selected by registered model version


def differing_params(rows: list[RunRow], prefixes: list[str] | None = None) -> list[str]:
    """Config keys whose value is not the same in every run (missing counts as a value), optionally
    only those starting with one of `prefixes`."""
    keys = sorted({k for r in rows for k in r.params if prefixes is None or k.startswith(tuple(prefixes))})
    return [k for k in keys if len({r.params.get(k) for r in rows}) > 1]


def table(rows: list[RunRow], params: list[str], metrics: list[str]) -> list[dict[str, str]]:
    out = []
    for r in rows:
        line = {"run": r.name or r.run_id[:8], "run_id": r.run_id}
        line |= {k: getattr(r, k) for k in ("model", "captions") if any(getattr(o, k) for o in rows)}
        line |= {p: r.params.get(p, "") for p in params}
        line |= {m: (f"{r.final[m]:.4g}" if m in r.final else "") for m in metrics}
        out.append(line)
    return out


def markdown(lines: list[dict[str, str]]) -> str:
    if not lines:
        return "(no runs)\n"
    columns = list(lines[0])
    text = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return text + "".join("| " + " | ".join(line[c] for c in columns) + " |\n" for line in lines)


def fetch(client, experiment: str, run_ids: list[str] | None, models: dict[str, str] | None = None) -> list[RunRow]:
    """The runs `run_ids` (or those that registered `models`: {run id: NAME/VERSION}), else every run of
    the experiment but earlier comparisons."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} at {client.tracking_uri}")
    chosen = list(dict.fromkeys([*(run_ids or []), *(models or {})]))
    runs = [client.get_run(r) for r in chosen] if chosen else client.search_runs([found.experiment_id])
    runs = [r for r in runs if r.data.tags.get(KIND_TAG) != "compare"]
    return [RunRow(run_id=r.info.run_id, name=r.info.run_name or "", params=dict(r.data.params),
                   final=dict(r.data.metrics), captions=lineage.caption_digest(r),
                   model=(models or {}).get(r.info.run_id, "")) for r in runs]


def plot(client, rows: list[RunRow], metric: str, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for r in rows:
        history = sorted(client.get_metric_history(r.run_id, metric), key=lambda m: m.step)
        if history:
            ax.plot([m.step for m in history], [m.value for m in history], label=r.name or r.run_id[:8])
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def run(*, experiment: str | None, output: str, run_ids: list[str] | None = None,
        metrics: list[str] | None = None, param_prefixes: list[str] | None = None,
        tracking_uri: str | None = None, models: list[str] | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = registry.runs_of(client, models or [])
    if experiment is None:
        if not versions:
            raise ValueError("name the runs to compare: --experiment NAME, or --models NAME/VERSION ...")
        experiment = client.get_experiment(client.get_run(next(iter(versions))).info.experiment_id).name
    rows = fetch(client, experiment, run_ids, versions)
    metrics = list(metrics or [m for m in DEFAULT_METRICS if any(m in r.final for r in rows)])
    params = differing_params(rows, param_prefixes)
    lines = table(rows, params, metrics)
    local = Path(output) if not storage.is_remote(output) else Path(os.environ.get("TMPDIR", "/tmp")) / "tipsv2-compare"
    local.mkdir(parents=True, exist_ok=True)
    (local / "comparison.md").write_text(markdown(lines))
    (local / "comparison.json").write_text(json.dumps({"params": params, "metrics": metrics, "rows": lines}, indent=2))
    buffer = io.StringIO()
    if lines:
        writer = csv.DictWriter(buffer, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)
    (local / "comparison.csv").write_text(buffer.getvalue())
    plots = [m for m in metrics if plot(client, rows, m, local / f"{m.replace('/', '_')}.png")]
    files = sorted(p.name for p in local.iterdir() if p.suffix in (".md", ".csv", ".json", ".png"))
    if storage.is_remote(output):
        for name in files:
            storage.write_bytes(storage.join(output, name), (local / name).read_bytes())
    found = client.get_experiment_by_name(experiment)
    compare_run = client.create_run(found.experiment_id, run_name=f"compare-{experiment}", tags={KIND_TAG: "compare"})
    for name in files:
        client.log_artifact(compare_run.info.run_id, str(local / name), "comparison")
    client.set_terminated(compare_run.info.run_id)
    return {"runs": len(rows), "differing_params": params, "metrics": metrics, "plots": plots, "files": files,
            "compare_run_id": compare_run.info.run_id, "table": lines}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default=None, help="required unless --models is given")
    parser.add_argument("--runs", nargs="*", default=None, help="run ids (default: every run of the experiment)")
    parser.add_argument("--metrics", nargs="*", default=None, help=f"default: those of {DEFAULT_METRICS} logged")
    parser.add_argument("--models", nargs="*", default=None, metavar="NAME/VERSION",
                        help="registered model versions (NAME/VERSION, models:/NAME/VERSION, NAME@ALIAS): their runs")
    parser.add_argument("--output", required=True)
    parser.add_argument("--params", nargs="*", default=None, metavar="PREFIX",
                        help="only config keys starting with these (default: every key that differs)")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    args = parser.parse_args(argv)
    result = run(experiment=args.experiment, output=args.output, run_ids=args.runs, metrics=args.metrics,
                 param_prefixes=args.params, tracking_uri=args.tracking_uri, models=args.models)
    print(markdown(result["table"]))
    print(f"wrote {', '.join(result['files'])} to {args.output}; MLflow run {result['compare_run_id']}")


if __name__ == "__main__":
    main()

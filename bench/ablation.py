"""Mini-ablation on synthetic scenes: iBOT vs iBOT++, head-only vs full EMA, distilled student vs teacher.

    .venv/bin/python -m bench.ablation                  # 4 arms x 2 seeds x 300 steps, ~6-8 min on 2 idle cores
    .venv/bin/python -m bench.ablation --steps 20 --seeds 0    # a quick look (~1 min)
    .venv/bin/python -m bench.ablation --rebuild        # the table again, from the MLflow experiment alone

Every arm trains the tiny preset (tipsv2.configs.tiny) for the same number of steps on the same synthetic
scenes, in this process (tipsv2.loop.train_local / tipsv2.distill_loop.distill_local), then runs the
synthetic evaluation suite on held-out test scenes:

| arm       | patch loss | teacher encoder              | trained from                                   |
|-----------|------------|------------------------------|------------------------------------------------|
| ibot      | iBOT       | head-only EMA                | random init                                    |
| ibot_pp   | iBOT++     | head-only EMA (TIPSv2)       | random init; also the distillation teacher     |
| full_ema  | iBOT++     | full EMA (TIPS / DINO)       | random init                                    |
| distilled | -          | frozen ibot_pp of the seed   | random init, distilled (tipsv2.configs distill tiny) |

Metrics: zero-shot segmentation mIoU (MaskCLIP value attention, 7 labels incl. background), image->text
and text->image R@1 with CLS2 (the synthetic-caption token) over the three captions of each test scene,
linear-probe segmentation mIoU on frozen patch tokens. Each run is an MLflow run (sqlite, experiment
`tipsv2-ablation`, one `ablation.invocation` tag per call) holding its config, loss curve and final
metrics, so `--rebuild` recomputes the table from MLflow. Writes bench/results/ablation.json and
ablation.md (mean +- sample std over seeds; paired per-seed differences for each comparison).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import enum
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench.common import RESULTS, machine
from pipelines.tracking import MlflowSink
from tipsv2 import config_tree
from tipsv2.configs import PretrainConfig, distill_preset, tiny
from tipsv2.distill_loop import distill_local
from tipsv2.eval import probes
from tipsv2.eval.suites import SyntheticSuiteConfig, synthetic_suite
from tipsv2.loop import LocalResult, fit_tokenizer, synthetic_records, train_local
from tipsv2.losses.ibot import PatchLossKind
from tipsv2.task import TeacherMode
from tipsv2.tokenizer import Tokenizer

EXPERIMENT = "tipsv2-ablation"
DEFAULT_STEPS = 300           # per run: ~0.12 s/step on 2 idle cores, so 8 runs + evals take ~6-8 min
DEFAULT_SEEDS = (0, 1)


class Arm(str, enum.Enum):
    IBOT = "ibot"
    IBOT_PP = "ibot_pp"
    FULL_EMA = "full_ema"
    DISTILLED = "distilled"


LABELS = {Arm.IBOT: "iBOT, head-only EMA", Arm.IBOT_PP: "iBOT++, head-only EMA", Arm.FULL_EMA: "iBOT++, full EMA",
          Arm.DISTILLED: "distilled student (random init)"}
METRICS = {   # column -> suite metric
    "zero-shot seg mIoU": "zero_shot_segmentation/miou",
    "R@1 image->text": "retrieval/cls2/i2t_r1",
    "R@1 text->image": "retrieval/cls2/t2i_r1",
    "linear-probe seg mIoU": "linear_segmentation/miou",
}
# (comparison, baseline arm, compared arm): the paper expects the compared arm to be better on zero-shot seg.
COMPARISONS = (("iBOT vs iBOT++", Arm.IBOT, Arm.IBOT_PP),
               ("head-only vs full EMA", Arm.IBOT_PP, Arm.FULL_EMA),
               ("teacher vs distilled student", Arm.IBOT_PP, Arm.DISTILLED))

EVAL = SyntheticSuiteConfig(scenes=tiny().data.synthetic, train_count=128, test_count=64,
                            segmentation_probe=probes.LinearSegmentationConfig(epochs=10))


def pretrain_config(arm: Arm, *, steps: int, seed: int) -> PretrainConfig:
    cfg = dataclasses.replace(tiny(), steps=steps, seed=seed)
    task = cfg.task
    if arm == Arm.IBOT:
        task = dataclasses.replace(task, patch=dataclasses.replace(task.patch, kind=PatchLossKind.IBOT))
    elif arm == Arm.FULL_EMA:
        task = dataclasses.replace(task, teacher=dataclasses.replace(task.teacher, mode=TeacherMode.FULL_EMA))
    return dataclasses.replace(cfg, task=task)


def open_run(mlflow_dir: Path, *, arm: Arm, seed: int, invocation: str, cfg: Any) -> MlflowSink:
    sink = MlflowSink(uri=f"sqlite:///{mlflow_dir.resolve() / 'mlflow.db'}", experiment=EXPERIMENT,
                      run_name=f"{arm.value}-seed{seed}", offline_dir=str(mlflow_dir))
    sink.set_tags({"ablation.invocation": invocation, "ablation.arm": arm.value, "ablation.seed": str(seed)})
    sink.log_params(config_tree.to_dict(cfg))
    return sink


def log_history(sink: MlflowSink, result: LocalResult, every: int) -> None:
    for row in result.history:
        if row["step"] % every == 0 or row["step"] == len(result.history) - 1:
            sink.log_metrics({k: v for k, v in row.items() if k.startswith(("loss/", "metric/"))}, step=int(row["step"]))


def evaluate(model, tokenizer: Tokenizer) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        metrics = synthetic_suite(model, tokenizer, None, cfg=EVAL)
    finally:
        model.train(was_training)
    return metrics, time.perf_counter() - start


def finish(sink: MlflowSink, *, arm: Arm, seed: int, result: LocalResult, model, tokenizer: Tokenizer,
           log_every: int) -> dict[str, Any]:
    log_history(sink, result, log_every)
    metrics, eval_s = evaluate(model, tokenizer)
    sink.log_metrics({f"eval/{k}": v for k, v in metrics.items()} | {"train_s": result.seconds, "eval_s": eval_s},
                     step=len(result.history))
    sink.close()
    print(f"  {arm.value:9s} seed {seed}: train {result.seconds:6.1f} s, eval {eval_s:5.1f} s, "
          + ", ".join(f"{c} {metrics[m]:.3f}" for c, m in METRICS.items()), flush=True)
    return {"arm": arm.value, "seed": seed, "run_id": sink.run_id, "train_s": result.seconds, "eval_s": eval_s,
            "metrics": metrics}


def run_seed(seed: int, *, steps: int, records, tokenizer: Tokenizer, mlflow_dir: Path, invocation: str
             ) -> list[dict[str, Any]]:
    rows = []
    teacher = None
    for arm in (Arm.IBOT, Arm.IBOT_PP, Arm.FULL_EMA):
        cfg = pretrain_config(arm, steps=steps, seed=seed)
        sink = open_run(mlflow_dir, arm=arm, seed=seed, invocation=invocation, cfg=cfg)
        result = train_local(cfg, records=records, tokenizer=tokenizer)
        rows.append(finish(sink, arm=arm, seed=seed, result=result, model=result.task.model, tokenizer=tokenizer,
                           log_every=cfg.log_every))
        if arm == Arm.IBOT_PP:
            teacher = result.task
    cfg = dataclasses.replace(distill_preset("tiny"), steps=steps, seed=seed)
    sink = open_run(mlflow_dir, arm=Arm.DISTILLED, seed=seed, invocation=invocation, cfg=cfg)
    sink.set_tags({"ablation.teacher_run_id": rows[1]["run_id"]})
    result = distill_local(cfg, teacher=teacher.model, teacher_heads=(teacher.teacher_dino_head,
                                                                      teacher.teacher_patch_head),
                           records=records, tokenizer=tokenizer)
    rows.append(finish(sink, arm=Arm.DISTILLED, seed=seed, result=result, model=result.task.student,
                       tokenizer=tokenizer, log_every=cfg.log_every))
    return rows


# ---------------------------------------------------------------- the table


def spread(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": list(values)}


def table(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: mean / std / per-seed values of each column; per comparison: paired differences by seed."""
    by = {(r["arm"], r["seed"]): r["metrics"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    arms = {arm.value: {column: spread([by[(arm.value, s)][m] for s in seeds])
                        for column, m in METRICS.items()}
            for arm in Arm if all((arm.value, s) in by for s in seeds)}
    comparisons = []
    for name, base, other in COMPARISONS:
        if base.value not in arms or other.value not in arms:
            continue
        deltas = {column: spread([by[(other.value, s)][m] - by[(base.value, s)][m] for s in seeds])
                  for column, m in METRICS.items()}
        comparisons.append({"comparison": name, "baseline": base.value, "compared": other.value, "delta": deltas})
    return {"seeds": seeds, "arms": arms, "comparisons": comparisons}


def _cell(stats: dict[str, Any], *, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{stats['mean']:{sign}.3f} ± {stats['std']:.3f}"


def markdown(result: dict[str, Any], *, budget: str) -> str:
    columns = list(METRICS)
    lines = [f"Budget: {budget}. Mean ± sample std over seeds {result['seeds']}; "
             "Δ = compared − baseline, paired by seed.", "",
             "| comparison | run | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for comp in result["comparisons"]:
        for role, arm in (("baseline", comp["baseline"]), ("compared", comp["compared"])):
            name = LABELS[Arm(arm)] + (" (teacher)" if comp["compared"] == Arm.DISTILLED.value and role == "baseline" else "")
            cells = " | ".join(_cell(result["arms"][arm][c]) for c in columns)
            lines.append(f"| {comp['comparison'] if role == 'baseline' else ''} | {name} | {cells} |")
        lines.append("| | **Δ** | " + " | ".join(_cell(comp["delta"][c], signed=True) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def rebuild(mlflow_dir: Path, invocation: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """The runs of one invocation (the latest by default) read back from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_dir.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise ValueError(f"no experiment {EXPERIMENT!r} in {mlflow_dir}/mlflow.db; run the ablation first")
    found = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                               filter_string="attributes.status = 'FINISHED'")
    if not found:
        raise ValueError(f"experiment {EXPERIMENT!r} in {mlflow_dir}/mlflow.db has no finished runs")
    invocation = invocation or found[0].data.tags["ablation.invocation"]
    runs = [{"arm": r.data.tags["ablation.arm"], "seed": int(r.data.tags["ablation.seed"]), "run_id": r.info.run_id,
             "metrics": {k[len("eval/"):]: v for k, v in r.data.metrics.items() if k.startswith("eval/")}}
            for r in found if r.data.tags.get("ablation.invocation") == invocation]
    return runs, invocation


# ---------------------------------------------------------------- entry point


def describe_budget(steps: int, seeds: Sequence[int]) -> str:
    cfg = tiny()
    images = steps * cfg.data.batch_size
    return (f"{steps} steps x batch {cfg.data.batch_size} = {images} images per run "
            f"({images / cfg.data.synthetic.train_size:.1f} epochs of {cfg.data.synthetic.train_size} scenes, "
            f"{cfg.data.crops.global_size} px), 4 arms x {len(seeds)} seeds = {4 * len(seeds)} runs; "
            f"eval on {EVAL.test_count} test scenes, probes on {EVAL.train_count} train scenes")


def run(*, steps: int, seeds: Sequence[int], mlflow_dir: Path, out: Path) -> dict[str, Any]:
    wall = time.perf_counter()
    load_start = os.getloadavg()
    budget = describe_budget(steps, seeds)
    invocation = time.strftime("%Y%m%d-%H%M%S")
    print(f"budget: {budget}\nMLflow: sqlite:///{mlflow_dir.resolve() / 'mlflow.db'} experiment {EXPERIMENT!r}, "
          f"invocation {invocation}", flush=True)
    cfg = tiny()
    records = synthetic_records(cfg.data.synthetic)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = fit_tokenizer(records, cfg.data.tokenizer_vocab, Path(tmp) / "spm.model",
                                  max_len=cfg.task.model.text.max_len)
        runs = [row for seed in seeds for row in run_seed(seed, steps=steps, records=records, tokenizer=tokenizer,
                                                          mlflow_dir=mlflow_dir, invocation=invocation)]
    result = table(runs)
    wall_s = time.perf_counter() - wall
    payload = {"budget": budget, "steps": steps, "seeds": list(seeds), "wall_s": wall_s, "machine": machine(),
               "load_average": {"start": load_start, "end": os.getloadavg()},   # other processes on the cores
               "mlflow": {"uri": f"sqlite:///{mlflow_dir / 'mlflow.db'}", "experiment": EXPERIMENT,
                          "invocation": invocation},
               "runs": runs, **result}
    text = markdown(result, budget=budget) + (
        f"\nWall time: {wall_s / 60:.1f} min with {machine()['threads']} torch threads; 1-min load average "
        f"{load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (2 cores).\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "ablation.md").write_text(text)
    print("\n" + text)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--mlflow-dir", type=Path, default=RESULTS / "ablation_mlruns",
                        help="directory of the sqlite MLflow store")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where ablation.json and ablation.md go")
    parser.add_argument("--rebuild", action="store_true", help="print the table of the latest invocation from MLflow")
    parser.add_argument("--invocation", help="with --rebuild: which invocation (default: the latest)")
    args = parser.parse_args(argv)
    if args.rebuild:
        runs, invocation = rebuild(args.mlflow_dir, args.invocation)
        print(f"invocation {invocation}: {len(runs)} runs\n")
        print(markdown(table(runs), budget="as recorded in MLflow"))
        return
    args.mlflow_dir.mkdir(parents=True, exist_ok=True)
    run(steps=args.steps, seeds=args.seeds, mlflow_dir=args.mlflow_dir, out=args.out)


if __name__ == "__main__":
    main()

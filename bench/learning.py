"""Does the recipe learn patch-text alignment? A miniature, and the paper's three claims tested on it.

    .venv/bin/python -m bench.learning                       # 8 seeds, about 25 min on 2 idle cores
    .venv/bin/python -m bench.learning --seeds 0 1 --steps 60    # a quick look (about 3 min)
    .venv/bin/python -m bench.learning --rebuild             # the table again, from the MLflow experiment alone

Every run trains the `learning` preset (tipsv2.configs.learning: the tiny model, 112 px scenes whose
class is an object's colour, which every patch of the object shows; captions and noisy alt-text that
name the colours) in one process, then measures on held-out test scenes, with nothing trained on top:

- primary: foreground patch zero-shot accuracy (tipsv2.eval.patch_text): each foreground patch's
  value-attention token against one prompt embedding per colour; chance (the most frequent class's share,
  at least 1/6) and an oracle (the nearest palette colour to the patch's median pixel) beside it;
- per-class AUROC of the patch-text cosine; controls: image->text retrieval R@1 (CLS2, three captions per
  scene) and a linear probe on frozen patch tokens (segmentation mIoU, colours + background).

Arms (one seed fixes the init, the data order, the crops and the masks of every arm: the runs are paired):

| arm       | recipe                                                                        |
|-----------|-------------------------------------------------------------------------------|
| ibot_pp   | TIPSv2: iBOT++, head-only EMA; also the distillation teacher of its seed      |
| ibot      | iBOT (masked tokens only), head-only EMA                                      |
| full_ema  | iBOT++, full EMA (TIPS / DINO teacher)                                        |
| distilled | random-init student taught by the ibot_pp model of its seed (`distill` preset) |
| shuffled  | negative control: ibot_pp on captions and alt-texts shuffled across images   |

The decision rules (RULES below) were written before any of these runs and are not to be tuned after:
d_i is the paired per-seed difference of the primary metric; CI is the t-interval of its mean over seeds.
Each run is an MLflow run (sqlite under bench/results/learning_mlruns, experiment `tipsv2-learning`,
one `learning.invocation` tag per call); `--rebuild` recomputes the table from MLflow. Arms run in two
processes of one thread each when the 1-minute load average is under 1.0 at the start, else in one.
Writes bench/results/learning.json and learning.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bench.common import RESULTS, machine
from tipsv2 import config_tree
from tipsv2.configs import PretrainConfig, distill_preset, learning
from tipsv2.data import synthetic
from tipsv2.distill_loop import distill_local
from tipsv2.eval import probes, retrieval
from tipsv2.eval.features import embed_texts, extract_features, model_image_encoder, model_text_encoder
from tipsv2.eval.patch_text import colour_oracle, patch_text_alignment
from tipsv2.loop import LocalResult, Record, fit_tokenizer, synthetic_records, train_local
from tipsv2.losses.ibot import PatchLossKind
from tipsv2.task import TeacherMode
from tipsv2.tokenizer import Tokenizer

EXPERIMENT = "tipsv2-learning"
DEFAULT_SEEDS = tuple(range(8))
CONTROL_SEEDS = 2           # the negative control runs on the first seeds only (its verdict needs no pairing)
PRIMARY = "patch/accuracy"


class Arm(str, enum.Enum):
    IBOT_PP = "ibot_pp"
    IBOT = "ibot"
    FULL_EMA = "full_ema"
    DISTILLED = "distilled"
    SHUFFLED = "shuffled"


LABELS = {Arm.IBOT_PP: "iBOT++, head-only EMA (TIPSv2)", Arm.IBOT: "iBOT, head-only EMA",
          Arm.FULL_EMA: "iBOT++, full EMA", Arm.DISTILLED: "distilled student (random init)",
          Arm.SHUFFLED: "negative control: shuffled captions"}


@dataclasses.dataclass(frozen=True)
class Rule:
    """A paper claim and its decision rule on d = compared - baseline (primary metric, paired by seed)."""
    claim: str
    source: str
    baseline: Arm
    compared: Arm
    kind: str                 # "improves": d > 0 claimed; "equivalent": |d| < margin claimed
    margin: float             # improves: the smallest gain worth claiming; equivalent: the equivalence margin
    text: str


RULES = (
    Rule("iBOT++ improves patch-text alignment over iBOT", "TIPSv2 paper sec. 3 (iBOT++); project page: "
         "+14.1 mIoU zero-shot segmentation on ADE150", Arm.IBOT, Arm.IBOT_PP, "improves", 0.02,
         "reproduced if the 95 % CI of mean d lies above 0; not reproduced if it lies below +0.02 "
         "(a gain of 2 points or more is ruled out); inconclusive otherwise"),
    Rule("head-only EMA loses nothing against full EMA, with fewer parameters", "TIPSv2 paper sec. 3 "
         "(head-only EMA)", Arm.FULL_EMA, Arm.IBOT_PP, "equivalent", 0.05,
         "reproduced if the 90 % CI of mean d (two one-sided tests at 5 %) lies inside [-0.05, +0.05]; "
         "not reproduced if it lies wholly outside; inconclusive otherwise. Parameters: tipsv2.info counts"),
    Rule("a distilled student's patch-text alignment exceeds its teacher's", "TIPSv2 paper sec. 1-2 "
         "(distillation study)", Arm.IBOT_PP, Arm.DISTILLED, "improves", 0.02,
         "as for iBOT++: reproduced if the 95 % CI lies above 0; not reproduced if below +0.02"),
)
# The golden test and the negative control: learned >= 3 x chance; control <= chance + 3 noise, noise the
# binomial standard error of an accuracy at chance over the test set's objects (patches of one object share
# its colour, so objects, not patches, are the independent draws).
GOLDEN_FACTOR = 3.0
CONTROL_NOISE = 3.0


# ---------------------------------------------------------------- one run


def pretrain_config(arm: Arm, *, steps: int, seed: int) -> PretrainConfig:
    cfg = dataclasses.replace(learning(), steps=steps, seed=seed)
    task = cfg.task
    if arm == Arm.IBOT:
        task = dataclasses.replace(task, patch=dataclasses.replace(task.patch, kind=PatchLossKind.IBOT))
    elif arm == Arm.FULL_EMA:
        task = dataclasses.replace(task, teacher=dataclasses.replace(task.teacher, mode=TeacherMode.FULL_EMA))
    return dataclasses.replace(cfg, task=task)


def shuffled(records: Sequence[Record], seed: int) -> list[Record]:
    """The same images with the texts (alt-text and captions together) of other images: a fixed permutation
    per seed, so that text says nothing about its image."""
    order = np.random.default_rng([seed, 7]).permutation(len(records))
    return [dataclasses.replace(r, alt_text=records[j].alt_text, captions=records[j].captions)
            for r, j in zip(records, order)]


@functools.lru_cache(maxsize=4)
def rendered(scenes: synthetic.SyntheticConfig, split: synthetic.Split, count: int) -> tuple[synthetic.Scene, ...]:
    """The first `count` scenes of a split, rendered once per process (every run of a job reads them)."""
    return tuple(synthetic.make_scene(scenes, split, i) for i in range(count))


def held_out_scenes(cfg: PretrainConfig) -> tuple[synthetic.Scene, ...]:
    return rendered(cfg.data.synthetic, synthetic.Split.TEST, cfg.data.synthetic.test_size)


def evaluate(model: torch.nn.Module, tokenizer: Tokenizer, cfg: PretrainConfig, *, probe: bool = True
             ) -> dict[str, float]:
    """Primary metric, AUROC, chance, oracle and noise; with `probe`, the retrieval and linear-probe controls."""
    model.eval()
    scenes_cfg = cfg.data.synthetic
    scenes = held_out_scenes(cfg)
    items = [(s.image, s.mask) for s in scenes]
    encode_image, encode_text = model_image_encoder(model), model_text_encoder(model, tokenizer)
    names = synthetic.class_names(scenes_cfg)
    out = {f"patch/{k}": v for k, v in patch_text_alignment(encode_image, encode_text, names, items).items()}
    objects = sum(len(s.objects) for s in scenes)
    p = out["patch/chance"]
    out |= {"patch/oracle": colour_oracle([synthetic.RGB[c] for c in scenes_cfg.colours], items),
            "patch/chance_noise": math.sqrt(p * (1 - p) / objects), "num_objects": float(objects)}
    if probe:
        out |= controls(encode_image, encode_text, scenes, scenes_cfg, patch_size=model.patch_size)
    return out


def controls(encode_image, encode_text, test: Sequence[synthetic.Scene], scenes_cfg, *, patch_size: int
             ) -> dict[str, float]:
    """Retrieval R@1 with CLS2 and a linear probe on frozen patch tokens (trained on 128 train scenes)."""
    train = rendered(scenes_cfg, synthetic.Split.TRAIN, 128)
    size = scenes_cfg.image_size

    def features(scenes):
        return extract_features(encode_image, [s.image for s in scenes], image_size=size, patch_size=patch_size,
                                keep_patches=True)

    train_f, test_f = features(train), features(test)
    captions = [s.captions[g] for s in test for g in sorted(s.captions)]
    text = embed_texts(encode_text, captions)
    owner = torch.arange(len(test)).repeat_interleave(len(test[0].captions))
    out = {f"retrieval/{k}": v for k, v in retrieval.retrieval_metrics(test_f.cls2, text, owner).items()}
    def masks(scenes):   # (N, H, W) labels: 0 background, i + 1 the colour i
        return torch.from_numpy(np.stack([s.mask for s in scenes]).astype(np.int64))

    probe = probes.linear_segmentation(train_f.patches, masks(train), test_f.patches, masks(test),
                                       len(scenes_cfg.colours) + 1, probes.LinearSegmentationConfig(epochs=10))
    return out | {f"linear_probe/{k}": v for k, v in probe.items()}


def train_arm(arm: Arm, *, seed: int, steps: int, records: Sequence[Record], tokenizer: Tokenizer,
              teacher: Any = None) -> tuple[LocalResult, torch.nn.Module, Any]:
    """(result, the model to evaluate, its config) of one arm; `teacher` is the ibot_pp task for DISTILLED."""
    if arm == Arm.DISTILLED:
        cfg = dataclasses.replace(distill_preset("learning"), steps=steps, seed=seed)
        result = distill_local(cfg, teacher=teacher.model, records=records, tokenizer=tokenizer,
                               teacher_heads=(teacher.teacher_dino_head, teacher.teacher_patch_head))
        return result, result.task.student, cfg
    cfg = pretrain_config(Arm.IBOT_PP if arm == Arm.SHUFFLED else arm, steps=steps, seed=seed)
    texts = shuffled(records, seed) if arm == Arm.SHUFFLED else records
    result = train_local(cfg, records=texts, tokenizer=tokenizer)
    return result, result.task.model, cfg


def run_job(job: tuple[int, tuple[Arm, ...], int, str]) -> list[dict[str, Any]]:
    """One seed's arms in this process (a distilled arm follows the ibot_pp arm that teaches it)."""
    seed, arms, steps, tokenizer_path = job
    torch.set_num_threads(int(os.environ.get("TIPSV2_BENCH_THREADS", torch.get_num_threads())))
    cfg = learning()
    records = synthetic_records(cfg.data.synthetic)
    tokenizer = Tokenizer(tokenizer_path, max_len=cfg.task.model.text.max_len)
    rows, teacher = [], None
    for arm in arms:
        start = time.perf_counter()
        result, model, arm_cfg = train_arm(arm, seed=seed, steps=steps, records=records, tokenizer=tokenizer,
                                           teacher=teacher)
        train_s = time.perf_counter() - start
        if arm == Arm.IBOT_PP:
            teacher = result.task
        metrics = evaluate(model, tokenizer, learning())
        rows.append({"arm": arm.value, "seed": seed, "train_s": train_s, "eval_s": time.perf_counter() - start - train_s,
                     "metrics": metrics, "config": config_tree.to_dict(arm_cfg),
                     "history": [{k: v for k, v in r.items() if k.startswith(("loss/", "step"))}
                                 for r in result.history[::10]]})
        print(f"  {arm.value:9s} seed {seed}: train {train_s:5.1f} s, patch acc {metrics[PRIMARY]:.3f} "
              f"(chance {metrics['patch/chance']:.3f}), AUROC {metrics['patch/auroc']:.3f}, "
              f"R@1 {metrics['retrieval/i2t_r1']:.3f}", flush=True)
    return rows


def jobs(seeds: Sequence[int], steps: int, tokenizer_path: str, arms: Sequence[Arm] = tuple(Arm)
         ) -> list[tuple[int, tuple[Arm, ...], int, str]]:
    """Per seed: ibot_pp then the student it teaches (one process), ibot, full_ema; the control on the
    first CONTROL_SEEDS seeds. `arms` keeps a subset (a distilled arm brings its ibot_pp teacher)."""
    out = []
    for i, seed in enumerate(seeds):
        groups = [(Arm.IBOT_PP, Arm.DISTILLED) if Arm.DISTILLED in arms else (Arm.IBOT_PP,), (Arm.IBOT,),
                  (Arm.FULL_EMA,)] + ([(Arm.SHUFFLED,)] if i < CONTROL_SEEDS else [])
        out += [(seed, group, steps, tokenizer_path) for group in groups if any(a in arms for a in group)]
    return out


# ---------------------------------------------------------------- statistics and verdicts


def t_interval(values: Sequence[float], confidence: float) -> tuple[float, float]:
    """Two-sided t confidence interval of the mean of `values` (n >= 2)."""
    from scipy import stats   # scipy comes with scikit-image, a dependency

    n = len(values)
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def verdict(rule: Rule, diffs: Sequence[float]) -> dict[str, Any]:
    """Apply `rule` to the paired differences; the rule's text says how."""
    if len(diffs) < 2:
        return {"verdict": "inconclusive", "reason": "fewer than 2 seeds", "diffs": list(diffs)}
    mean = statistics.fmean(diffs)
    if rule.kind == "improves":
        low, high = t_interval(diffs, 0.95)
        agree = sum(d > 0 for d in diffs)
        result = "reproduced" if low > 0 else "not reproduced" if high < rule.margin else "inconclusive"
    else:
        low, high = t_interval(diffs, 0.90)
        agree = sum(abs(d) < rule.margin for d in diffs)
        inside = -rule.margin < low and high < rule.margin
        outside = high < -rule.margin or low > rule.margin
        result = "reproduced" if inside else "not reproduced" if outside else "inconclusive"
    return {"verdict": result, "mean": mean, "ci": [low, high], "seeds_agreeing": agree, "seeds": len(diffs),
            "diffs": list(diffs)}


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["arm"], r["seed"]): r["metrics"] for r in runs}
    columns = (PRIMARY, "patch/auroc", "retrieval/i2t_r1", "linear_probe/miou")
    arms = {}
    for arm in Arm:
        seeds = sorted(s for a, s in by if a == arm.value)
        if seeds:
            arms[arm.value] = {"seeds": seeds, **{c: spread([by[(arm.value, s)][c] for s in seeds]) for c in columns}}
    comparisons = []
    for rule in RULES:
        seeds = sorted(s for a, s in by if a == rule.compared.value and (rule.baseline.value, s) in by)
        diffs = [by[(rule.compared.value, s)][PRIMARY] - by[(rule.baseline.value, s)][PRIMARY] for s in seeds]
        auroc = [by[(rule.compared.value, s)]["patch/auroc"] - by[(rule.baseline.value, s)]["patch/auroc"] for s in seeds]
        comparisons.append({"claim": rule.claim, "source": rule.source, "rule": rule.text,
                            "baseline": rule.baseline.value, "compared": rule.compared.value,
                            **verdict(rule, diffs), "auroc_diff": spread(auroc) if auroc else None})
    any_run = next(iter(by.values()))
    reference = {k: any_run[k] for k in ("patch/chance", "patch/chance/uniform", "patch/oracle", "patch/chance_noise")}
    control = [by[k][PRIMARY] for k in by if k[0] == Arm.SHUFFLED.value]
    limit = reference["patch/chance"] + CONTROL_NOISE * reference["patch/chance_noise"]
    nulls = [by[k]["patch/null/p95"] for k in by if k[0] == Arm.SHUFFLED.value and "patch/null/p95" in by[k]]
    negative = {"values": control, "limit": limit, "within_noise": bool(control) and max(control) <= limit,
                "null_p95": nulls}
    return {"arms": arms, "comparisons": comparisons, "reference": reference, "negative_control": negative}


def markdown(summary: dict[str, Any], *, header: str) -> str:
    ref = summary["reference"]
    lines = [header, "",
             f"Primary metric: foreground patch zero-shot accuracy. Chance {ref['patch/chance']:.3f} (the most "
             f"frequent colour's share of foreground patches; uniform 1/6 = {ref['patch/chance/uniform']:.3f}), "
             f"oracle {ref['patch/oracle']:.3f} (nearest palette colour to a patch's median pixel), noise at "
             f"chance {ref['patch/chance_noise']:.3f} (binomial standard error over the test objects).", "",
             "| arm | seeds | patch accuracy | patch AUROC | R@1 image->text | linear-probe mIoU |",
             "|---|---|---|---|---|---|"]
    for arm, row in summary["arms"].items():
        cells = " | ".join(f"{row[c]['mean']:.3f} ± {row[c]['std']:.3f}"
                           for c in (PRIMARY, "patch/auroc", "retrieval/i2t_r1", "linear_probe/miou"))
        lines.append(f"| {LABELS[Arm(arm)]} | {len(row['seeds'])} | {cells} |")
    lines += ["", "Mean ± sample std over seeds.", "", "## The paper's claims", "",
              "| claim | source | d = compared − baseline (patch accuracy) | CI | seeds agreeing | verdict |",
              "|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        if "mean" not in c:
            lines.append(f"| {c['claim']} | {c['source']} | - | - | - | {c['verdict']} ({c['reason']}) |")
            continue
        level = "95 %" if "95 %" in c["rule"].split(";")[0] else "90 %"
        lines.append(f"| {c['claim']} | {c['source']} | {c['mean']:+.3f} | {level} [{c['ci'][0]:+.3f}, "
                     f"{c['ci'][1]:+.3f}] | {c['seeds_agreeing']}/{c['seeds']} | **{c['verdict']}** |")
    lines += ["", "Decision rules, fixed before the runs:", ""]
    lines += [f"- {c['claim']}: {c['rule']}." for c in summary["comparisons"]]
    neg = summary["negative_control"]
    if neg["values"]:
        lines += ["", f"Negative control (captions shuffled across images): patch accuracy "
                      f"{', '.join(f'{v:.3f}' for v in neg['values'])}; limit chance + {CONTROL_NOISE:g} noise = "
                      f"{neg['limit']:.3f}: {'within' if neg['within_noise'] else 'NOT within'} chance's noise."]
        if neg["null_p95"]:
            lines += ["", "95th percentile of each control run's permutation null (its own predictions, colour "
                          "names assigned to its predicted groups at random): "
                          + ", ".join(f"{v:.3f}" for v in neg["null_p95"]) + "."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- MLflow


def log_runs(runs: Sequence[dict[str, Any]], mlflow_dir: Path, invocation: str) -> None:
    """One MLflow run per arm and seed: config, loss curve (every 10th step), final metrics."""
    from pipelines.tracking import MlflowSink   # the bench logs like the stages do; tipsv2 stays MLflow-free

    for row in runs:
        sink = MlflowSink(uri=f"sqlite:///{mlflow_dir.resolve() / 'mlflow.db'}", experiment=EXPERIMENT,
                          run_name=f"{row['arm']}-seed{row['seed']}", offline_dir=str(mlflow_dir))
        sink.set_tags({"learning.invocation": invocation, "learning.arm": row["arm"], "learning.seed": str(row["seed"])})
        sink.log_params(row["config"])
        for point in row["history"]:
            sink.log_metrics({k: v for k, v in point.items() if k.startswith("loss/")}, step=int(point["step"]))
        sink.log_metrics({f"eval/{k}": v for k, v in row["metrics"].items()} | {"train_s": row["train_s"]},
                         step=int(row["history"][-1]["step"]) + 1 if row["history"] else 0)
        row["run_id"] = sink.run_id
        sink.close()


def rebuild(mlflow_dir: Path, invocation: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """The runs of one invocation (the latest by default), read back from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_dir.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise ValueError(f"no experiment {EXPERIMENT!r} in {mlflow_dir}/mlflow.db; run bench.learning first")
    found = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                               filter_string="attributes.status = 'FINISHED'")
    if not found:
        raise ValueError(f"experiment {EXPERIMENT!r} in {mlflow_dir}/mlflow.db has no finished runs")
    invocation = invocation or found[0].data.tags["learning.invocation"]
    runs = [{"arm": r.data.tags["learning.arm"], "seed": int(r.data.tags["learning.seed"]), "run_id": r.info.run_id,
             "metrics": {k[len("eval/"):]: v for k, v in r.data.metrics.items() if k.startswith("eval/")}}
            for r in found if r.data.tags.get("learning.invocation") == invocation]
    return runs, invocation


# ---------------------------------------------------------------- entry point


def run(*, steps: int, seeds: Sequence[int], mlflow_dir: Path, out: Path, parallel: bool | None = None,
        arms: Sequence[Arm] = tuple(Arm)) -> dict[str, Any]:
    wall = time.perf_counter()
    load_start = os.getloadavg()
    parallel = load_start[0] < 1.0 if parallel is None else parallel
    invocation = time.strftime("%Y%m%d-%H%M%S")
    cfg = learning()
    print(f"{len(seeds)} seeds x {steps} steps of batch {cfg.data.batch_size}; "
          f"{'2 processes x 1 thread' if parallel else '1 process'}; load average {load_start[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # One tokenizer for every arm (trained on the unshuffled texts: the control shuffles pairs, not words).
        fit_tokenizer(synthetic_records(cfg.data.synthetic), cfg.data.tokenizer_vocab, Path(tmp) / "spm.model",
                      max_len=cfg.task.model.text.max_len)
        work = jobs(seeds, steps, str(Path(tmp) / "spm.model"), arms)
        if parallel:
            os.environ["TIPSV2_BENCH_THREADS"] = "1"
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                runs = [row for rows in pool.imap_unordered(run_job, work) for row in rows]
        else:
            runs = [row for job in work for row in run_job(job)]
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    log_runs(runs, mlflow_dir, invocation)
    summary = summarise(runs)
    wall_s = time.perf_counter() - wall
    load_end = os.getloadavg()
    header = (f"{len(seeds)} seeds x {steps} steps of batch {cfg.data.batch_size} per run "
              f"({steps * cfg.data.batch_size / cfg.data.synthetic.train_size:.1f} epochs of "
              f"{cfg.data.synthetic.train_size} scenes of {cfg.data.synthetic.image_size} px); evaluated on "
              f"{cfg.data.synthetic.test_size} test scenes. Wall time {wall_s / 60:.1f} min on "
              f"{os.cpu_count()} cores, {'two processes of one thread' if parallel else 'one process'}; "
              f"1-min load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end.")
    payload = {"steps": steps, "seeds": list(seeds), "wall_s": wall_s, "machine": machine(), "parallel": parallel,
               "load_average": {"start": load_start, "end": load_end}, "invocation": invocation,
               "mlflow": {"uri": f"sqlite:///{mlflow_dir / 'mlflow.db'}", "experiment": EXPERIMENT},
               "rules": [dataclasses.asdict(r) for r in RULES], **summary,
               "runs": [{k: v for k, v in r.items() if k not in ("config", "history")} for r in runs]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    text = markdown(summary, header=header)
    (out / "learning.md").write_text(text)
    print("\n" + text)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=learning().steps, help="training steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--mlflow-dir", type=Path, default=RESULTS / "learning_mlruns")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where learning.json and learning.md go")
    parser.add_argument("--serial", action="store_true", help="one process, whatever the load")
    parser.add_argument("--parallel", action="store_true", help="two processes, whatever the load")
    parser.add_argument("--arms", nargs="+", choices=[a.value for a in Arm], default=[a.value for a in Arm],
                        help="run these arms only (a distilled arm brings its ibot_pp teacher)")
    parser.add_argument("--rebuild", action="store_true", help="the table of the latest invocation, from MLflow")
    parser.add_argument("--invocation", help="with --rebuild: which invocation (default: the latest)")
    args = parser.parse_args(argv)
    if args.rebuild:
        runs, invocation = rebuild(args.mlflow_dir, args.invocation)
        print(markdown(summarise(runs), header=f"invocation {invocation}: {len(runs)} runs, from MLflow"))
        return
    run(steps=args.steps, seeds=args.seeds, mlflow_dir=args.mlflow_dir, out=args.out,
        parallel=False if args.serial else True if args.parallel else None, arms=[Arm(a) for a in args.arms])


if __name__ == "__main__":
    main()

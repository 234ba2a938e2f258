"""Does the recipe learn patch-text alignment? A miniature, and the paper's claims tested on it.

    .venv/bin/python -m bench.learning                       # colour scenes, 8 seeds, about 20 min on 2 idle cores
    .venv/bin/python -m bench.learning --seeds $(seq 2000 2015) --parallel   # the deciding run: 39 min
    .venv/bin/python -m bench.learning --family shape        # shape scenes (the `learning_shape` preset)
    .venv/bin/python -m bench.learning --family outline      # shape classes, texts that name them alone
    .venv/bin/python -m bench.learning --seeds 0 1 --steps 60    # a quick look (about 3 min)
    .venv/bin/python -m bench.learning --arms ibot_large distilled_ibot_large   # the larger-teacher pair
    .venv/bin/python -m bench.learning --rebuild             # the table again, from the MLflow experiment alone

Three scene families (`--family`), each its own preset in tipsv2.configs, trained in one process per run and
measured on held-out test scenes with nothing trained on top:
- colour (`learning`, the default and the easy case): 112 px scenes whose class is an object's colour,
  which every patch of the object shows; captions and noisy alt-text name colours and shapes;
- shape (`learning_shape`): the same scenes labelled by the object's outline, which no single patch's
  colour shows (it needs the whole object, as real segmentation classes do); captions name the shapes.
  Nothing else differs: no setting explored on tuning seeds 1000-1009 reached 2x chance (steps to 1200,
  one object, one colour, crops, lr, masking, loss weights, a wider model: the tokens learn outlines, the
  zero-shot readout stays at chance; bench/results/learning_shape_exploration.md). The hard case: even
  trained on the patch labels themselves, the tower needs 2000-3000 steps to reach 2x chance there
  (bench/ceiling.py), 20 on colour;
- outline (`learning_outline`): shape labels on scenes of one red object (no patch's colour tells its class)
  whose captions and alt-text name the shape alone ("a star"), so that only the outline tells the images
  apart; 1000 steps. The best setting tuning found for a context class: its patches leave chance (0.47 and
  0.32 on tuning seeds 1000-1001, chance 0.256), not yet 2x on both (learning_shape_exploration.md).

Metrics:
- primary: foreground patch zero-shot accuracy (tipsv2.eval.patch_text): each foreground patch's
  value-attention token against one prompt embedding per class; chance (the most frequent class's share)
  beside it, and for colour an oracle (the nearest palette colour to the patch's median pixel);
- per-class AUROC of the patch-text cosine; controls: image->text retrieval R@1 (CLS2, three captions per
  scene) and a linear probe on frozen patch tokens (segmentation mIoU, classes + background).

Arms (one seed fixes the init, the data order, the crops and the masks of every arm: the runs are paired):

| arm                  | recipe                                                                        |
|----------------------|-------------------------------------------------------------------------------|
| ibot_pp              | TIPSv2: iBOT++, head-only EMA                                                 |
| ibot                 | iBOT (masked tokens only), head-only EMA                                      |
| full_ema             | iBOT++, full EMA (TIPS / DINO teacher)                                        |
| distilled_ibot       | random-init, unmasked student of the ibot model of its seed (the paper's study) |
| distilled            | the same student taught by the ibot_pp model instead (a separate question)    |
| ibot_large           | ibot with a larger model (`larger`: 4/3 the width, 1.5x the depth); --arms    |
| distilled_ibot_large | a student of the preset's size taught by ibot_large; --arms                   |
| shuffled             | negative control: ibot_pp on captions and alt-texts shuffled across images   |
| no_patch             | negative control: ibot_pp with no patch loss (weight 0): the golden test's mutation |

Students use the family's `distill` preset (tipsv2.configs.distill_preset): the preset's size, random
init, no masking, the teacher's EMA heads reused frozen.

The decision rules (RULES below) were written before the runs that decide (seeds 2000-2015, never used while
tuning; the plan, committed first: bench/results/learning_plan.md) and are not to be tuned after:
d_i is the paired per-seed difference of the primary metric; CI is the t-interval of its mean over seeds.
Each run is an MLflow run (sqlite under bench/results/learning_mlruns, experiment `tipsv2-learning`,
one `learning.invocation` tag per call, `learning.family` per run); `--rebuild` recomputes the table from
MLflow. Arms run in two processes of one thread each when the 1-minute load average is under 1.0 at the
start, else in one. Writes bench/results/<preset>.json and <preset>.md (learning.md, learning_shape.md).
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
from tipsv2.configs import PretrainConfig, distill_preset, preset
from tipsv2.data import synthetic
from tipsv2.distill import StudentText
from tipsv2.distill_loop import distill_local
from tipsv2.eval import probes, retrieval
from tipsv2.eval.features import embed_texts, extract_features, model_image_encoder, model_text_encoder
from tipsv2.eval.patch_text import colour_oracle, patch_text_alignment
from tipsv2.loop import LocalResult, Record, fit_tokenizer, synthetic_records, train_local
from tipsv2.losses.ibot import PatchLossKind
from tipsv2.models.config import ModelConfig
from tipsv2.task import TeacherMode
from tipsv2.tokenizer import Tokenizer

EXPERIMENT = "tipsv2-learning"
DEFAULT_SEEDS = tuple(range(8))
CONTROL_SEEDS = 2           # the negative control runs on the first seeds only (its verdict needs no pairing)
PRIMARY = "patch/accuracy"


class Family(str, enum.Enum):
    """What the scenes' classes are: COLOUR (any patch shows it: the easy case) or SHAPE (the outline, which
    needs the context of the whole object, as real segmentation classes do); OUTLINE: shape classes on scenes
    of one red object whose texts name the shape alone, so that only the outline tells images apart."""
    COLOUR = "colour"
    SHAPE = "shape"
    OUTLINE = "outline"


# tipsv2.configs; also the results' name
PRESET = {Family.COLOUR: "learning", Family.SHAPE: "learning_shape", Family.OUTLINE: "learning_outline"}


class Arm(str, enum.Enum):
    IBOT_PP = "ibot_pp"
    IBOT = "ibot"
    FULL_EMA = "full_ema"
    DISTILLED = "distilled"
    DISTILLED_IBOT = "distilled_ibot"
    IBOT_LARGE = "ibot_large"
    DISTILLED_IBOT_LARGE = "distilled_ibot_large"
    SHUFFLED = "shuffled"
    NO_PATCH = "no_patch"


LABELS = {Arm.IBOT_PP: "iBOT++, head-only EMA (TIPSv2)", Arm.IBOT: "iBOT, head-only EMA",
          Arm.FULL_EMA: "iBOT++, full EMA", Arm.DISTILLED: "student of the iBOT++ arm (random init, unmasked)",
          Arm.DISTILLED_IBOT: "student of the iBOT arm (random init, unmasked)",
          Arm.IBOT_LARGE: "iBOT, head-only EMA, larger model (a teacher)",
          Arm.DISTILLED_IBOT_LARGE: "student of the larger iBOT arm (preset size, random init, unmasked)",
          Arm.SHUFFLED: "negative control: shuffled captions",
          Arm.NO_PATCH: "negative control: no patch loss (iBOT++ weight 0)"}
TEACHER = {Arm.DISTILLED: Arm.IBOT_PP, Arm.DISTILLED_IBOT: Arm.IBOT, Arm.DISTILLED_IBOT_LARGE: Arm.IBOT_LARGE}
# The larger-teacher pair trains a model about 2.7x the preset's vision tower; asked for with --arms.
DEFAULT_ARMS = tuple(a for a in Arm if a not in (Arm.IBOT_LARGE, Arm.DISTILLED_IBOT_LARGE))


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
    # Non-inferiority, not equivalence (revised before the deciding runs on seeds 2000-2015): "loses nothing" is
    # a one-sided claim, and an equivalence test at margin 0.05 needs about 40 seeds at the measured sd of d
    # (0.096 on seeds 0-7) to decide even when d is 0 (bench/results/learning_plan.md).
    Rule("head-only EMA loses nothing against full EMA, with fewer parameters", "TIPSv2 paper sec. 3 "
         "(head-only EMA)", Arm.FULL_EMA, Arm.IBOT_PP, "noninferior", 0.05,
         "reproduced if the 90 % CI of mean d (a one-sided test at 5 %) lies above -0.05 (a loss of 5 points or "
         "more is ruled out); not reproduced if it lies wholly below -0.05; inconclusive otherwise. Parameters: "
         "tipsv2.info counts"),
    # The paper's distillation study (as reported in readings of its Tables 1-2; unverified against the paper):
    # the teacher was trained with masked-only iBOT (TIPS v1), the student is random-init and sees every patch.
    Rule("a random-init, unmasked student of a masked-only iBOT teacher exceeds that teacher's patch-text "
         "alignment (same size)", "TIPSv2 paper sec. 1-2 (distillation study, Tables 1-2)", Arm.IBOT,
         Arm.DISTILLED_IBOT, "improves", 0.02,
         "as for iBOT++: reproduced if the 95 % CI lies above 0; not reproduced if below +0.02"),
    Rule("the same, with a teacher larger than its student", "TIPSv2 paper sec. 1-2 (g/14 teacher, L/14 "
         "student)", Arm.IBOT_LARGE, Arm.DISTILLED_IBOT_LARGE, "improves", 0.02,
         "as for iBOT++: reproduced if the 95 % CI lies above 0; not reproduced if below +0.02"),
    Rule("the golden test's mutation: iBOT++ aligns the patches better than no patch loss at all (contrastive "
         "and DINO on the CLS tokens only)", "ours (what the golden test must detect)", Arm.NO_PATCH, Arm.IBOT_PP,
         "improves", 0.02, "as for iBOT++: reproduced if the 95 % CI lies above 0; not reproduced if below +0.02"),
    Rule("separate question, not the paper's setting: a student of an iBOT++ teacher exceeds that teacher",
         "ours (the teacher already trains every patch token)", Arm.IBOT_PP, Arm.DISTILLED, "improves", 0.02,
         "as for iBOT++: reproduced if the 95 % CI lies above 0; not reproduced if below +0.02"),
)
# The golden test and the negative control: learned >= 2 x chance; control <= chance + 3 noise, noise the
# binomial standard error of an accuracy at chance over the test set's objects (patches of one object share
# its colour, so objects, not patches, are the independent draws). 2x, not the earlier 3x: 3x was cleared by 4
# of seeds 0-7, 2x by 8 of 8 (the lowest 2.19x); no patch loss reached 1.83x on seed 0, the test's seed. Its
# rate on fresh seeds is in bench/results/learning.md (the plan: bench/results/learning_plan.md).
GOLDEN_FACTOR = 2.0
CONTROL_NOISE = 3.0


# ---------------------------------------------------------------- one run


def larger(model: ModelConfig) -> ModelConfig:
    """The teacher larger than its student: 4/3 the width and 1.5x the depth of the vision tower (about 2.7x
    its parameters); the text tower follows the width, which TIPS compares without projection."""
    width = model.vision.width * 4 // 3
    heads = width // (model.vision.width // model.vision.heads)
    vision = dataclasses.replace(model.vision, width=width, heads=heads, mlp_dim=4 * width,
                                 depth=model.vision.depth * 3 // 2)
    text = dataclasses.replace(model.text, width=width, heads=heads, mlp_dim=4 * width)
    return dataclasses.replace(model, vision=vision, text=text)


def pretrain_config(arm: Arm, *, family: Family, steps: int, seed: int) -> PretrainConfig:
    cfg = dataclasses.replace(preset(PRESET[family]), steps=steps, seed=seed)
    task = cfg.task
    if arm in (Arm.IBOT, Arm.IBOT_LARGE):
        task = dataclasses.replace(task, patch=dataclasses.replace(task.patch, kind=PatchLossKind.IBOT))
    if arm == Arm.IBOT_LARGE:
        task = dataclasses.replace(task, model=larger(task.model))
    elif arm == Arm.NO_PATCH:   # contrastive and DINO only: nothing supervises a patch token
        task = dataclasses.replace(task, patch=dataclasses.replace(task.patch, weight=0.0))
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
    out |= {"patch/chance_noise": math.sqrt(p * (1 - p) / objects), "num_objects": float(objects)}
    if scenes_cfg.label == synthetic.Label.COLOUR:   # what one patch's pixels allow; a shape has no such rule
        out["patch/oracle"] = colour_oracle([synthetic.RGB[c] for c in scenes_cfg.colours], items)
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
    def masks(scenes):   # (N, H, W) labels: 0 background, i + 1 the class i
        return torch.from_numpy(np.stack([s.mask for s in scenes]).astype(np.int64))

    probe = probes.linear_segmentation(train_f.patches, masks(train), test_f.patches, masks(test),
                                       len(synthetic.class_names(scenes_cfg)) + 1,
                                       probes.LinearSegmentationConfig(epochs=10))
    return out | {f"linear_probe/{k}": v for k, v in probe.items()}


def train_arm(arm: Arm, *, seed: int, steps: int, records: Sequence[Record], tokenizer: Tokenizer,
              teacher: Any = None, family: Family = Family.COLOUR, student_text: StudentText = StudentText.RANDOM
              ) -> tuple[LocalResult, torch.nn.Module, Any]:
    """(result, the model to evaluate, its config) of one arm; `teacher` is the task of TEACHER[arm] for a
    student arm (the preset's size, random init, unmasked, the teacher's EMA heads reused; its text tower as
    `student_text` says, the paper's Table 2 ablation)."""
    if arm in TEACHER:
        cfg = distill_preset(PRESET[family])
        cfg = dataclasses.replace(cfg, steps=steps, seed=seed,
                                  task=dataclasses.replace(cfg.task, student_text=student_text))
        result = distill_local(cfg, teacher=teacher.model, records=records, tokenizer=tokenizer,
                               teacher_heads=(teacher.teacher_dino_head, teacher.teacher_patch_head))
        return result, result.task.student, cfg
    cfg = pretrain_config(Arm.IBOT_PP if arm == Arm.SHUFFLED else arm, family=family, steps=steps, seed=seed)
    texts = shuffled(records, seed) if arm == Arm.SHUFFLED else records
    result = train_local(cfg, records=texts, tokenizer=tokenizer)
    return result, result.task.model, cfg


@dataclasses.dataclass(frozen=True)
class Job:
    """Arms of one seed run in order in one process (a teacher before its students)."""
    family: Family
    seed: int
    arms: tuple[Arm, ...]
    steps: int
    tokenizer: str                       # path of the sentencepiece model every arm shares
    student_text: StudentText = StudentText.RANDOM
    probe: bool = True                   # also fit the linear segmentation probe (evaluate's `probe`)


def run_job(job: Job) -> list[dict[str, Any]]:
    cfg = preset(PRESET[job.family])
    records = synthetic_records(cfg.data.synthetic)
    tokenizer = Tokenizer(job.tokenizer, max_len=cfg.task.model.text.max_len)
    rows, trained = [], {}
    for arm in job.arms:
        start = time.perf_counter()
        result, model, arm_cfg = train_arm(arm, family=job.family, seed=job.seed, steps=job.steps, records=records,
                                           tokenizer=tokenizer, teacher=trained.get(TEACHER.get(arm)),
                                           student_text=job.student_text)
        train_s = time.perf_counter() - start
        if arm in TEACHER.values():
            trained[arm] = result.task
        metrics = evaluate(model, tokenizer, cfg, probe=job.probe)
        seed = job.seed
        rows.append({"arm": arm.value, "family": job.family.value, "seed": seed, "train_s": train_s,
                     "eval_s": time.perf_counter() - start - train_s,
                     "metrics": metrics, "config": config_tree.to_dict(arm_cfg),
                     "history": [{k: v for k, v in r.items() if k.startswith(("loss/", "step"))}
                                 for r in result.history[::10]]})
        print(f"  {arm.value:9s} seed {seed}: train {train_s:5.1f} s, patch acc {metrics[PRIMARY]:.3f} "
              f"(chance {metrics['patch/chance']:.3f}), AUROC {metrics['patch/auroc']:.3f}"
              + (f", R@1 {metrics['retrieval/i2t_r1']:.3f}" if job.probe else ""), flush=True)
    return rows


def run_jobs(work: Sequence[Job], *, parallel: bool) -> list[dict[str, Any]]:
    """Every job's rows: with `parallel`, two spawned processes of one thread each take the jobs as they free up;
    otherwise this process runs them in order."""
    if not parallel:
        return [row for job in work for row in run_job(job)]
    with multiprocessing.get_context("spawn").Pool(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return [row for rows in pool.imap_unordered(run_job, work) for row in rows]


def jobs(family: Family, seeds: Sequence[int], steps: int, tokenizer_path: str,
         arms: Sequence[Arm] = DEFAULT_ARMS, student_text: StudentText = StudentText.RANDOM) -> list[Job]:
    """Per seed, one process each: a teacher arm then the students it teaches (ibot_pp, ibot, ibot_large),
    full_ema; the control on the first CONTROL_SEEDS seeds. `arms` keeps a subset (a student brings its
    teacher)."""
    out = []
    for i, seed in enumerate(seeds):
        taught = [(t, *(s for s in TEACHER if TEACHER[s] == t and s in arms)) for t in dict.fromkeys(TEACHER.values())]
        groups = [g for g in taught if g[0] in arms or len(g) > 1]
        groups += [(a,) for a in (Arm.FULL_EMA, Arm.NO_PATCH) if a in arms]
        groups += [(Arm.SHUFFLED,)] * (i < CONTROL_SEEDS and Arm.SHUFFLED in arms)
        out += [Job(family, seed, group, steps, tokenizer_path, student_text) for group in groups]
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
    elif rule.kind == "noninferior":
        low, high = t_interval(diffs, 0.90)
        agree = sum(d > -rule.margin for d in diffs)
        result = "reproduced" if low > -rule.margin else "not reproduced" if high < -rule.margin else "inconclusive"
    else:
        low, high = t_interval(diffs, 0.90)
        agree = sum(abs(d) < rule.margin for d in diffs)
        inside = -rule.margin < low and high < rule.margin
        outside = high < -rule.margin or low > rule.margin
        result = "reproduced" if inside else "not reproduced" if outside else "inconclusive"
    return {"verdict": result, "mean": mean, "ci": [low, high], "seeds_agreeing": agree, "seeds": len(diffs),
            "diffs": list(diffs)}


def detectable(rule: Rule, sd: float, n: int, power: float = 0.8) -> float:
    """The true mean d that `rule` decides in its favour with probability `power`, at n paired seeds whose d has
    sample sd `sd` (t approximation): improves, the d whose 95 % CI clears 0; non-inferior, the d whose 90 % CI
    clears -margin; equivalent, the half-width of the 90 % CI (a d of 0 is decided only if it is < margin)."""
    from scipy import stats

    se = sd / math.sqrt(n)
    beta = stats.t.ppf(power, n - 1)
    if rule.kind == "improves":
        return (stats.t.ppf(0.975, n - 1) + beta) * se
    if rule.kind == "noninferior":
        return -rule.margin + (stats.t.ppf(0.95, n - 1) + beta) * se
    return stats.t.ppf(0.95, n - 1) * se


def golden(by: dict[tuple[str, int], dict[str, float]]) -> dict[str, Any]:
    """Per arm, how many seeds clear the golden bar (GOLDEN_FACTOR x chance)."""
    out = {}
    for arm in (Arm.IBOT_PP, Arm.NO_PATCH, Arm.SHUFFLED):
        values = [m[PRIMARY] / m["patch/chance"] for (a, _), m in by.items() if a == arm.value]
        if values:
            out[arm.value] = {"cleared": sum(v >= GOLDEN_FACTOR for v in values), "seeds": len(values),
                              "ratios": values}
    return {"factor": GOLDEN_FACTOR, "arms": out}


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
        power = ({"sd": statistics.stdev(diffs), "detectable": detectable(rule, statistics.stdev(diffs), len(diffs))}
                 if len(diffs) > 2 else {})
        comparisons.append({"claim": rule.claim, "source": rule.source, "rule": rule.text,
                            "baseline": rule.baseline.value, "compared": rule.compared.value,
                            **verdict(rule, diffs), **power, "auroc_diff": spread(auroc) if auroc else None})
    any_run = next(iter(by.values()))
    reference = {k: any_run[k] for k in ("patch/chance", "patch/chance/uniform", "patch/oracle", "patch/chance_noise")
                 if k in any_run}
    control = [by[k][PRIMARY] for k in by if k[0] == Arm.SHUFFLED.value]
    limit = reference["patch/chance"] + CONTROL_NOISE * reference["patch/chance_noise"]
    nulls = [by[k]["patch/null/p95"] for k in by if k[0] == Arm.SHUFFLED.value and "patch/null/p95" in by[k]]
    negative = {"values": control, "limit": limit, "within_noise": bool(control) and max(control) <= limit,
                "null_p95": nulls}
    return {"arms": arms, "comparisons": comparisons, "reference": reference, "negative_control": negative,
            "golden": golden(by)}


# The paper's Table 2 ablation (as reported in readings of it; unverified against the paper): starting the
# student's text tower from the teacher's, trained or frozen, makes "little difference". Equivalence at the
# margin the bench uses for "no difference" (0.05); plan: bench/results/learning_student_text_plan.md.
TEXT_START = {StudentText.FROM_TEACHER: "started from the teacher's and trained",
              StudentText.FROZEN_TEACHER: "the teacher's, frozen"}


def text_tower_rule(start: StudentText) -> Rule:
    return Rule(f"the student's text tower {TEXT_START[start]} instead of random makes little difference to its "
                "patch-text alignment", "TIPSv2 paper Table 2 (as reported in readings of it)",
                Arm.DISTILLED_IBOT, Arm.DISTILLED_IBOT, "equivalent", 0.05,
                "reproduced if the 90 % CI of mean d lies inside (-0.05, +0.05); not reproduced if it lies wholly "
                "outside; inconclusive otherwise")


def by_seed(payload: dict[str, Any], arm: Arm) -> dict[int, dict[str, float]]:
    return {r["seed"]: r["metrics"] for r in payload["runs"] if r["arm"] == arm.value}


def text_tower_comparison(baseline: dict[str, Any], variants: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each variant payload's students (bench.learning's JSON, `student_text` not random) against `baseline`'s
    random-text students, paired by seed. A seed counts only if its teacher is the same in both runs (equal
    patch accuracy to 1e-9: same code and seed retrain it bit for bit); the others are listed, not used."""
    teachers, students = by_seed(baseline, TEACHER[Arm.DISTILLED_IBOT]), by_seed(baseline, Arm.DISTILLED_IBOT)
    out = []
    for variant in variants:
        start = StudentText(variant["student_text"])
        rule = text_tower_rule(start)
        mine, my_teachers = by_seed(variant, Arm.DISTILLED_IBOT), by_seed(variant, TEACHER[Arm.DISTILLED_IBOT])
        paired = sorted(s for s in mine if s in students)
        same = [s for s in paired if abs(my_teachers[s][PRIMARY] - teachers[s][PRIMARY]) < 1e-9]
        diffs = [mine[s][PRIMARY] - students[s][PRIMARY] for s in same]
        r1 = [mine[s]["retrieval/i2t_r1"] - students[s]["retrieval/i2t_r1"] for s in same]
        power = ({"sd": statistics.stdev(diffs), "detectable": detectable(rule, statistics.stdev(diffs), len(diffs))}
                 if len(diffs) > 2 else {})
        out.append({"start": start.value, "claim": rule.claim, "source": rule.source, "rule": rule.text,
                    "teacher_differs": [s for s in paired if s not in same],
                    "student": spread([mine[s][PRIMARY] for s in same]) if same else None,
                    "random_student": spread([students[s][PRIMARY] for s in same]) if same else None,
                    **verdict(rule, diffs), **power, "r1_diff": spread(r1) if r1 else None})
    return out


def text_tower_markdown(rows: Sequence[dict[str, Any]], *, header: str) -> str:
    lines = [header, "", "| student's text tower | seeds | student patch accuracy | random-text student | d | "
             "90 % CI | seeds with abs(d) < 0.05 | sd of d | CI half-width at d = 0 | d R@1 image->text | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "mean" not in r:
            lines.append(f"| {TEXT_START[StudentText(r['start'])]} | 0 | - | - | - | - | - | - | - | - | "
                         f"{r['verdict']} ({r['reason']}) |")
            continue
        power = f"{r['sd']:.3f} | {r['detectable']:.3f}" if "sd" in r else "- | -"
        lines.append(f"| {TEXT_START[StudentText(r['start'])]} | {r['seeds']} | {r['student']['mean']:.3f} ± "
                     f"{r['student']['std']:.3f} | {r['random_student']['mean']:.3f} ± {r['random_student']['std']:.3f}"
                     f" | {r['mean']:+.3f} | [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | {r['seeds_agreeing']}/{r['seeds']}"
                     f" | {power} | {r['r1_diff']['mean']:+.3f} | **{r['verdict']}** |")
    differs = {r["start"]: r["teacher_differs"] for r in rows if r["teacher_differs"]}
    lines += ["", "d = student with this text tower − student with a random one (foreground patch zero-shot accuracy), "
              "paired by seed: same teacher, same image-tower init, data order, crops. Rule, fixed before the runs: "
              + (rows[0]["rule"] if rows else "") + ". \"CI half-width at d = 0\": the 90 % CI's half-width at this "
              "sd; equivalence can be shown only if it is below 0.05.",
              "", "Seeds whose teacher was not retrained bit for bit (left out): "
              + (", ".join(f"{k}: {v}" for k, v in differs.items()) if differs else "none") + "."]
    return "\n".join(lines) + "\n"


def markdown(summary: dict[str, Any], *, header: str) -> str:
    ref = summary["reference"]
    oracle = (f"oracle {ref['patch/oracle']:.3f} (nearest palette colour to a patch's median pixel), "
              if "patch/oracle" in ref else "")
    lines = [header, "",
             f"Primary metric: foreground patch zero-shot accuracy. Chance {ref['patch/chance']:.3f} (the most "
             f"frequent class's share of foreground patches; uniform {ref['patch/chance/uniform']:.3f}), "
             f"{oracle}noise at chance {ref['patch/chance_noise']:.3f} (binomial standard error over the test "
             "objects).", "",
             "| arm | seeds | patch accuracy | patch AUROC | R@1 image->text | linear-probe mIoU |",
             "|---|---|---|---|---|---|"]
    for arm, row in summary["arms"].items():
        cells = " | ".join(f"{row[c]['mean']:.3f} ± {row[c]['std']:.3f}"
                           for c in (PRIMARY, "patch/auroc", "retrieval/i2t_r1", "linear_probe/miou"))
        lines.append(f"| {LABELS[Arm(arm)]} | {len(row['seeds'])} | {cells} |")
    lines += ["", "Mean ± sample std over seeds.", "", "## The paper's claims", "",
              "| claim | source | d = compared − baseline (patch accuracy) | CI | seeds agreeing | sd of d | "
              "decided at 80 % power from | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        if "mean" not in c:
            lines.append(f"| {c['claim']} | {c['source']} | - | - | - | - | - | {c['verdict']} ({c['reason']}) |")
            continue
        level = "95 %" if "95 %" in c["rule"].split(";")[0] else "90 %"
        power = (f"{c['sd']:.3f} | d ≥ {c['detectable']:+.3f}" if "sd" in c else "- | -")
        lines.append(f"| {c['claim']} | {c['source']} | {c['mean']:+.3f} | {level} [{c['ci'][0]:+.3f}, "
                     f"{c['ci'][1]:+.3f}] | {c['seeds_agreeing']}/{c['seeds']} | {power} | **{c['verdict']}** |")
    lines += ["", "\"Decided at 80 % power from\": the true mean d that this many seeds, at this run's sd of d, decide "
                  "in the claim's favour 4 times in 5 (t approximation; bench.learning.detectable).", "",
              "Decision rules, fixed before the runs:", ""]
    lines += [f"- {c['claim']}: {c['rule']}." for c in summary["comparisons"]]
    gold = summary["golden"]
    if gold["arms"]:
        lines += ["", f"Golden bar (tests/test_learning.py: patch accuracy >= {gold['factor']:g} x chance): "
                      + "; ".join(f"{LABELS[Arm(a)]} {g['cleared']}/{g['seeds']} seeds"
                                  for a, g in gold["arms"].items()) + "."]
    neg = summary["negative_control"]
    if neg["values"]:
        lines += ["", f"Negative control (captions shuffled across images): patch accuracy "
                      f"{', '.join(f'{v:.3f}' for v in neg['values'])}; limit chance + {CONTROL_NOISE:g} noise = "
                      f"{neg['limit']:.3f}: {'within' if neg['within_noise'] else 'NOT within'} chance's noise."]
        if neg["null_p95"]:
            lines += ["", "95th percentile of each control run's permutation null (its own predictions, class "
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
        sink.set_tags({"learning.invocation": invocation, "learning.arm": row["arm"], "learning.seed": str(row["seed"]),
                       "learning.family": row["family"]})
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


def run(*, family: Family, steps: int, seeds: Sequence[int], mlflow_dir: Path, out: Path,
        parallel: bool | None = None, arms: Sequence[Arm] = DEFAULT_ARMS,
        student_text: StudentText = StudentText.RANDOM) -> dict[str, Any]:
    wall = time.perf_counter()
    load_start = os.getloadavg()
    parallel = load_start[0] < 1.0 if parallel is None else parallel
    invocation = time.strftime("%Y%m%d-%H%M%S")
    cfg = preset(PRESET[family])
    print(f"{family.value} scenes: {len(seeds)} seeds x {steps} steps of batch {cfg.data.batch_size}; "
          f"{'2 processes x 1 thread' if parallel else '1 process'}; load average {load_start[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # One tokenizer for every arm (trained on the unshuffled texts: the control shuffles pairs, not words).
        fit_tokenizer(synthetic_records(cfg.data.synthetic), cfg.data.tokenizer_vocab, Path(tmp) / "spm.model",
                      max_len=cfg.task.model.text.max_len)
        runs = run_jobs(jobs(family, seeds, steps, str(Path(tmp) / "spm.model"), arms, student_text),
                        parallel=parallel)
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    log_runs(runs, mlflow_dir, invocation)
    summary = summarise(runs)
    wall_s = time.perf_counter() - wall
    load_end = os.getloadavg()
    header = (f"Scenes labelled by {family.value} (preset `{PRESET[family]}`); students' text tower: "
              f"{student_text.value}. "
              f"{len(seeds)} seeds x {steps} steps of batch {cfg.data.batch_size} per run "
              f"({steps * cfg.data.batch_size / cfg.data.synthetic.train_size:.1f} epochs of "
              f"{cfg.data.synthetic.train_size} scenes of {cfg.data.synthetic.image_size} px); evaluated on "
              f"{cfg.data.synthetic.test_size} test scenes. Wall time {wall_s / 60:.1f} min on "
              f"{os.cpu_count()} cores, {'two processes of one thread' if parallel else 'one process'}; "
              f"1-min load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end.")
    payload = {"family": family.value, "student_text": student_text.value, "steps": steps, "seeds": list(seeds),
               "wall_s": wall_s, "machine": machine(), "parallel": parallel,
               "load_average": {"start": load_start, "end": load_end}, "invocation": invocation,
               "mlflow": {"uri": f"sqlite:///{mlflow_dir / 'mlflow.db'}", "experiment": EXPERIMENT},
               "rules": [dataclasses.asdict(r) for r in RULES], **summary,
               "runs": [{k: v for k, v in r.items() if k not in ("config", "history")} for r in runs]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{PRESET[family]}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    text = markdown(summary, header=header)
    (out / f"{PRESET[family]}.md").write_text(text)
    print("\n" + text)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=[f.value for f in Family], default=Family.COLOUR.value,
                        help="what the scenes' classes are: colour (the easy case), shape (needs context) or "
                             "outline (shape classes, texts that name the shape alone)")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the family's preset's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--mlflow-dir", type=Path, default=RESULTS / "learning_mlruns")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="where <preset>.json and <preset>.md go (learning.md, learning_shape.md)")
    parser.add_argument("--serial", action="store_true", help="one process, whatever the load")
    parser.add_argument("--parallel", action="store_true", help="two processes, whatever the load")
    parser.add_argument("--arms", nargs="+", choices=[a.value for a in Arm], default=[a.value for a in DEFAULT_ARMS],
                        help="run these arms only (a student arm brings its teacher); default: all but the "
                             "larger-teacher pair ibot_large, distilled_ibot_large")
    parser.add_argument("--student-text", choices=[t.value for t in StudentText], default=StudentText.RANDOM.value,
                        help="the students' text tower: random (default), from_teacher (trained) or frozen_teacher "
                             "(the paper's Table 2 ablation; the teacher's text config must be the student's)")
    parser.add_argument("--compare-text", type=Path, nargs="+", metavar="JSON",
                        help="the text-tower table (the paper's Table 2 ablation): the first JSON's random-text "
                             "students against each later JSON's (runs of --student-text), paired by seed; "
                             "written to OUT/learning_student_text.md")
    parser.add_argument("--rebuild", action="store_true", help="the table of the latest invocation, from MLflow")
    parser.add_argument("--invocation", help="with --rebuild: which invocation (default: the latest)")
    args = parser.parse_args(argv)
    if args.compare_text:
        baseline, *variants = (json.loads(p.read_text()) for p in args.compare_text)
        rows = text_tower_comparison(baseline, variants)
        text = text_tower_markdown(rows, header=f"The student's text tower, {baseline['family']} scenes, "
                                   f"{baseline['steps']} steps: {', '.join(str(p) for p in args.compare_text)}.")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "learning_student_text.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "learning_student_text.md").write_text(text)
        print(text)
        return
    if args.rebuild:
        runs, invocation = rebuild(args.mlflow_dir, args.invocation)
        print(markdown(summarise(runs), header=f"invocation {invocation}: {len(runs)} runs, from MLflow"))
        return
    family = Family(args.family)
    run(family=family, steps=args.steps or preset(PRESET[family]).steps, seeds=args.seeds, mlflow_dir=args.mlflow_dir,
        out=args.out,
        parallel=False if args.serial else True if args.parallel else None, arms=[Arm(a) for a in args.arms],
        student_text=StudentText(args.student_text))


if __name__ == "__main__":
    main()

"""The demo report's words and numbers: each metric beside its baseline on the same scenes and beside the
same architecture at random init, the claim a score above the baseline would support, and where each
score stands in words ("above chance", "at chance", "below chance").

    table = evaluation_table(evaluation)     # evaluation: model -> the synthetic suite's metrics
    lines = findings(evaluation)             # one sentence per metric, teacher, student, random init

Baselines come from the suite (`baseline/<metric>`, tipsv2.eval.baselines: counted on the evaluated scenes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tipsv2.data.synthetic import Label, SyntheticConfig, class_names
from tipsv2.eval.baselines import Standing, proportion_noise, standing

NOISE_SE = 2.0        # an accuracy within 2 binomial standard errors of its baseline is "at chance"
RELATIVE_BAND = 0.1   # mIoU and RMSE have no binomial error: within 10 % of the baseline is "at chance"
MODELS = {"teacher": "teacher", "student": "student", "random_init": "random init"}   # key -> the report's name


@dataclass(frozen=True, kw_only=True)
class ReportMetric:
    key: str                      # the suite's metric, e.g. "zero_shot_segmentation/miou"
    name: str                     # what the report calls it
    claim: str                    # what a score above its baseline would show
    baseline: str                 # what the baseline is; its value is the suite's `baseline/<baseline_key>`
    baseline_key: str
    draws: str | None = None      # the metric counting the independent draws behind an accuracy (its noise);
                                  # None: RELATIVE_BAND
    higher_is_better: bool = True


REPORT_METRICS = (
    ReportMetric(key="patch_text/accuracy", name="foreground patch zero-shot accuracy",
                 claim="each object patch's token, against one prompt per class, names its class "
                       "(patch-text alignment, what TIPSv2 is for)",
                 baseline="the most frequent class's share of foreground patches", baseline_key="patch_text/accuracy",
                 draws="patch_text/num_objects"),
    ReportMetric(key="zero_shot_segmentation/miou", name="zero-shot segmentation mIoU",
                 claim="each pixel named by its patch's cosine with the class prompts, 'background' one of them",
                 baseline="every pixel background", baseline_key="zero_shot_segmentation/miou"),
    ReportMetric(key="zero_shot_classification/cls1/top1", name="zero-shot classification top-1 (CLS1)",
                 claim="the image embedding names the main object's class (image-text alignment)",
                 baseline="always the most frequent main class", baseline_key="zero_shot_classification/top1",
                 draws="num_test"),
    ReportMetric(key="retrieval/cls2/i2t_r1", name="image->text retrieval R@1 (CLS2)",
                 claim="an image finds one of its own 3 captions among all test captions (the contrastive loss)",
                 baseline="a random ranking: 3 of 3 x images captions", baseline_key="retrieval/i2t_r1",
                 draws="num_test"),
    ReportMetric(key="retrieval/cls2/t2i_r1", name="text->image retrieval R@1 (CLS2)",
                 claim="a caption finds its own image among all test images",
                 baseline="a random ranking: 1 / images", baseline_key="retrieval/t2i_r1", draws="num_test"),
    ReportMetric(key="knn/cls1/top1", name="kNN top-1 (CLS1)",
                 claim="image embeddings group scenes by main class without any text (self-distillation)",
                 baseline="always the training scenes' most frequent main class", baseline_key="knn/top1",
                 draws="num_test"),
    ReportMetric(key="linear_segmentation/miou", name="linear-probe segmentation mIoU",
                 claim="frozen patch tokens hold each pixel's class linearly (a probe is trained on them)",
                 baseline="every pixel background", baseline_key="linear_segmentation/miou"),
    ReportMetric(key="linear_depth/rmse", name="linear-probe depth RMSE (m, lower is better)",
                 claim="frozen patch tokens hold layer depth linearly (a probe is trained on them)",
                 baseline="the training scenes' mean depth everywhere", baseline_key="linear_depth/rmse",
                 higher_is_better=False),
)


def baseline_of(metric: ReportMetric, results: dict[str, float]) -> float:
    key = f"baseline/{metric.baseline_key}"
    if key not in results:
        raise ValueError(f"the evaluation has no {key!r} for {metric.key!r}: rerun the evaluate step with a suite "
                         f"that computes baselines (tipsv2.eval.suites.synthetic_suite)")
    return results[key]


def margin(metric: ReportMetric, results: dict[str, float]) -> float:
    """How far from its baseline a score must be to count as above or below it (module constants say why)."""
    base = baseline_of(metric, results)
    if metric.draws is None:
        return RELATIVE_BAND * abs(base)
    return NOISE_SE * proportion_noise(base, int(results[metric.draws]))


def _standing(metric: ReportMetric, value: float, reference: float, results: dict[str, float]) -> Standing:
    return standing(value, reference, margin=margin(metric, results), higher_is_better=metric.higher_is_better)


def _reported(evaluation: dict[str, dict[str, float]]) -> list[ReportMetric]:
    return [m for m in REPORT_METRICS if all(m.key in r for r in evaluation.values())]


def evaluation_table(evaluation: dict[str, dict[str, float]]) -> str:
    """Rows: metrics; columns: the claim, each model's score with its standing, the baseline and what it is."""
    models = [m for m in MODELS if m in evaluation]
    first = evaluation[models[0]]
    lines = ["| metric | a score above the baseline would show | " + " | ".join(MODELS[m] for m in models)
             + " | baseline | the baseline is |", "|---|---|" + "---|" * len(models) + "---|---|"]
    for metric in _reported(evaluation):
        base = baseline_of(metric, first)
        cells = [f"{evaluation[m][metric.key]:.3f} ({_standing(metric, evaluation[m][metric.key], base, first).value})"
                 for m in models]
        lines.append(f"| {metric.name} | {metric.claim} | " + " | ".join(cells) + f" | {base:.3f} | {metric.baseline} |")
    return "\n".join(lines)


def _against_random_init(metric: ReportMetric, value: float, evaluation: dict[str, dict[str, float]]) -> str:
    if "random_init" not in evaluation:
        return ""
    reference = evaluation["random_init"][metric.key]
    words = {Standing.ABOVE: "above", Standing.AT: "no better than", Standing.BELOW: "below"}
    return f", {words[_standing(metric, value, reference, evaluation['random_init'])]} random init ({reference:.3f})"


def finding(metric: ReportMetric, evaluation: dict[str, dict[str, float]]) -> str:
    """One sentence: each trained model's score, its standing against the baseline and against random init."""
    first = next(iter(evaluation.values()))
    base = baseline_of(metric, first)
    parts = []
    for model, label in MODELS.items():
        if model not in evaluation:
            continue
        value = evaluation[model][metric.key]
        against = "" if model == "random_init" else _against_random_init(metric, value, evaluation)
        parts.append(f"{label} {value:.3f}, {_standing(metric, value, base, first).value}{against}")
    return f"**{metric.name}** (baseline {base:.3f}, {metric.baseline}): " + "; ".join(parts) + "."


def findings(evaluation: dict[str, dict[str, float]]) -> list[str]:
    return [finding(m, evaluation) for m in _reported(evaluation)]


def learned(evaluation: dict[str, dict[str, float]], model: str = "teacher") -> tuple[list[str], list[str]]:
    """(metrics where `model` is above chance and above random init, the others): what training showed."""
    first = next(iter(evaluation.values()))
    shown, not_shown = [], []
    for metric in _reported(evaluation):
        value = evaluation[model][metric.key]
        above = _standing(metric, value, baseline_of(metric, first), first) is Standing.ABOVE
        if "random_init" in evaluation:
            reference = evaluation["random_init"][metric.key]
            above = above and _standing(metric, value, reference, evaluation["random_init"]) is Standing.ABOVE
        (shown if above else not_shown).append(metric.name)
    return shown, not_shown


def scenes_note(scenes: SyntheticConfig, results: dict[str, Any]) -> str:
    """What the evaluated scenes are and what their classes name."""
    names = ", ".join(class_names(scenes))
    what = ("its colour (Label.COLOUR: any patch of an object shows its class)" if scenes.label == Label.COLOUR
            else "its outline shape (Label.SHAPE: one patch does not show its class)")
    return (f"Scenes: synthetic, {scenes.image_size} px; each object's class is {what}; classes: {names}. "
            f"Evaluated on {int(results['num_test'])} held-out test scenes "
            f"({int(results.get('patch_text/num_objects', 0))} objects, "
            f"{int(results.get('patch_text/num_foreground_patches', 0))} foreground patches of 14 px); probes and "
            f"kNN trained on {int(results['num_train'])} training scenes. Every baseline is counted on these "
            f"same scenes (tipsv2.eval.baselines).")


def standing_rule() -> str:
    return (f"'above chance' means better than the baseline (for RMSE: lower); 'at chance': within {NOISE_SE:g} binomial standard errors of the baseline for accuracies (the draws: "
            f"objects for patch accuracy, test scenes otherwise), within {RELATIVE_BAND:.0%} of it for mIoU and "
            f"RMSE; the same rule compares a trained model with random init.")


def summary_lines(evaluation: dict[str, dict[str, float]], scenes: SyntheticConfig,
                  models: Sequence[str] = ("teacher", "student")) -> list[str]:
    """The report's opening: the scenes, then per trained model what it is above chance and random init on."""
    lines = [scenes_note(scenes, next(iter(evaluation.values())))]
    for model in models:
        if model not in evaluation:
            continue
        shown, not_shown = learned(evaluation, model)
        lines.append(f"The {MODELS[model]} is above chance and above random init on: "
                     f"{', '.join(shown) or 'nothing'}; not on: {', '.join(not_shown) or 'nothing'}.")
    lines.append("Random init: the teacher's architecture and tokenizer with the weights pretraining started from, "
                 "evaluated by the same suite. " + standing_rule())
    return lines

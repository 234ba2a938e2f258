"""The demo report: what the scenes' classes are, every metric beside its baseline and beside random init
with the claim it tests (pipelines/report_table.py), foreground patch predictions, zero-shot segmentation
overlays, patch-text heatmaps, loss curves and the MLflow comparison of the two training runs.

    python -m pipelines.report --root outputs/demo       # after pipelines.run_all; writes <root>/report/

Reads the teacher (pretrain), student (distill) and random-init (evaluate/random_init) exports, their
evaluation summaries, the tokenizer and the synthetic validation scenes under the run root, and the loss
histories from MLflow.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipelines import cli, compare, report_table, storage
from pipelines.heatmaps import HeatmapRow, Panel, plot_heatmaps, pyplot
from pipelines.tracking_store import default_uri
from tipsv2 import config_tree
from tipsv2.checkpoint import load_export
from tipsv2.data import synthetic
from tipsv2.data.synthetic import Colour, Label, SyntheticConfig
from tipsv2.eval.features import class_embeddings, model_image_encoder, model_text_encoder
from tipsv2.eval.patch_text import PatchTextConfig, patch_cosines, patch_labels
from tipsv2.eval.zero_shot import PROMPT_TEMPLATES, SegMode, ZeroShotSegmentationConfig, predict_segmentation
from tipsv2.models.model import TIPSModel
from tipsv2.tokenizer import Tokenizer

COLOUR_NAMES = {c.value for c in Colour}
PALETTE = np.array([[40, 40, 40], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.uint8)
MAX_SCENES = 4   # rows of each figure: validation scenes


def class_palette(names: Sequence[str]) -> np.ndarray:
    """(C + 1, 3) uint8: dark grey for background (label 0), then each class's own colour when the class is a
    colour (so that a right prediction looks like the object), else a fixed palette colour."""
    colours = [PALETTE[0]] + [np.array(synthetic.RGB[Colour(n)], np.uint8) if n in COLOUR_NAMES
                              else PALETTE[1 + i % (len(PALETTE) - 1)] for i, n in enumerate(names)]
    return np.stack(colours)


def loss_curves(histories: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Path:
    """histories: run name -> metric -> [(step, value)]; one panel per metric."""
    plt = pyplot()
    metrics = sorted({m for h in histories.values() for m in h})
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4 * max(len(metrics), 1), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, history in histories.items():
            if metric in history:
                steps, values = zip(*history[metric])
                ax.plot(steps, values, label=name)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def picture_grid(rows: Sequence[Sequence[tuple[str, np.ndarray]]], path: Path, *,
                 legend: dict[str, np.ndarray] | None = None) -> Path:
    """rows of (title, (H, W, 3) picture) panels, the titles over the first row; `legend`: name -> uint8 RGB
    of the class colours the pictures use, drawn under the grid."""
    from matplotlib.patches import Patch

    plt = pyplot()
    columns = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.4 * columns, 2.4 * len(rows) + 0.5), squeeze=False)
    for r, row in enumerate(rows):
        for c, (title, picture) in enumerate(row):
            axes[r, c].imshow(picture)
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
        for axis in axes[r]:
            axis.set_axis_off()
    fig.tight_layout(rect=(0, 0.5 / (2.4 * len(rows) + 0.5), 1, 1))
    if legend:
        fig.legend(handles=[Patch(color=rgb / 255, label=name) for name, rgb in legend.items()], loc="lower center",
                   ncol=len(legend), fontsize=7, frameon=False)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def legend_of(class_names: Sequence[str]) -> dict[str, np.ndarray]:
    return dict(zip(["background", *class_names], class_palette(class_names)))


def segmentation_overlays(models: dict[str, TIPSModel], tokenizer, scenes: Sequence[synthetic.SceneRecord],
                          class_names: Sequence[str], path: Path) -> Path:
    """Rows: scenes; columns: image, ground truth, one zero-shot prediction per model (every pixel)."""
    cfg = ZeroShotSegmentationConfig(mode=SegMode.WHOLE, short_side=scenes[0].image.size[0])
    names = ["background", *class_names]
    palette = class_palette(class_names)
    texts = {n: class_embeddings(model_text_encoder(m, tokenizer), names, PROMPT_TEMPLATES) for n, m in models.items()}
    rows = []
    for scene in scenes:
        row = [("image", np.asarray(scene.image)), ("ground truth", palette[scene.mask])]
        for name, model in models.items():
            pred = predict_segmentation(model_image_encoder(model), scene.image, texts[name], scene.mask.shape, cfg)
            row.append((name, palette[pred.numpy()]))
        rows.append(row)
    return picture_grid(rows, path, legend=legend_of(class_names))


def patch_predictions(models: dict[str, TIPSModel], tokenizer, scenes: Sequence[synthetic.SceneRecord],
                      class_names: Sequence[str], path: Path) -> Path:
    """What the patch-text metric scores: each foreground patch (majority of its pixels an object) coloured by
    the class whose prompt its token is nearest; background patches dark. Columns: image, the patches' true
    classes, one prediction per model."""
    cfg = PatchTextConfig()
    palette = class_palette(class_names)
    texts = {n: class_embeddings(model_text_encoder(m, tokenizer), class_names, cfg.templates)
             for n, m in models.items()}
    rows = []
    for scene in scenes:
        truth = patch_labels(scene.mask, cfg.patch_size)                                   # (h * w,)
        grid = scene.mask.shape[0] // cfg.patch_size, scene.mask.shape[1] // cfg.patch_size
        row = [("image", np.asarray(scene.image)), ("patch classes", palette[to_pixels(truth, grid, cfg.patch_size)])]
        for name, model in models.items():
            guess = patch_cosines(model_image_encoder(model), texts[name], scene.image, cfg).argmax(dim=1).numpy() + 1
            row.append((name, palette[to_pixels(np.where(truth > 0, guess, 0), grid, cfg.patch_size)]))
        rows.append(row)
    return picture_grid(rows, path, legend=legend_of(class_names))


def to_pixels(labels: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """(h * w,) row-major patch labels -> (h * patch_size, w * patch_size): each patch's label on its pixels."""
    return np.kron(labels.reshape(grid), np.ones((patch_size, patch_size), np.int64))


def heatmaps(models: dict[str, TIPSModel], tokenizer, scenes: Sequence[synthetic.SceneRecord], label: Label,
             path: Path) -> Path:
    """Per scene, a prompt naming its main object's class; heatmap per model over the image."""
    template = PatchTextConfig().templates[1]                      # "a {} shape": words the captions use
    rows = [HeatmapRow(scene.image, title=prompt, panels=[Panel(name, model, prompt) for name, model in models.items()])
            for scene in scenes for prompt in [template.format(synthetic.main_category(scene, label))]]
    return plot_heatmaps(rows, path, tokenizer=tokenizer)


def write_report(out: Path, *, notes: Sequence[str], sections: dict[str, str]) -> Path:
    """report.md: the opening notes (paragraphs), then each section (title -> markdown) in order."""
    lines = ["# tipsv2 demo report", ""]
    for note in notes:
        lines += [note, ""]
    for title, body in sections.items():
        lines += [f"## {title}", "", body, ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def image(name: str) -> str:
    return f"![{name}]({name})"


def load_models(output: str) -> dict[str, TIPSModel]:
    """Teacher (pretrain), student (distill) and the random-init baseline, in the report's column order."""
    root = Path(output)
    paths = {"teacher": root / "pretrain" / "export", "student": root / "distill" / "export",
             "random_init": root / "evaluate" / "random_init" / "export"}
    return {name: load_export(path)[0].eval() for name, path in paths.items()}


def training_histories(summary: dict[str, dict[str, Any]], client) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Each training run's loss terms from MLflow: run -> metric -> [(step, value)]."""
    return {name: {m: [(x.step, x.value) for x in sorted(client.get_metric_history(s["mlflow_run_id"], m),
                                                            key=lambda x: x.step)]
                   for m in ("loss/total", "loss/contrastive", "loss/dino", "loss/patch")}
            for name, s in summary.items()}


def figures(output: str, out: Path, *, resolved: dict[str, Any], scenes_cfg: SyntheticConfig) -> dict[str, str]:
    """The overlay and heatmap PNGs of the three models on the first validation scenes: title -> file name."""
    meta = storage.read_json(str(Path(output) / "tokenizer" / "step.json"))["result"]
    tokenizer = Tokenizer(meta["tokenizer"], max_len=resolved["pretrain"]["task"]["model"]["text"]["max_len"])
    models = {report_table.MODELS[name]: model for name, model in load_models(output).items()}   # figure titles
    scenes = [s for _, s in zip(range(MAX_SCENES), synthetic.read_split(str(Path(output) / "source" / "synthetic"),
                                                                         "val"))]
    names = synthetic.class_names(scenes_cfg)
    return {
        "Foreground patch predictions (what the patch-text metric scores; colour = predicted class)": patch_predictions(
            models, tokenizer, scenes, names, out / "patch_predictions.png").name,
        "Zero-shot segmentation, every pixel (value attention, 9 templates; 'background' a class)":
            segmentation_overlays(models, tokenizer, scenes, names, out / "zero_shot_segmentation.png").name,
        "Patch-text similarity for a prompt naming each scene's main object": heatmaps(
            models, tokenizer, scenes, scenes_cfg.label, out / "patch_text_heatmaps.png").name,
    }


def build_report(output: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """`<output>/report/`: report.md and its figures, from a finished pipelines.run_all output root; the loss
    histories from `tracking_uri` (the chain's store), else MLFLOW_TRACKING_URI, else the root's sqlite."""
    from mlflow.tracking import MlflowClient   # heavy; only the report needs it

    out = Path(output) / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = {s: storage.read_json(str(Path(output) / s / cli.SUMMARY_FILE)) for s in ("pretrain", "distill")}
    client = MlflowClient(tracking_uri or default_uri(output))
    resolved = storage.read_json(str(Path(output) / cli.CONFIG_FILE))
    scenes_cfg = config_tree.from_dict(SyntheticConfig, resolved["source"]["synthetic"])
    evaluation = {name: storage.read_json(str(Path(output) / "evaluate" / name / "summary.json"))["metrics"]
                  for name in report_table.MODELS}
    images = figures(output, out, resolved=resolved, scenes_cfg=scenes_cfg)
    images["Loss curves (pretrain = teacher, distill = student)"] = loss_curves(
        training_histories(summary, client), out / "loss_curves.png").name
    cmp = compare.run(experiment=resolved["tracking"]["experiment"], output=str(out / "comparison"),
                      run_ids=[s["mlflow_run_id"] for s in summary.values()], param_prefixes=["steps", "task.patch.kind",
                                                                                          "task.teacher.mode", "teacher"],
                      tracking_uri=client.tracking_uri)
    findings = "\n".join(f"- {line}" for line in report_table.findings(evaluation))
    sections = {"Evaluation (held-out test scenes): each model beside the baseline": report_table.evaluation_table(
                    evaluation), "What each number says": findings,
                **{title: image(name) for title, name in images.items()},
                "MLflow comparison of the runs": compare.markdown(cmp["table"])}
    path = write_report(out, notes=report_table.summary_lines(evaluation, scenes_cfg), sections=sections)
    return {"report": str(path), "files": sorted(p.name for p in out.iterdir())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the run_all output root")
    args = parser.parse_args(argv)
    print(json.dumps(build_report(args.root), indent=2))


if __name__ == "__main__":
    main()

"""The demo report: loss curves, zero-shot segmentation overlays, patch-text heatmaps, comparison table.

    python -m pipelines.report --root outputs/demo       # after pipelines.run_all; writes <root>/report/

Reads the teacher (pretrain) and student (distill) exports, the tokenizer and the synthetic
validation scenes under the run root, and the loss histories from MLflow.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipelines import cli, compare, storage
from pipelines.heatmaps import HeatmapRow, Panel, plot_heatmaps, pyplot
from pipelines.tracking_store import default_uri
from tipsv2 import config_tree
from tipsv2.checkpoint import load_export
from tipsv2.data import synthetic
from tipsv2.data.synthetic import SyntheticConfig
from tipsv2.eval.features import class_embeddings, model_image_encoder, model_text_encoder
from tipsv2.eval.zero_shot import PROMPT_TEMPLATES, SegMode, ZeroShotSegmentationConfig, predict_segmentation
from tipsv2.models.model import TIPSModel
from tipsv2.tokenizer import Tokenizer

REPORT_METRICS = ("zero_shot_segmentation/miou", "retrieval/cls2/i2t_r1", "retrieval/cls2/t2i_r1",
                  "zero_shot_classification/cls1/top1", "linear_segmentation/miou", "linear_depth/rmse", "knn/cls1/top1")
PALETTE = np.array([[40, 40, 40], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.uint8)


def colorize(labels: np.ndarray) -> np.ndarray:
    return PALETTE[labels % len(PALETTE)]


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


def segmentation_overlays(models: dict[str, TIPSModel], tokenizer, scenes: Sequence[synthetic.SceneRecord],
                          class_names: Sequence[str], path: Path) -> Path:
    """Rows: scenes; columns: image, ground truth, one zero-shot prediction per model."""
    plt = pyplot()
    cfg = ZeroShotSegmentationConfig(mode=SegMode.WHOLE, short_side=scenes[0].image.size[0])
    names = ["background", *class_names]
    texts = {n: class_embeddings(model_text_encoder(m, tokenizer), names, PROMPT_TEMPLATES) for n, m in models.items()}
    fig, axes = plt.subplots(len(scenes), 2 + len(models), figsize=(2.4 * (2 + len(models)), 2.4 * len(scenes)),
                             squeeze=False)
    for row, scene in enumerate(scenes):
        panels = [("image", np.asarray(scene.image)), ("ground truth", colorize(scene.mask))]
        for name, model in models.items():
            pred = predict_segmentation(model_image_encoder(model), scene.image, texts[name], scene.mask.shape, cfg)
            panels.append((name, colorize(pred.numpy())))
        for col, (title, picture) in enumerate(panels):
            axes[row, col].imshow(picture)
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def heatmaps(models: dict[str, TIPSModel], tokenizer, scenes: Sequence[synthetic.SceneRecord], path: Path) -> Path:
    """Per scene, the prompt of its main object; heatmap per model over the image."""
    rows = [HeatmapRow(scene.image, title=prompt, panels=[Panel(name, model, prompt) for name, model in models.items()])
            for scene in scenes for prompt in [scene.captions.get("short", "a shape")]]
    return plot_heatmaps(rows, path, tokenizer=tokenizer)


def write_report(out: Path, *, images: dict[str, str], tables: dict[str, str], notes: Sequence[str] = ()) -> Path:
    lines = ["# tipsv2 demo report", ""]
    lines += [f"- {n}" for n in notes] + [""] if notes else []
    for title, table in tables.items():
        lines += [f"## {title}", "", table, ""]
    for title, name in images.items():
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def metrics_table(results: dict[str, dict[str, float]], keys: Sequence[str]) -> str:
    header = "| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    return header + "".join(f"| {name} | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for k in keys) + " |\n"
                            for name, r in results.items())


def build_report(output: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """`<output>/report/`: report.md and its figures, from a finished pipelines.run_all output root; the loss
    histories from `tracking_uri` (the chain's store), else MLFLOW_TRACKING_URI, else the root's sqlite."""
    from mlflow.tracking import MlflowClient   # heavy; only the report needs it

    out = Path(output) / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = {s: storage.read_json(str(Path(output) / s / cli.SUMMARY_FILE)) for s in ("pretrain", "distill")}
    client = MlflowClient(tracking_uri or default_uri(output))
    histories = {}
    for name, s in summary.items():
        run_id = s["mlflow_run_id"]
        histories[name] = {m: [(x.step, x.value) for x in sorted(client.get_metric_history(run_id, m), key=lambda x: x.step)]
                           for m in ("loss/total", "loss/contrastive", "loss/dino", "loss/patch")}
    images = {"Loss curves (pretrain = teacher, distill = student)": loss_curves(histories, out / "loss_curves.png").name}
    resolved = storage.read_json(str(Path(output) / cli.CONFIG_FILE))
    meta = storage.read_json(str(Path(output) / "tokenizer" / "step.json"))["result"]
    tokenizer = Tokenizer(meta["tokenizer"], max_len=resolved["pretrain"]["task"]["model"]["text"]["max_len"])
    models = {"teacher": load_export(Path(output) / "pretrain" / "export")[0].eval(),
              "student": load_export(Path(output) / "distill" / "export")[0].eval()}
    scenes = [s for _, s in zip(range(4), synthetic.read_split(str(Path(output) / "source" / "synthetic"), "val"))]
    names = synthetic.class_names(config_tree.from_dict(SyntheticConfig, resolved["source"]["synthetic"]))
    images["Zero-shot segmentation (value attention, 9 templates)"] = segmentation_overlays(
        models, tokenizer, scenes, names, out / "zero_shot_segmentation.png").name
    images["Patch-text similarity for each scene's short caption"] = heatmaps(
        models, tokenizer, scenes, out / "patch_text_heatmaps.png").name
    evaluation = {name: storage.read_json(str(Path(output) / "evaluate" / name / "summary.json"))["metrics"]
                  for name in models}
    keys = [k for k in REPORT_METRICS if any(k in r for r in evaluation.values())]
    cmp = compare.run(experiment=resolved["tracking"]["experiment"], output=str(out / "comparison"),
                      run_ids=[s["mlflow_run_id"] for s in summary.values()], param_prefixes=["steps", "task.patch.kind",
                                                                                          "task.teacher.mode", "teacher"],
                      tracking_uri=client.tracking_uri)
    tables = {"Evaluation (synthetic scenes, held-out split)": metrics_table(evaluation, keys),
              "MLflow comparison of the runs": compare.markdown(cmp["table"])}
    path = write_report(out, images=images, tables=tables)
    return {"report": str(path), "files": sorted(p.name for p in out.iterdir())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the run_all output root")
    args = parser.parse_args(argv)
    print(json.dumps(build_report(args.root), indent=2))


if __name__ == "__main__":
    main()

"""The main job: source -> ingest -> caption -> tokenizer -> pretrain -> distill -> evaluate -> report.

    python -m pipelines.run_all --config demo --output outputs/demo       # `make demo`, ~10 min on 2 CPU cores
    python -m pipelines.run_all --config tiny --output /tmp/tiny          # a minute or two
    ray job submit --working-dir . -- python -m pipelines.run_all --config tiny --output s3://b/runs/tiny

Each step writes under `<output>/<step>/` and is its own MLflow run under one parent run (sqlite store
under a local output unless `tracking.uri` / MLFLOW_TRACKING_URI say otherwise). A step whose
`step.json` records the same config is skipped, so a rerun resumes where the last one stopped.
The evaluate step also scores the teacher's architecture at random init (`evaluate/random_init/export`),
and the report sets every number beside it and beside its baseline (pipelines/report_table.py).
Sources: procedural scenes (with ground-truth captions for the template captioner) plus the sample
photos that ship with scikit-image, unless `source.images` names your own images to ingest.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from pipelines import caption, cli, data, ingest, report, storage
from pipelines.tracking import MlflowSink, TrackingConfig, numbers
from pipelines.tracking_store import store_uri
from tipsv2 import config_tree
from pipelines.train.config import DistillJobConfig, PretrainJobConfig, distill_preset, preset
from tipsv2.data.synthetic import SyntheticConfig

STEPS = ("source", "ingest", "caption", "tokenizer", "pretrain", "distill", "evaluate", "report")
RANDOM_INIT = "random_init"   # the baseline model: the teacher's architecture, untrained (evaluate/random_init/export)
SKIMAGE_SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "horse", "cat", "camera", "moon")


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    images: str = ""                       # your images (anything pipelines.ingest reads); "" = generated
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    skimage_samples: bool = True           # add scikit-image's sample photos (offline, in the wheel)


@dataclass(frozen=True, kw_only=True)
class RunAllConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    ingest: ingest.IngestConfig = field(default_factory=ingest.default)
    caption: caption.CaptionConfig = field(default_factory=caption.template)
    pretrain: PretrainJobConfig = field(default_factory=lambda: preset("tiny"))
    distill: DistillJobConfig = field(default_factory=lambda: distill_preset("tiny"))
    evaluate_suite: str = "synthetic"      # a tipsv2.eval.suites name
    evaluate_data: str = ""                # the suite's dataset root; "" = the generated scenes for 'synthetic'
    evaluate_options: dict[str, str] = field(default_factory=dict)   # suite keyword arguments, values as JSON
                                                                     # (pipelines.evaluate --option)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="tipsv2-run_all"))


def _chain(name: str, evaluate_options: dict[str, str] | None = None) -> RunAllConfig:
    pre, dis = preset(name), distill_preset(name)
    return RunAllConfig(source=SourceConfig(synthetic=pre.data.synthetic), pretrain=pre, distill=dis,
                        evaluate_options=evaluate_options or {})


# The demo's probes and kNN train on 256 of its 1024 training scenes: the linear probe on all of them took most
# of the evaluate step's time, three models over.
DEMO_EVALUATION = {"train_count": "256"}
PRESETS: dict[str, Callable[[], RunAllConfig]] = {"tiny": lambda: _chain("tiny"),
                                                  "demo": lambda: _chain("demo", DEMO_EVALUATION),
                                                  "default": lambda: _chain("demo", DEMO_EVALUATION)}


# ---------------------------------------------------------------- steps


def write_source(cfg: SourceConfig, out: str) -> dict[str, Any]:
    """Scenes as PNG + alt-text sidecars (what users' folders look like), and their ground truth."""
    from tipsv2.data import synthetic

    fs, root = storage.filesystem(storage.join(out, "synthetic"))
    written = synthetic.write_parquet(root, cfg.synthetic, filesystem=fs)
    train = next(synthetic.read_split(root, "train", filesystem=fs))  # validates the layout
    del train
    images = storage.join(out, "images")
    import pyarrow.parquet as pq
    table = pq.read_table(written["train"]["paths"]["images"], filesystem=fs, columns=["id", "image", "alt_text"])
    for row in table.to_pylist():
        storage.write_bytes(storage.join(images, f"{row['id']}.png"), row["image"])
        if row["alt_text"]:
            storage.write_bytes(storage.join(images, f"{row['id']}.txt"), row["alt_text"].encode())
    samples = 0
    if cfg.skimage_samples:
        from PIL import Image
        from skimage import data as skdata
        for name in SKIMAGE_SAMPLES:
            pixels = getattr(skdata, name)()
            buffer = io.BytesIO()
            Image.fromarray(pixels).convert("RGB").save(buffer, format="JPEG", quality=90)
            storage.write_bytes(storage.join(images, f"skimage-{name}.jpg"), buffer.getvalue())
            storage.write_bytes(storage.join(images, f"skimage-{name}.txt"), f"a photo: {name}".encode())
            samples += 1
    return {"synthetic": {k: v["rows"] for k, v in written.items()}, "skimage_samples": samples,
            "images": images, "ground_truth": storage.join(out, "synthetic", "train", "ground_truth")}


def train_tokenizer_step(source: data.Source, vocab: int, max_len: int, out: str) -> dict[str, Any]:
    """The tokenizer every training step shares, trained on the texts the trainer reads (pipelines.data)."""
    from tipsv2.tokenizer import Tokenizer, train_tokenizer

    texts = data.texts_for_tokenizer(data.read_texts(source))
    with tempfile.TemporaryDirectory() as tmp:
        local = train_tokenizer(texts, vocab_size=vocab, out_path=Path(tmp) / "tokenizer.model")
        Tokenizer(local, max_len=max_len)  # loads back
        target = storage.join(out, "tokenizer.model")
        storage.write_bytes(target, local.read_bytes())
    return {"texts": len(texts), "vocab_size": vocab, "tokenizer": target}


def write_random_init(cfg: PretrainJobConfig, out: str) -> str:
    """`out`: an export of the weights pretraining starts from (seeded by cfg.seed, no init), untrained. The
    report sets every trained model beside it: what the architecture and tokenizer score having learned nothing."""
    from tipsv2.checkpoint import save_export
    from tipsv2.loop import build_pretrain_task

    model = build_pretrain_task(replace(cfg, init=None)).model
    with tempfile.TemporaryDirectory(prefix="tipsv2-random-init-") as tmp:
        for path in sorted(save_export(Path(tmp), model=model).iterdir()):
            storage.write_bytes(storage.join(out, path.name), path.read_bytes())
    return out


def evaluate_step(cfg: RunAllConfig, out: str, *, models: dict[str, str], tokenizer: str, eval_data: str | None,
                  tracking: TrackingConfig) -> dict[str, Any]:
    """The suite for each model; `models[RANDOM_INIT]` is written here first."""
    from pipelines import evaluate

    write_random_init(cfg.pretrain, models[RANDOM_INIT])
    results = {}
    for name, checkpoint in models.items():
        ecfg = evaluate.EvaluateConfig(checkpoint=checkpoint, suite=cfg.evaluate_suite, data=eval_data, tokenizer=tokenizer,
                                       options=cfg.evaluate_options, tracking=tracking)
        results[name] = evaluate.run(ecfg, storage.join(out, name))["metrics"]
    return results


# ---------------------------------------------------------------- the chain


class Chain:
    """Runs steps in order under one parent MLflow run; skips a step whose step.json matches."""

    def __init__(self, cfg: RunAllConfig, output: str) -> None:
        self.cfg, self.output = cfg, output
        self.uri = store_uri(cfg.tracking.uri, output)
        state_uri = storage.join(output, "run_all.json")
        state = storage.read_json(state_uri) if storage.exists(state_uri) else {}
        self.parent = MlflowSink(uri=self.uri, experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name
                                 or "run_all", run_id=state.get("parent_run_id"),
                                 offline_dir=output if "://" not in output else None)
        if "parent_run_id" not in state:
            self.parent.log_params(config_tree.to_dict(cfg))
            storage.write_json(state_uri, {"parent_run_id": self.parent.run_id})
        # Every step is told where to log and under which parent, in its own config (nothing through the env).
        self.tracking = replace(cfg.tracking, uri=self.uri, parent_run_id=self.parent.run_id)
        self.results: dict[str, Any] = {}

    def step(self, name: str, step_cfg: Any, action: Callable[[str], dict[str, Any]], *, own_run: bool = True) -> dict:
        out = storage.join(self.output, name)
        marker = storage.join(out, "step.json")
        previous = cli.done_before(marker, step_cfg)
        if previous is not None:
            print(f"[run_all] {name}: done before with this config, skipped")
            self.results[name] = previous["result"]
            return self.results[name]
        print(f"[run_all] {name} ...", flush=True)
        clock = cli.Stopwatch()
        result = action(out)
        if own_run and not result.get("mlflow_run_id"):  # stages without a run of their own get a child run
            child = MlflowSink(uri=self.uri, experiment=self.cfg.tracking.experiment, run_name=name,
                               parent_run_id=self.parent.run_id)
            child.log_metrics({k: float(v) for k, v in numbers(result).items()}, step=0)
            child.close()
        storage.write_json(marker, cli.done_record(step_cfg, result=result, wall_s=clock.seconds()))
        print(f"[run_all] {name}: {clock.seconds():.1f} s", flush=True)
        self.results[name] = result
        return result


def run(cfg: RunAllConfig, output: str) -> dict[str, Any]:
    from pipelines import train

    clock = cli.Stopwatch()
    cli.write_resolved_config(output, cfg)
    chain = Chain(cfg, output)
    root = lambda step: storage.join(output, step)  # noqa: E731
    if cfg.source.images:
        source = {"images": cfg.source.images, "ground_truth": ""}
    else:
        source = chain.step("source", cfg.source, lambda out: write_source(cfg.source, out))
    ingest_cfg = replace(cfg.ingest, source=source["images"], tracking=chain.tracking)
    chain.step("ingest", ingest_cfg, lambda out: _brief(ingest.run(ingest_cfg, out)), own_run=False)
    caption_cfg = replace(cfg.caption, input=root("ingest"), tracking=chain.tracking,
                          template=replace(cfg.caption.template, captions_path=source["ground_truth"]))
    chain.step("caption", caption_cfg, lambda out: _brief(caption.run(caption_cfg, out)), own_run=False)
    vocab, max_len = cfg.pretrain.data.tokenizer_vocab, cfg.pretrain.task.model.text.max_len
    texts = data.Source(images=storage.join(root("ingest"), "images"), captions=storage.join(root("caption"), "captions"))
    tok = chain.step("tokenizer", {"vocab": vocab, "max_len": max_len, "caption": config_tree.to_dict(caption_cfg)},
                     lambda out: train_tokenizer_step(texts, vocab, max_len, out))
    data_cfg = dict(images=texts.images, captions_uri=texts.captions, tokenizer=tok["tokenizer"])
    pre_cfg = replace(cfg.pretrain, data=replace(cfg.pretrain.data, **data_cfg), tracking=chain.tracking)
    chain.step("pretrain", pre_cfg, lambda out: _brief(train.run(train.Job.PRETRAIN, pre_cfg, out)), own_run=False)
    teacher = storage.join(root("pretrain"), "export")
    dis_cfg = replace(cfg.distill, teacher=teacher, data=replace(cfg.distill.data, **data_cfg), tracking=chain.tracking)
    chain.step("distill", dis_cfg, lambda out: _brief(train.run(train.Job.DISTILL, dis_cfg, out)), own_run=False)
    models = {"teacher": teacher, "student": storage.join(root("distill"), "export"),
              RANDOM_INIT: storage.join(root("evaluate"), RANDOM_INIT, "export")}
    eval_data = cfg.evaluate_data or (storage.join(root("source"), "synthetic")
                                      if cfg.evaluate_suite == "synthetic" else None)
    evaluation = chain.step("evaluate", {"suite": cfg.evaluate_suite, "data": eval_data, "models": models,
                                         "options": cfg.evaluate_options},
                            lambda out: evaluate_step(cfg, out, models=models, tokenizer=tok["tokenizer"],
                                                      eval_data=eval_data, tracking=chain.tracking), own_run=False)
    if "://" not in output:
        chain.step("report", {"models": models}, lambda out: report.build_report(output, chain.uri), own_run=False)
    chain.parent.log_metrics({f"{m}/{k}": v for m, r in evaluation.items() for k, v in r.items()}, step=0)
    chain.parent.close()
    summary = {"steps": {k: v for k, v in chain.results.items()}, "mlflow_parent_run_id": chain.parent.run_id,
               "tracking_uri": chain.uri, "wall_s": clock.seconds(),
               "where": {s: root(s) for s in STEPS if s in chain.results}}
    cli.write_summary(output, summary)
    return summary


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    """What run_all keeps of a stage summary (no resolved configs, they are in each stage's config.json)."""
    return {k: v for k, v in summary.items() if k != "config"}


def print_where(summary: dict[str, Any], output: str) -> None:
    print(f"\n[run_all] finished in {summary['wall_s']:.0f} s; outputs under {output}:")
    for step, where in summary["where"].items():
        print(f"  {step:10s} {where}")
    print(f"  MLflow     {summary['tracking_uri']} (parent run {summary['mlflow_parent_run_id']})")
    if "report" in summary["steps"]:
        print(f"  report     {summary['steps']['report']['report']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.stage_main(argv, PRESETS, run, description=__doc__, show=print_where)


if __name__ == "__main__":
    main()

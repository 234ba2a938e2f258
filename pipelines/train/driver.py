"""The driver: config.json, data (synthetic Parquet if none), tokenizer, MLflow run, then TorchTrainer.fit over
`worker.train_worker` (or `local.train_here` with --local), and summary.json.

A rerun of the same command resumes from the latest checkpoint under the output, and a run that reached its
last step is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from pipelines import cli, data, lineage, registry, storage
from pipelines.estimate import log_plan
from pipelines.resources import Stage, training_request
from pipelines.tracking import flatten as tracking_flatten
from pipelines.tracking import open_sink
from pipelines.tracking_store import for_every_node
from pipelines.train.checkpoint import (HISTORY_FILE, RUN_NAME, STOP_FILE, latest_checkpoint, read_history,
                                        read_trainer_state)
from pipelines.train.export import EXPORT_DIR, HF_DIR
from pipelines.train.jobs import Faults, InjectedFaults, Job, Plan
from pipelines.train.local import train_here
from pipelines.train.worker import train_worker
from tipsv2 import config_tree
from pipelines.train.config import JobConfig, batch_split, optimizer_warning
from tipsv2.loop import NonFiniteLoss
from tipsv2.tokenizer import train_tokenizer


def prepare_tokenizer(cfg: JobConfig, output: str, texts) -> str:
    """URI of the SentencePiece model: the configured one, or one trained on the texts once per output."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    uri = storage.join(output, "tokenizer", "spm.model")
    if not storage.exists(uri):
        with tempfile.TemporaryDirectory() as tmp:
            path = train_tokenizer(data.texts_for_tokenizer(texts), vocab_size=cfg.data.tokenizer_vocab,
                                   out_path=Path(tmp) / "spm.model")
            storage.write_bytes(uri, Path(path).read_bytes())
    return uri


def local_ray_cpus(cfg: JobConfig) -> int:
    """Logical CPUs for a local Ray: the workers plus room for Ray Data (2 deadlocks with Data + Train)."""
    return max(4, math.ceil(cfg.engine.workers * cfg.engine.cpus_per_worker) + 2)


def rank_request(job: Job, engine) -> dict[str, float]:
    """What one Ray Train rank asks for (pipelines.resources.training_request)."""
    return training_request(Stage(job.value), use_gpu=engine.use_gpu, cpus_per_worker=engine.cpus_per_worker)


def worker_resources(request: dict[str, float]) -> dict[str, float]:
    """The production request per GPU rank, fitted to a local Ray this process started (one GPU machine):
    there, accelerator pins the node does not advertise are dropped and CPUs capped at what it has."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return request
    available = ray.cluster_resources()
    fitted = {k: v for k, v in request.items() if k in ("CPU", "GPU") or k in available}
    if "CPU" in fitted:
        fitted["CPU"] = min(fitted["CPU"], max(1.0, available.get("CPU", 1.0) // max(1.0, available.get("GPU", 1.0))))
    if fitted != request:
        print(f"local Ray: per-worker request {request} fitted to this machine as {fitted}")
    return fitted


def fit(plan: Plan):
    """One TorchTrainer run into <output>/ray/train; the workers resume from plan.resume_from if set."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    engine = plan.cfg.engine
    resources = rank_request(plan.job, engine)
    if engine.use_gpu:
        resources = worker_resources(resources)
    fs, path = storage.filesystem(storage.join(plan.output, "ray"))
    trainer = TorchTrainer(
        train_worker, train_loop_config={"plan": plan},
        torch_config=TorchConfig(backend="nccl" if engine.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=engine.workers, use_gpu=engine.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=engine.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=engine.keep_checkpoints)))
    return trainer.fit()


RESUME_MAY_CHANGE = {"data.on_caption_change"}   # what a resumed run does, not what it computes


def check_same_config(output: str, cfg: JobConfig, *, resuming: bool) -> None:
    """Resuming continues the run in `output`: refuse when its config.json differs from `cfg`."""
    uri = storage.join(output, cli.CONFIG_FILE)
    if not resuming or not storage.exists(uri):
        return
    old = tracking_flatten(storage.read_json(uri))
    new = tracking_flatten(json.loads(json.dumps(config_tree.to_dict(cfg), default=str)))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUME_MAY_CHANGE)
    if changed:
        raise ValueError(f"{output} holds checkpoints of a run with another config (changed: {changed[:8]}); "
                         "resume with the same config or train into a new --output")


def run(job: Job, cfg: JobConfig, output: str, *, local: bool = False, faults: Faults | None = None) -> dict[str, Any]:
    """Train `cfg` into `output` (local path or s3://); resumes or skips a previous run there."""
    clock = cli.Stopwatch()
    batch_split(cfg, local=local)   # a split that does not give data.global_batch fails here, naming the values
    if (warning := optimizer_warning(cfg, local=local)) is not None:
        print(f"{job.value}: {warning}")
    previous = cli.done_before(storage.join(output, cli.SUMMARY_FILE), cfg)
    if previous is not None and previous.get("complete"):
        print(f"{job.value}: {output} already holds a finished run of this config; nothing to do")
        return previous
    resume_from = None if local else latest_checkpoint(output)
    check_same_config(output, cfg, resuming=resume_from is not None)
    cli.write_resolved_config(output, cfg)
    source = data.prepare_source(cfg.data, output)
    datasets, read = lineage.read_source(source)   # one read of each set: its digest, then the texts
    changed = lineage.check_resume(output, datasets, policy=cfg.data.on_caption_change, resuming=bool(resume_from))
    texts = data.read_texts(source, read)
    del read
    tokenizer = prepare_tokenizer(cfg, output, texts)
    run_id = read_trainer_state(resume_from).run_id if resume_from else None
    sink = open_sink(cfg.tracking, output_root=output, run_id=run_id)
    if run_id is None:
        sink.log_params(config_tree.to_dict(cfg))
        log_plan(sink, Stage(job.value), cfg)   # the plan's images/s, step time and memory, beside the run's
        sink.set_tags({"tipsv2.job": job.value, "tipsv2.output": output, "tipsv2.engine": "local" if local else "ray"})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / cli.CONFIG_FILE
            path.write_text(json.dumps(config_tree.to_dict(cfg), indent=2, default=str))
            sink.log_artifact(path)
    lineage.log_inputs(sink, datasets, context=lineage.TRAINING, note=changed)
    try:
        if local:
            history = train_here(job, cfg, output=output, source=source, texts=texts, tokenizer=tokenizer, sink=sink)
        else:
            history = train_distributed(job, cfg, output=output, source=source, texts=texts, tokenizer=tokenizer,
                                        run_id=sink.run_id, tracking_uri=getattr(sink, "uri", None),
                                        resume_from=resume_from, faults=faults or InjectedFaults.from_env())
    except BaseException:
        sink.close("FAILED")
        raise
    model = registry.register_export(sink, cfg.tracking, job=job.value, hf_dir=storage.join(output, EXPORT_DIR, HF_DIR),
                                     step=int(history[-1]["step"]) if history else 0, datasets=datasets)
    summary = cli.done_record(cfg, job=job.value, complete=True, engine="local" if local else "ray", **{
               "read": dataclasses.asdict(source), "rows": len(texts), "steps": len(history),
               "final": {k: v for k, v in history[-1].items() if k.startswith("loss/")} if history else {},
               "written": {"export": storage.join(output, EXPORT_DIR), "history": storage.join(output, HISTORY_FILE),
                           "checkpoints": storage.join(output, "ray", RUN_NAME)},
               "datasets": [d.brief() | {"kind": d.kind.value} for d in datasets], "registered_model": model,
               "cls2_captions": data.source_counts(texts, cfg.data.captions),   # which caption sources CLS2 draws
               "mlflow_run_id": sink.run_id, "wall_s": clock.seconds()})
    cli.write_summary(output, summary)
    sink.close()
    return summary


def train_distributed(job: Job, cfg: JobConfig, *, output: str, source: data.Source, texts, tokenizer: str,
                      run_id: str | None, tracking_uri: str | None, resume_from: str | None,
                      faults: Faults) -> list[dict[str, float]]:
    import ray

    cli.init_ray(0 if cfg.engine.use_gpu else local_ray_cpus(cfg))   # GPU machines: Ray counts the CPUs
    plan = Plan(job=job, cfg=cfg, output=output, source=source, ids=texts.column("id").to_pylist(),
                texts_ref=ray.put(texts), tokenizer=tokenizer, run_id=run_id,
                tracking_uri=for_every_node(tracking_uri, output) if tracking_uri else None,   # ranks on other nodes
                resume_from=resume_from, faults=faults)
    stop = storage.join(output, STOP_FILE)
    storage.delete(stop)
    fit(plan)
    if storage.exists(stop):
        raise NonFiniteLoss(storage.read_json(stop)["error"])
    return read_history(output)

r"""Know before you submit: nodes, GPU-hours, wall time, cost and GPU memory of a run, stage by stage.

    python -m pipelines.plan --config vit_b14 --cluster cluster/aws.yaml --images 100000000
    python -m pipelines.plan --config vit_l14 --cluster cluster/gcp.yaml --images 1e8 --stage pretrain \
        --set engine.zero_stage=3 --set assume.mfu=0.35 --json
    python -m pipelines.plan --config demo --cluster cluster/aws.yaml --images 1024 --prices my_prices.yaml

`--config` is a training preset (tiny, demo, vit_s14 ... vit_g14): the whole recipe is ingest ->
caption -> pretrain -> distill -> evaluate with that preset's pretrain and distill configs (tiny and demo:
`pipelines.run_all`'s chain; paper sizes: the production caption stage, `pipelines.caption.default`).
`--stage` plans one stage; its `--set` keys are the stage's own (`engine.zero_stage=3`), the whole
recipe's are prefixed (`pretrain.engine.zero_stage=3`), and `assume.<field>` overrides an assumption
(`pipelines.estimate.Assumptions`). Unknown keys fail with the valid ones. `--images N` is the dataset:
ingest and caption process N images; training runs its configured steps (the plan prints the epochs).

Per stage it prints the node type and count, workers, GPU-hours, wall time and on-demand cost (prices
from cluster/prices.yaml, approximate, with their source), and per training stage the GPU memory of a
worker (model state at its ZeRO stage, precision and batch, activations, reserve) against every GPU
type of the cluster, with a fit or no-fit verdict and what to change. Every figure names its source:
a measured profile (bench/results/*.json) or an analytic estimate with its named assumption.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import caption, ingest, run_all
from pipelines.clusters import PRICES, Cluster, NodeType, PlanError, choose_node, cost, node_cap, read_cluster
from pipelines.estimate import (Assumptions, Figure, MemoryEstimate, Profiles, Verdict, caption_throughput,
                                contrastive_negatives, cpu_throughput,
                                estimate_memory, gpu_throughput, load_profiles, verdict)
from pipelines.resources import (ACCELERATOR_PREFIX, ACCELERATOR_SLIVER, RESOURCE_REQUESTS, Stage, ResourceDict,
                                 training_request, workers_per_node)
from pipelines.train.config import PRESETS, DistillJobConfig, JobConfig, batch_split, distill_preset, preset
from tipsv2 import config_tree

STAGES = (Stage.INGEST, Stage.CAPTION, Stage.PRETRAIN, Stage.DISTILL, Stage.EVALUATE)
EVALUATED_MODELS = 2   # the pretrained teacher and the distilled student


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    stage: str
    node_type: str
    gpu: str | None
    nodes: int
    workers: int                          # training ranks, engine replicas or CPU task slots
    images: float                         # images processed (training: images seen)
    throughput: Figure                    # images/s of one worker
    wall_s: float
    gpu_hours: float                      # GPUs of the nodes held x wall time
    cost_usd: float | None
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    memory: MemoryEstimate | None = None
    verdicts: tuple[Verdict, ...] = ()


# ---------------------------------------------------------------- inputs


def recipe(name: str) -> run_all.RunAllConfig:
    """The whole chain for a training preset: run_all's own chain for tiny and demo; for the paper sizes
    that preset's pretrain and distill configs with the paper's two caption passes (caption.paper) and the
    production ingest stage."""
    if name in run_all.PRESETS:
        return run_all.PRESETS[name]()
    if name not in PRESETS:
        raise PlanError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return run_all.RunAllConfig(pretrain=preset(name), distill=distill_preset(name), caption=caption.paper(),
                                ingest=ingest.default())


def resolve(name: str, sets: list[str], stage: Stage | None) -> tuple[run_all.RunAllConfig, Assumptions]:
    """The recipe and the assumptions after `--set`: `assume.*` keys go to the assumptions, the others to
    the recipe (prefixed with the stage's name when one stage is planned)."""
    cfg, assume = recipe(name), Assumptions()
    for assignment in sets:
        key = assignment.split("=", 1)[0].strip()
        if key.startswith("assume."):
            assume = config_tree.override(assume, assignment.removeprefix("assume."))
        elif stage is not None and stage != Stage.EVALUATE:
            cfg = config_tree.override(cfg, f"{stage.value}.{assignment}")
        else:
            cfg = config_tree.override(cfg, assignment)
    return cfg, assume


def held(stage: str, node: NodeType, *, nodes: int, workers: int, images: float, speed: Figure, busy_s: float,
         start_s: float, notes=(), warnings=(), **memory) -> StagePlan:
    """A StagePlan of `nodes` nodes held for start-up plus `busy_s` seconds of work."""
    wall = start_s + busy_s
    return StagePlan(stage=stage, node_type=node.name, gpu=node.gpu, nodes=nodes, workers=workers, images=images,
                     throughput=speed, wall_s=wall, gpu_hours=nodes * node.gpus * wall / 3600,
                     cost_usd=cost(node, nodes, wall), notes=tuple(notes), warnings=tuple(warnings), **memory)


# ---------------------------------------------------------------- stages


def plan_cpu_tasks(stage: str, request: ResourceDict, images: float, cluster: Cluster,
                   assume: Assumptions) -> StagePlan:
    """Ray Data CPU tasks (ingest; template captions): they scale out until they would finish in about
    `assume.scale_out_hours`, up to the node type's max_workers."""
    node = choose_node(stage, request, cluster)
    slots = workers_per_node(request, node.resources)
    speed = Figure(value=assume.ingest_images_per_s_per_cpu * request.get("CPU", 1), unit="images/s",
                   source=f"assumed {assume.ingest_images_per_s_per_cpu:g} images/s per CPU "
                          "(assume.ingest_images_per_s_per_cpu)")
    work = images / speed.value                                  # task-seconds
    wanted = max(1, math.ceil(work / (slots * assume.scale_out_hours * 3600)))
    nodes = min(wanted, node_cap(node, cluster))
    warnings = [f"max_workers caps {stage} at {nodes} {node.name} nodes (it would use {wanted} to finish in "
                f"{assume.scale_out_hours:g} h)"] if wanted > nodes else []
    return held(stage, node, nodes=nodes, workers=nodes * slots, images=images, speed=speed,
                busy_s=work / (nodes * slots), start_s=assume.node_start_s, warnings=warnings)


def caption_request(cfg: caption.CaptionConfig) -> dict[str, float]:
    """One vLLM engine replica: its tensor-parallel ranks' GPUs and CPUs, pinned to the accelerator type."""
    e = cfg.engine
    request = {"CPU": e.cpus_per_worker * e.tensor_parallel_size, "GPU": e.gpus_per_worker * e.tensor_parallel_size}
    if e.accelerator_type:
        request[ACCELERATOR_PREFIX + e.accelerator_type] = ACCELERATOR_SLIVER
    return request


def plan_caption(cfg: caption.CaptionConfig, images: float, cluster: Cluster, assume: Assumptions) -> list[StagePlan]:
    """One StagePlan per caption pass (they run one after the other over every image): `caption`, or
    `caption:<source>` for each pass of a job with several (its own model, replicas and tokens)."""
    views = caption.passes_of(cfg)
    return [plan_caption_pass(view, images, cluster, assume,
                              name=Stage.CAPTION.value if len(views) == 1 else f"{Stage.CAPTION.value}:{view.source}",
                              key="caption." + (f"passes.{view.source}." if i else ""))
            for i, view in enumerate(views)]


def plan_caption_pass(cfg: caption.CaptionConfig, images: float, cluster: Cluster, assume: Assumptions, *,
                      name: str, key: str = "caption.") -> StagePlan:
    """One pass's engine replicas over every image; `key`: where its config sits (caption.passes.b. ...)."""
    if cfg.backend == caption.Backend.TEMPLATE:
        return plan_cpu_tasks(name, {"CPU": cfg.engine.stage_cpus}, images, cluster, assume)
    request = caption_request(cfg)
    node = choose_node(Stage.CAPTION.value, request, cluster)
    per_node = workers_per_node(request, node.resources)
    capacity = node_cap(node, cluster) * per_node
    replicas = min(cfg.engine.concurrency, capacity)
    warnings = [f"engine.concurrency {cfg.engine.concurrency} replicas exceed what max_workers allows "
                f"({capacity} on {node.name}); planned with {replicas}"] if replicas < cfg.engine.concurrency else []
    tokens = sum(cfg.prompts.get(g).max_tokens for g in cfg.granularities)
    per_gpu = caption_throughput(node.gpu, tokens_per_image=tokens, assume=assume)
    speed = dataclasses.replace(per_gpu, value=per_gpu.value * request["GPU"])
    notes = [f"engine.concurrency={replicas} uses {math.ceil(replicas / per_node)} of {node_cap(node, cluster)} "
             f"{node.name} nodes; --set {key}engine.concurrency={capacity} would take "
             f"{hours(images / (speed.value * capacity))}"] if replicas < capacity else []
    return held(name, node, nodes=math.ceil(replicas / per_node), workers=replicas, images=images,
                speed=speed, busy_s=images / (speed.value * replicas), start_s=assume.node_start_s,
                notes=notes, warnings=warnings)


def plan_training(stage: Stage, cfg: JobConfig, images: float, cluster: Cluster, assume: Assumptions,
                  profiles: Profiles) -> StagePlan:
    request = training_request(stage, use_gpu=cfg.engine.use_gpu, cpus_per_worker=cfg.engine.cpus_per_worker)
    node = choose_node(stage.value, request, cluster)
    workers = cfg.engine.workers
    nodes = math.ceil(workers / workers_per_node(request, node.resources))
    warnings = []
    if nodes > node_cap(node, cluster):
        warnings.append(f"engine.workers={workers} needs {nodes} {node.name} nodes but max_workers allows "
                        f"{node_cap(node, cluster)}: Ray Train would wait for nodes that never come")
    gpu = node.gpu if cfg.engine.use_gpu else None
    if cfg.engine.use_gpu and gpu is None:
        raise PlanError(f"stage {stage.value}: node type {node.name} pins no accelerator type; expected "
                        f"an '{ACCELERATOR_PREFIX}<GPU>' resource")
    speed = (gpu_throughput(cfg, gpu, assume=assume, profiles=profiles) if gpu
             else cpu_throughput(cfg, assume=assume, profiles=profiles))
    split = batch_split(cfg)   # the plan of a run that would refuse to start is refused too
    seen = cfg.steps * split.global_batch
    notes = [f"{cfg.steps} steps x global batch {split.global_batch} = {seen:,.0f} images seen "
             f"({seen / max(images, 1):.2f} epochs of {images:,.0f})",
             f"contrastive negatives per step: {contrastive_negatives(cfg)} image-text pairs (data.batch_size "
             f"{split.per_worker} x engine.grad_accum {split.grad_accum} x engine.workers {split.workers}: "
             + ("distillation's loss is per micro-batch, so grad_accum does not count)"
                if isinstance(cfg, DistillJobConfig) else
                f"feature-cached accumulation; a per-micro-step loss would see {split.per_worker * split.workers})")]
    gpus = sorted({t.gpu for t in cluster.node_types.values() if t.gpu}) if gpu else []
    verdicts = tuple(verdict(cfg, g, assume=assume) for g in gpus)
    if gpu and not next(v for v in verdicts if v.gpu == gpu).fits:
        warnings.append(f"a worker does not fit in {gpu} memory (see the memory table)")
    start = assume.job_start_s + (assume.node_start_s if gpu else 0.0)
    return held(stage.value, node, nodes=nodes, workers=workers, images=seen, speed=speed,
                busy_s=seen / (speed.value * workers), start_s=start, notes=notes, warnings=warnings,
                memory=estimate_memory(cfg, assume=assume) if gpu else None, verdicts=verdicts)


def plan_evaluate(cluster: Cluster, assume: Assumptions) -> StagePlan:
    request = RESOURCE_REQUESTS[Stage.EVALUATE]
    node = choose_node(Stage.EVALUATE.value, request, cluster)
    speed = Figure(value=math.nan, unit="images/s", source=(
        f"assumed {assume.evaluate_hours:g} h per model on one GPU (assume.evaluate_hours), {EVALUATED_MODELS} models"))
    return held(Stage.EVALUATE.value, node, nodes=1, workers=1, images=0, speed=speed,
                busy_s=assume.evaluate_hours * EVALUATED_MODELS * 3600, start_s=assume.node_start_s)


def plan_stage(stage: Stage, cfg: run_all.RunAllConfig, images: float, cluster: Cluster, assume: Assumptions,
               profiles: Profiles) -> list[StagePlan]:
    if stage == Stage.INGEST:
        return [plan_cpu_tasks(stage.value, {"CPU": cfg.ingest.num_cpus_per_task}, images, cluster, assume)]
    if stage == Stage.CAPTION:
        return plan_caption(cfg.caption, images, cluster, assume)
    if stage == Stage.EVALUATE:
        return [plan_evaluate(cluster, assume)]
    training = cfg.pretrain if stage == Stage.PRETRAIN else cfg.distill
    return [plan_training(stage, training, images, cluster, assume, profiles)]


def plan(cfg: run_all.RunAllConfig, *, images: float, cluster: Cluster, assume: Assumptions = Assumptions(),
         stages: tuple[Stage, ...] = STAGES, profiles: Profiles | None = None) -> list[StagePlan]:
    """One StagePlan per stage (per pass for a caption job of several), in the order run_all runs them (one
    after the other)."""
    if images < 1:
        raise PlanError(f"--images must be >= 1, got {images:g}")
    profiles = profiles or load_profiles()
    return [p for stage in stages for p in plan_stage(stage, cfg, images, cluster, assume, profiles)]


# ---------------------------------------------------------------- output


def total(plans: list[StagePlan]) -> dict[str, float | None]:
    costs = [p.cost_usd for p in plans]
    return {"wall_s": sum(p.wall_s for p in plans), "gpu_hours": sum(p.gpu_hours for p in plans),
            "cost_usd": None if None in costs else sum(costs)}


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min"


def money(value: float | None) -> str:
    if value is None:
        return "no price"
    return f"${value:,.0f}" if value >= 100 else f"${value:,.2f}"


def stage_lines(plans: list[StagePlan], cluster: Cluster) -> list[str]:
    head = f"{'stage':9} {'nodes':34} {'workers':>7} {'GPU-h':>9} {'wall':>9} {'cost':>10}"
    lines = [head, "-" * len(head)]
    for p in plans:
        node = cluster.node_types[p.node_type]
        lines.append(f"{p.stage:9} {f'{p.nodes} x {p.node_type} ({node.instance})':34} {p.workers:>7} "
                     f"{p.gpu_hours:>9,.1f} {hours(p.wall_s):>9} {money(p.cost_usd):>10}")
    t = total(plans)
    lines.append(f"{'total':9} {'(stages run in turn)':34} {'':>7} {t['gpu_hours']:>9,.1f} {hours(t['wall_s']):>9} "
                 f"{money(t['cost_usd']):>10}")
    return lines


def memory_lines(p: StagePlan, cfg: JobConfig) -> list[str]:
    m, e = p.memory, cfg.engine
    lines = [f"{p.stage} memory per GPU: ZeRO-{e.zero_stage}, {e.precision.value}, batch {cfg.data.batch_size} "
             f"x grad_accum {e.grad_accum}, {e.workers} workers: model state {m.model_state:.1f} GiB + activations "
             f"{m.activations:.1f} GiB ({m.activations_per_image * 1024:.0f} MiB/image) + reserve {m.reserved:.1f} "
             f"GiB = {m.total:.1f} GiB"]
    for v in p.verdicts:
        chosen = " (the stage's node type)" if v.gpu == p.gpu else ""
        lines.append(f"  {v.gpu} {v.capacity_gib:.0f} GiB{chosen}: "
                     + ("fits" if v.fits else v.advice))
    return lines


def render(plans: list[StagePlan], cfg: run_all.RunAllConfig, cluster: Cluster, assume: Assumptions,
           images: float) -> str:
    lines = [f"plan for {images:,.0f} images on {cluster.path} ({cluster.provider}, max_workers {cluster.max_workers})",
             "", *stage_lines(plans, cluster), ""]
    for p in plans:
        rate = "" if math.isnan(p.throughput.value) else f"{p.workers} workers x {p.throughput.value:,.2f} " \
                                                         f"{p.throughput.unit} each; "
        lines.append(f"{p.stage}: {rate}source: {p.throughput.source}")
        lines += [f"  {note}" for note in p.notes]
        lines += [f"  WARNING: {w}" for w in p.warnings]
        if p.memory is not None:
            lines += ["  " + line for line in memory_lines(p, cfg.pretrain if p.stage == "pretrain" else cfg.distill)]
    lines += ["", f"prices: on-demand, approximate: {cluster.price_source}",
              "memory: tipsv2.memory (ZeRO model state as measured in bench/results/train.json; activations "
              "counted from the modules)", "assumptions (override with --set assume.<name>=VALUE):"]
    lines += [f"  {f.name} = {getattr(assume, f.name)}" for f in dataclasses.fields(assume)]
    return "\n".join(lines)


def to_json(plans: list[StagePlan], cluster: Cluster, assume: Assumptions, images: float) -> dict[str, Any]:
    def plain(p: StagePlan) -> dict[str, Any]:
        row = dataclasses.asdict(p)
        if p.memory is not None:
            row["memory"]["total"] = p.memory.total
        return row
    return {"images": images, "cluster": cluster.path, "provider": cluster.provider,
            "prices": cluster.price_source, "assumptions": dataclasses.asdict(assume),
            "stages": [plain(p) for p in plans], "total": total(plans)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"training preset {sorted(PRESETS)}")
    parser.add_argument("--cluster", required=True, help="Ray cluster launcher YAML (cluster/aws.yaml, cluster/gcp.yaml)")
    parser.add_argument("--images", required=True, type=float, help="images in the dataset (1e8 is fine)")
    parser.add_argument("--stage", choices=[s.value for s in STAGES], help="plan one stage (default: all)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value or an assumption (assume.mfu=0.35); repeatable")
    parser.add_argument("--prices", default=str(PRICES), help="on-demand price table (default cluster/prices.yaml)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    stage = Stage(args.stage) if args.stage else None
    try:
        cfg, assume = resolve(args.config, args.sets, stage)
        cluster = read_cluster(args.cluster, Path(args.prices))
        plans = plan(cfg, images=args.images, cluster=cluster, assume=assume,
                     stages=(stage,) if stage else STAGES)
    except ValueError as err:
        parser.exit(2, f"pipelines.plan: error: {err}\n")
    result = to_json(plans, cluster, assume, args.images)
    print(json.dumps(result, indent=2, default=str) if args.json else render(plans, cfg, cluster, assume, args.images))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

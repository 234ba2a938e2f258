"""The two per-block steps around a backend, run in Ray tasks: the anti-join in front, the commit behind.

    read_parquet(images, include_paths) -> plan_block -> backend (caption_images) -> write_block -> counters

once per pass of the job (stage.py runs them in order), each reading and writing every slot of the job.

Each step gets only the config, the output URI and the generation as arguments (a few kB whatever the
dataset's size); what it needs of the output it reads from its own partition (store.py).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipelines import storage
from pipelines.caption import backends
from pipelines.caption.config import CaptionConfig, Status, slots_of
from pipelines.caption.prompts import finish_caption
from pipelines.caption.store import (commit, complete_row, context_digest, partition_name, provenance, read_partition,
                                     received, stamps, todo_of)
from tipsv2.data.schema import Slot

COUNTERS = pa.schema([("images", pa.int64()), ("captions", pa.int64()), ("prompt_tokens", pa.int64()),
                      ("files", pa.int64()), ("ok", pa.int64()), ("rejected", pa.int64()), ("error", pa.int64())])


def plan_block(batch: pa.Table, *, cfg: CaptionConfig, output: str, images_root: str,
               slots: tuple[Slot, ...]) -> pa.Table:
    """Images block (with `path`) -> the images with a granularity of this pass still to do, plus partition,
    todo (comma-joined granularities), previous (the committed row as JSON over every slot of the job, ""
    if none) and context (a later pass's received captions as JSON, "{}" for the first pass)."""
    paths = batch["path"].to_pylist()
    done = {p: read_partition(output, partition_name(p, images_root), slots) for p in set(paths)}
    keep, partitions, todos, previous, contexts = [], [], [], [], []
    current = stamps(cfg)
    for i, (image_id, path) in enumerate(zip(batch["id"].to_pylist(), paths)):
        before = done[path].get(image_id)
        context = received(cfg, before, slots)
        todo = todo_of(cfg, before, current, context_digest(context) if cfg.receives else None)
        if todo:
            keep.append(i)
            partitions.append(partition_name(path, images_root))
            todos.append(",".join(todo))
            previous.append(json.dumps(before) if before else "")
            contexts.append(json.dumps(context))
    out = batch.drop_columns(["path"]).take(pa.array(keep, pa.int64()))
    for name, values in (("partition", partitions), ("todo", todos), ("previous", previous), ("context", contexts)):
        out = out.append_column(name, pa.array(values, pa.string()))
    return out


def ungrounded(cfg: CaptionConfig) -> tuple[None, Status, str]:
    return (None, Status.ERROR, f"no accepted caption of {list(cfg.receives)} for this image to ground pass "
                                f"{cfg.source!r} on (retried on rerun once they have one)")


def write_block(batch: pa.Table, *, cfg: CaptionConfig, output: str, generation: int,
                slots: tuple[Slot, ...]) -> pa.Table:
    """Backend rows -> quality gate -> complete rows committed per partition; returns one counters row.
    A later pass's provenance records the digest of the captions it received (`context`) and of the prompt
    the engine saw (`request`, vllm); an image with none of its received captions gets an error, not a
    caption grounded on nothing."""
    by_partition: dict[str, list[dict[str, Any]]] = {}
    counts = dict.fromkeys(COUNTERS.names, 0)
    fresh = {g.value: provenance(cfg, g, status=Status.OK) for g in cfg.granularities}
    for row in batch.to_pylist():
        raw = json.loads(row["raw"])
        context = json.loads(row["context"] or "{}")
        stamp = ({"context": context_digest(context)} if cfg.receives else {}) | (
            {"request": raw.pop(backends.REQUEST_KEY)} if backends.REQUEST_KEY in raw else {})
        results = {}
        for g in row["todo"].split(","):
            field = raw.get(g) or {"text": None, "error": f"the backend returned no result for {g!r}"}
            results[g] = (ungrounded(cfg) if cfg.receives and not context else
                          finish_caption(field.get("text"), field.get("error") or "", quality=cfg.quality))
            counts[results[g][1].value] += 1
        previous = json.loads(row["previous"]) if row["previous"] else None
        mine = {g: {**prov, **stamp} for g, prov in fresh.items()}
        by_partition.setdefault(row["partition"], []).append(
            complete_row(cfg, row["id"], previous, results, mine, slots))
        counts["captions"] += len(results)
        counts["prompt_tokens"] += row["prompt_tokens"] or 0
    for partition, rows in sorted(by_partition.items()):
        commit(output, partition, generation, rows, slots)
        counts["images"] += len(rows)
        counts["files"] += 1
    return pa.Table.from_pylist([counts], schema=COUNTERS)


def caption_dataset(cfg: CaptionConfig, images_uri: str, output: str, generation: int,
                    slots: tuple[Slot, ...] | None = None):
    """One pass's streaming pipeline as one Ray Dataset of COUNTERS rows (nothing runs until iterated).
    `cfg`: the pass's view (config.passes_of); `slots`: every slot of the job (default: this pass's)."""
    import ray.data

    slots = slots or slots_of(cfg)
    fs, root = storage.filesystem(images_uri)
    columns = backends.REQUEST_COLUMNS + (["image"] if backends.needs_image(cfg) else [])
    small = {"num_cpus": cfg.engine.stage_cpus}
    images = ray.data.read_parquet(root, filesystem=fs, include_paths=True).select_columns([*columns, "path"])
    requests = images.map_batches(plan_block, fn_kwargs={"cfg": cfg, "output": output, "images_root": root,
                                                         "slots": slots},
                                  batch_format="pyarrow", batch_size=None, **small)
    # Blocks of one engine batch: results stream back (commits, watchdog) instead of one block at the end.
    requests = requests.repartition(target_num_rows_per_block=cfg.engine.batch_size)
    raw = backends.caption_images(cfg, requests)
    # One committed file per `shard_rows` images (fewer, larger files; a kill loses at most that much work).
    return raw.map_batches(write_block, fn_kwargs={"cfg": cfg, "output": output, "generation": generation,
                                                   "slots": slots},
                           batch_format="pyarrow", batch_size=cfg.shard_rows, **small)

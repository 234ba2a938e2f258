"""The two per-block steps around a backend, run in Ray tasks: the anti-join in front, the commit behind.

    read_parquet(images, include_paths) -> plan_block -> backend (caption_images) -> write_block -> counters

Each step gets only the config, the output URI and the generation as arguments (a few kB whatever the
dataset's size); what it needs of the output it reads from its own partition (store.py).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipelines import storage
from pipelines.caption import backends
from pipelines.caption.config import CaptionConfig, Status
from pipelines.caption.prompts import finish_caption
from pipelines.caption.store import commit, complete_row, partition_name, provenance, read_partition, stamps, todo_of

COUNTERS = pa.schema([("images", pa.int64()), ("captions", pa.int64()), ("prompt_tokens", pa.int64()),
                      ("files", pa.int64()), ("ok", pa.int64()), ("rejected", pa.int64()), ("error", pa.int64())])


def plan_block(batch: pa.Table, *, cfg: CaptionConfig, output: str, images_root: str) -> pa.Table:
    """Images block (with `path`) -> the images with a granularity still to do, plus partition, todo
    (comma-joined granularities) and previous (the committed row as JSON, "" if none)."""
    paths = batch["path"].to_pylist()
    done = {p: read_partition(output, partition_name(p, images_root), cfg.granularities) for p in set(paths)}
    keep, partitions, todos, previous = [], [], [], []
    current = stamps(cfg)
    for i, (image_id, path) in enumerate(zip(batch["id"].to_pylist(), paths)):
        before = done[path].get(image_id)
        todo = todo_of(cfg, before, current)
        if todo:
            keep.append(i)
            partitions.append(partition_name(path, images_root))
            todos.append(",".join(todo))
            previous.append(json.dumps(before) if before else "")
    out = batch.drop_columns(["path"]).take(pa.array(keep, pa.int64()))
    for name, values in (("partition", partitions), ("todo", todos), ("previous", previous)):
        out = out.append_column(name, pa.array(values, pa.string()))
    return out


def write_block(batch: pa.Table, *, cfg: CaptionConfig, output: str, generation: int) -> pa.Table:
    """Backend rows -> quality gate -> complete rows committed per partition; returns one counters row."""
    by_partition: dict[str, list[dict[str, Any]]] = {}
    counts = dict.fromkeys(COUNTERS.names, 0)
    fresh = {g.value: provenance(cfg, g, status=Status.OK) for g in cfg.granularities}
    for row in batch.to_pylist():
        raw = json.loads(row["raw"])
        results = {}
        for g in row["todo"].split(","):
            field = raw.get(g) or {"text": None, "error": f"the backend returned no result for {g!r}"}
            results[g] = finish_caption(field.get("text"), field.get("error") or "", quality=cfg.quality)
            counts[results[g][1].value] += 1
        previous = json.loads(row["previous"]) if row["previous"] else None
        by_partition.setdefault(row["partition"], []).append(complete_row(cfg, row["id"], previous, results, fresh))
        counts["captions"] += len(results)
        counts["prompt_tokens"] += row["prompt_tokens"] or 0
    for partition, rows in sorted(by_partition.items()):
        commit(output, partition, generation, rows, cfg.granularities)
        counts["images"] += len(rows)
        counts["files"] += 1
    return pa.Table.from_pylist([counts], schema=COUNTERS)


def caption_dataset(cfg: CaptionConfig, images_uri: str, output: str, generation: int):
    """The whole streaming pipeline as one Ray Dataset of COUNTERS rows (nothing runs until iterated)."""
    import ray.data

    fs, root = storage.filesystem(images_uri)
    columns = backends.REQUEST_COLUMNS + (["image"] if backends.needs_image(cfg) else [])
    small = {"num_cpus": cfg.engine.stage_cpus}
    images = ray.data.read_parquet(root, filesystem=fs, include_paths=True).select_columns([*columns, "path"])
    requests = images.map_batches(plan_block, fn_kwargs={"cfg": cfg, "output": output, "images_root": root},
                                  batch_format="pyarrow", batch_size=None, **small)
    # Blocks of one engine batch: results stream back (commits, watchdog) instead of one block at the end.
    requests = requests.repartition(target_num_rows_per_block=cfg.engine.batch_size)
    raw = backends.caption_images(cfg, requests)
    # One committed file per `shard_rows` images (fewer, larger files; a kill loses at most that much work).
    return raw.map_batches(write_block, fn_kwargs={"cfg": cfg, "output": output, "generation": generation},
                           batch_format="pyarrow", batch_size=cfg.shard_rows, **small)

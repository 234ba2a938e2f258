"""Exactly-once output and resume with no per-id state on the driver: a partitioned anti-join.

Layout (one partition per input images Parquet file, named after it):

    <output>/captions/<partition>/part-<generation>-<writer>.parquet   complete rows: id, caption_*, provenance
    <output>/errors/<partition>.parquet                                rewritten from provenance by compaction

The task that reads a block of an input file reads that partition's committed rows (its done-set, a few
thousand rows) and keeps only the images with a granularity still to do (`todo_of`); the writer task writes
its captioned rows into the same partition, one atomic file per block. Ray may run a task twice (a retry
after a lost worker): both files hold complete rows and the latest name wins. `compact_partition` merges a
partition into one file holding every input id of that file exactly once (verified), drops the rest and
rewrites its errors. No step holds more than one partition; the driver holds file names and counters.
A later generation (the run's start time in ns) wins for an id; a rerun skips every (id, granularity)
whose provenance (backend, model, prompt hash) still matches and whose status is not an error.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import re
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.caption.config import Backend, CaptionConfig, Status
from tipsv2.data.schema import ERRORS, Granularity, Slot, caption_column, captions_schema

CAPTIONS_DIR, ERRORS_DIR = "captions", "errors"
PART_RE = re.compile(r"part-(\d+)-(\w+)\.parquet$")
COMPACTED = "compacted"   # writer name of a partition's compacted file


# ---------------------------------------------------------------- provenance and what is still to do

def model_name(cfg: CaptionConfig) -> str:
    if cfg.backend == Backend.TEMPLATE:
        return cfg.template.captions_path or "alt_text_template"
    return cfg.engine.model_source


def prompt_hash(cfg: CaptionConfig, granularity: Granularity | str) -> str:
    """Hash of everything that shapes one granularity's caption besides the model (and, for a later pass, the
    received captions themselves: `context_digest`)."""
    g = Granularity(granularity).value
    if cfg.backend == Backend.TEMPLATE:
        shaped: dict[str, Any] = {"template": getattr(cfg.template, g)}
    else:
        prompt = cfg.prompts.get(g)
        shaped = {"prompt": prompt.text, "max_tokens": prompt.max_tokens, "image_input": cfg.image_input.value,
                  "sampling": dataclasses.asdict(cfg.sampling)}
    if cfg.receives:
        shaped["receives"] = list(cfg.receives)
    return hashlib.sha256(json.dumps(shaped, sort_keys=True).encode()).hexdigest()[:16]


def context_digest(context: dict[str, str]) -> str:
    """Digest of the captions a later pass received for one image: its caption is redone when they change."""
    return hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def provenance(cfg: CaptionConfig, granularity: Granularity | str, *, status: Status, detail: str = "",
               created_at: str | None = None) -> dict[str, Any]:
    return {"source": cfg.source, "backend": cfg.backend.value, "model": model_name(cfg),
            "prompt_hash": prompt_hash(cfg, granularity), "sampling": dataclasses.asdict(cfg.sampling),
            "status": status.value, "detail": detail,
            "created_at": created_at or datetime.datetime.now(datetime.timezone.utc).isoformat()}


def slot_name(cfg: CaptionConfig, granularity: Granularity | str) -> str:
    """The key of one of this pass's captions in a row (its column caption_<key>, its provenance entry)."""
    return Slot(cfg.source, Granularity(granularity)).name


def stamps(cfg: CaptionConfig) -> dict[str, tuple[str, str, str]]:
    """(backend, model, prompt hash) per granularity: what a committed caption must match to be kept.
    Computed once per block, not per row (a hash each)."""
    return {g.value: (cfg.backend.value, model_name(cfg), prompt_hash(cfg, g)) for g in cfg.granularities}


def needs_caption(cfg: CaptionConfig, granularity: Granularity | str, previous: dict[str, Any] | None,
                  stamp: tuple[str, str, str] | None = None, context: str | None = None) -> bool:
    """True when there is no usable caption for this granularity under the current config; for a later pass
    also when the captions it received (`context`, their digest) changed since."""
    if previous is None or previous.get("status") == Status.ERROR.value:
        return True
    stamp = stamp or (cfg.backend.value, model_name(cfg), prompt_hash(cfg, granularity))
    if cfg.receives and previous.get("context") != context:
        return True
    return (previous.get("backend"), previous.get("model"), previous.get("prompt_hash")) != stamp


def todo_of(cfg: CaptionConfig, previous: dict[str, Any] | None,
            current: dict[str, tuple[str, str, str]] | None = None, context: str | None = None) -> list[str]:
    """The granularities of this pass still to caption for one image, given its committed row (None: never
    captioned) and, for a later pass, the digest of the captions it receives now."""
    if previous is None:
        return [g.value for g in cfg.granularities]
    current = current or stamps(cfg)
    prov = previous.get("provenance", {})
    return [g.value for g in cfg.granularities
            if needs_caption(cfg, g, prov.get(slot_name(cfg, g)), current[g.value], context)]


def received(cfg: CaptionConfig, previous: dict[str, Any] | None, slots: tuple[Slot, ...]) -> dict[str, str]:
    """The captions a later pass's prompt quotes for one image: its received sources' accepted captions."""
    if previous is None or not cfg.receives:
        return {}
    prov = previous.get("provenance", {})
    return {s.name: previous[caption_column(s)] for s in slots
            if s.source in cfg.receives and previous.get(caption_column(s))
            and prov.get(s.name, {}).get("status") == Status.OK.value}


def complete_row(cfg: CaptionConfig, image_id: str, previous: dict[str, Any] | None,
                 results: dict[str, tuple[str | None, Status, str]],
                 fresh: dict[str, dict[str, Any]] | None = None, slots: tuple[Slot, ...] | None = None
                 ) -> dict[str, Any]:
    """The image's output row over every slot of the job (`slots`; default this pass's): this pass's fresh
    results where given (keyed by granularity), the committed caption and provenance elsewhere, and no caption
    (nor provenance) for a slot never written yet. `fresh`: {granularity: provenance(...)} of this block,
    status and detail then set per result."""
    fresh = fresh or {g.value: provenance(cfg, g, status=Status.OK) for g in cfg.granularities}
    slots = slots or tuple(Slot(cfg.source, g) for g in cfg.granularities)
    row: dict[str, Any] = {"id": image_id, "provenance": {}}
    for slot in slots:
        column = caption_column(slot)
        g = slot.granularity.value
        if slot.source == cfg.source and g in results:
            caption, status, detail = results[g]
            row[column] = caption
            row["provenance"][slot.name] = {**fresh[g], "status": status.value, "detail": detail}
        elif previous is not None and slot.name in previous["provenance"]:
            row[column] = previous[column]
            row["provenance"][slot.name] = previous["provenance"][slot.name]
        else:
            row[column] = None
    return row


# ---------------------------------------------------------------- partitions: read, write, compact

def partition_name(input_file: str, images_root: str) -> str:
    """The partition of an input file: its path under the images root, without `.parquet`, `/` -> `--`."""
    rel = input_file[len(images_root):].lstrip("/") if input_file.startswith(images_root) else input_file
    return re.sub(r"\.parquet$", "", rel).replace("/", "--")


def partition_uri(output: str, partition: str) -> str:
    return storage.join(output, CAPTIONS_DIR, partition)


def part_name(generation: int, writer: str) -> str:
    return f"part-{generation:020d}-{writer}.parquet"


def partition_files(output: str, partition: str) -> list[str]:
    """Committed files of one partition, oldest first (by generation, then name)."""
    found = []
    for uri in storage.list_files(partition_uri(output, partition), suffixes=(".parquet",)):
        match = PART_RE.search(uri)
        if match:
            found.append((int(match.group(1)), match.group(2) != COMPACTED, uri))
    return [uri for *_, uri in sorted(found)]


def _read_file(uri: str, slots: tuple[Slot | Granularity, ...]) -> list[dict[str, Any]]:
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    for name in (caption_column(s) for s in slots):
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    rows = table.select(["id", *(caption_column(s) for s in slots), "provenance"]).to_pylist()
    for row in rows:
        row["provenance"] = json.loads(row["provenance"])
    return rows


def read_partition(output: str, partition: str, slots: tuple[Slot | Granularity, ...]) -> dict[str, dict[str, Any]]:
    """{id: row} of one partition; for an id in several files the latest wins (its done-set)."""
    latest: dict[str, dict[str, Any]] = {}
    for uri in partition_files(output, partition):
        for row in _read_file(uri, slots):
            latest[row["id"]] = row
    return latest


def write_rows(uri: str, rows: list[dict[str, Any]], slots: tuple[Slot | Granularity, ...]) -> None:
    """Write one file of complete rows atomically."""
    table = pa.Table.from_pylist([{**r, "provenance": json.dumps(r["provenance"], sort_keys=True)} for r in rows],
                                 schema=captions_schema(slots))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def commit(output: str, partition: str, generation: int, rows: list[dict[str, Any]],
           slots: tuple[Slot | Granularity, ...]) -> str:
    """A writer task's rows of one partition as a new file (a unique name: retries never overwrite)."""
    uri = storage.join(partition_uri(output, partition), part_name(generation, uuid.uuid4().hex[:12]))
    write_rows(uri, rows, slots)
    return uri


def errors_table(rows: list[dict[str, Any]]) -> pa.Table:
    errors = []
    for row in rows:
        for g, prov in sorted(row["provenance"].items()):
            if prov["status"] != Status.OK.value:
                errors.append({"id": row["id"], "source": None, "stage": "caption",
                               "reason": f"{prov['status']}_{g}", "detail": prov.get("detail") or prov["status"]})
    return pa.Table.from_pylist(errors, schema=ERRORS)


def compact_partition(item: dict[str, Any], *, output: str, generation: int,
                      slots: tuple[Slot | Granularity, ...]) -> dict[str, Any]:
    """Ray Data map over {partition, input_file}: one file with every input id of the partition exactly once,
    each with every slot of the job (every pass's captions, or their error).

    Returns counters only: rows, missing ids (not captioned by every pass: the caller fails loudly), stale
    ids dropped (captioned but no longer in the input file), errors, and statuses per slot."""
    partition = item["partition"]
    fs, path = storage.filesystem(item["input_file"])
    ids = pq.read_table(path, filesystem=fs, columns=["id"])["id"].to_pylist()
    if len(ids) != len(set(ids)):
        raise ValueError(f"input file {item['input_file']!r} has duplicate ids ({len(ids)} rows, "
                         f"{len(set(ids))} distinct); run pipelines.ingest, it deduplicates")
    files = partition_files(output, partition)
    names = [Slot.of(s).name for s in slots]
    committed = read_partition(output, partition, slots)
    latest = {i: row for i, row in committed.items()
              if all(n in row["provenance"] for n in names)}   # a pass that has not written an id: missing
    rows = [latest[i] for i in ids if i in latest]
    out = {"partition": partition, "input_ids": len(ids), "rows": len(rows), "missing": len(ids) - len(rows),
           "missing_example": next((i for i in ids if i not in latest), ""),
           "stale_ids_dropped": len(set(committed) - set(ids)), "errors": 0, "files_before": len(files),
           "status_counts": json.dumps(_status_counts(rows))}
    if out["missing"]:
        return out   # nothing rewritten: the committed files stay as they are for the next run
    target = storage.join(partition_uri(output, partition), part_name(generation, COMPACTED))
    write_rows(target, rows, slots)
    check = pq.read_table(io.BytesIO(storage.read_bytes(target)), columns=["id"])["id"].to_pylist()
    if sorted(check) != sorted(ids):
        raise RuntimeError(f"compaction check failed for partition {partition!r}: {len(check)} rows for "
                           f"{len(ids)} input ids")
    for uri in files:
        if uri != target:
            storage.delete(uri)
    errors = errors_table(rows)
    buf = io.BytesIO()
    pq.write_table(errors, buf)
    storage.write_bytes(storage.join(output, ERRORS_DIR, f"{partition}.parquet"), buf.getvalue())
    return {**out, "errors": errors.num_rows}


def _status_counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        for g, prov in row["provenance"].items():
            counts.setdefault(g, {}).setdefault(prov["status"], 0)
            counts[g][prov["status"]] += 1
    return counts


def partitions_on_disk(output: str) -> list[str]:
    """Names of the partition directories under captions/ (one listing, not recursive)."""
    fs, path = storage.filesystem(storage.join(output, CAPTIONS_DIR))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

"""Exactly-once output and resume: provenance per (id, granularity), what still needs a caption, and the
files under `<output>/captions/` (each committed atomically, a later generation wins) and `errors/`.

A rerun skips every (id, granularity) whose provenance (backend, model, prompt hash) still matches and whose
status is not an error; the final `compact` leaves every input id exactly once (verified).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.caption.config import Backend, CaptionConfig, Status
from tipsv2.data.schema import ERRORS, Granularity, caption_column, captions_schema

CAPTIONS_DIR, ERRORS_DIR = "captions", "errors"
PART_RE = re.compile(r"part-(\d{6})-(\w+)\.parquet$")
COMPACT_ROWS = 500_000  # rows per file written by the final compaction


# ---------------------------------------------------------------- provenance and the plan

def model_name(cfg: CaptionConfig) -> str:
    if cfg.backend == Backend.TEMPLATE:
        return cfg.template.captions_path or "alt_text_template"
    return cfg.engine.model_source


def prompt_hash(cfg: CaptionConfig, granularity: Granularity | str) -> str:
    """Hash of everything that shapes one granularity's caption besides the model."""
    g = Granularity(granularity).value
    if cfg.backend == Backend.TEMPLATE:
        shaped: dict[str, Any] = {"template": getattr(cfg.template, g)}
    else:
        prompt = cfg.prompts.get(g)
        shaped = {"prompt": prompt.text, "max_tokens": prompt.max_tokens, "image_input": cfg.image_input.value,
                  "sampling": dataclasses.asdict(cfg.sampling)}
    return hashlib.sha256(json.dumps(shaped, sort_keys=True).encode()).hexdigest()[:16]


def provenance(cfg: CaptionConfig, granularity: Granularity | str, *, status: Status, detail: str = "",
               created_at: str | None = None) -> dict[str, Any]:
    return {"backend": cfg.backend.value, "model": model_name(cfg), "prompt_hash": prompt_hash(cfg, granularity),
            "sampling": dataclasses.asdict(cfg.sampling), "status": status.value, "detail": detail,
            "created_at": created_at or datetime.datetime.now(datetime.timezone.utc).isoformat()}


def needs_caption(cfg: CaptionConfig, granularity: Granularity | str, previous: dict[str, Any] | None) -> bool:
    """True when there is no usable caption for this granularity under the current config."""
    if previous is None or previous.get("status") == Status.ERROR.value:
        return True
    return (previous.get("backend"), previous.get("model"), previous.get("prompt_hash")) != (
        cfg.backend.value, model_name(cfg), prompt_hash(cfg, granularity))



def plan(cfg: CaptionConfig, input_ids: list[str], latest: dict[str, dict[str, Any]]) -> pa.Table:
    """(id, granularity) pairs that need a caption under `cfg`."""
    ids, grans = [], []
    for image_id in input_ids:
        previous = latest.get(image_id, {}).get("provenance", {})
        for g in cfg.granularities:
            if needs_caption(cfg, g, previous.get(g.value)):
                ids.append(image_id)
                grans.append(g.value)
    return pa.table({"id": pa.array(ids, pa.string()), "granularity": pa.array(grans, pa.string())})



# ---------------------------------------------------------------- output files: read, commit, compact

def _part_name(generation: int, seq: int | str) -> str:
    return f"part-{generation:06d}-{seq if isinstance(seq, str) else f'{seq:06d}'}.parquet"


def caption_files(output: str) -> list[tuple[int, str]]:
    files = []
    for uri in storage.list_files(storage.join(output, CAPTIONS_DIR), suffixes=(".parquet",)):
        match = PART_RE.search(uri)
        if match:
            files.append((int(match.group(1)), uri))
    return sorted(files)


def read_latest(output: str, granularities: tuple[Granularity, ...]) -> dict[str, dict[str, Any]]:
    """{id: row} from every committed file; for an id in several files the latest generation wins."""
    latest: dict[str, dict[str, Any]] = {}
    columns = [caption_column(g) for g in granularities]
    for _, uri in caption_files(output):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        for name in columns:
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
        for row in table.select(["id", *columns, "provenance"]).to_pylist():
            row["provenance"] = json.loads(row["provenance"])
            latest[row["id"]] = row
    return latest


def commit(output: str, name: str, rows: list[dict[str, Any]], granularities: tuple[Granularity, ...]) -> str:
    """Write one file of complete rows atomically; returns its URI."""
    table = pa.Table.from_pylist(
        [{**r, "provenance": json.dumps(r["provenance"], sort_keys=True)} for r in rows],
        schema=captions_schema(granularities))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = storage.join(output, CAPTIONS_DIR, name)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def errors_table(rows: list[dict[str, Any]]) -> pa.Table:
    errors = []
    for row in rows:
        for g, prov in sorted(row["provenance"].items()):
            if prov["status"] != Status.OK.value:
                errors.append({"id": row["id"], "source": None, "stage": "caption",
                               "reason": f"{prov['status']}_{g}", "detail": prov.get("detail") or prov["status"]})
    return pa.Table.from_pylist(errors, schema=ERRORS)


def compact(output: str, input_ids: list[str], granularities: tuple[Granularity, ...]) -> dict[str, Any]:
    """Rewrite the output so every input id appears exactly once; verify; rewrite errors/ from provenance."""
    files = caption_files(output)
    latest = read_latest(output, granularities)
    missing = [i for i in input_ids if i not in latest]
    if missing:
        raise RuntimeError(f"caption output lacks {len(missing)} of {len(input_ids)} input ids "
                           f"(e.g. {missing[:5]}); rerun the stage to caption them")
    rows = [latest[i] for i in input_ids]
    generation = (files[-1][0] if files else 0) + 1
    written = [commit(output, _part_name(generation, f"c{k // COMPACT_ROWS:05d}"), rows[k:k + COMPACT_ROWS],
                      granularities) for k in range(0, len(rows), COMPACT_ROWS)]
    for _, uri in files:
        storage.delete(uri)
    ids = pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(u)), columns=["id"]) for u in written])
    if ids.num_rows != len(input_ids) or pc.count_distinct(ids["id"]).as_py() != len(set(input_ids)):
        raise RuntimeError(f"compaction check failed: {ids.num_rows} rows for {len(input_ids)} input ids")
    errors = errors_table(rows)
    for uri in storage.list_files(storage.join(output, ERRORS_DIR), suffixes=(".parquet",)):
        storage.delete(uri)
    buf = io.BytesIO()
    pq.write_table(errors, buf)
    storage.write_bytes(storage.join(output, ERRORS_DIR, _part_name(generation, 0)), buf.getvalue())
    return {"rows": ids.num_rows, "files": written, "stale_ids_dropped": len(latest) - len(input_ids),
            "errors": errors.num_rows, "rows_by_status": _status_counts(rows)}


def _status_counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        for g, prov in row["provenance"].items():
            counts.setdefault(g, {}).setdefault(prov["status"], 0)
            counts[g][prov["status"]] += 1
    return counts



class Assembler:
    """Gathers per-granularity results into complete rows and commits them in files of `shard_rows`."""

    def __init__(self, cfg: CaptionConfig, output: str, todo: pa.Table, latest: dict[str, dict[str, Any]],
                 generation: int):
        self.cfg, self.output, self.latest, self.generation = cfg, output, latest, generation
        self.expected: dict[str, set[str]] = {}
        for image_id, g in zip(todo["id"].to_pylist(), todo["granularity"].to_pylist()):
            self.expected.setdefault(image_id, set()).add(g)
        self.pending: dict[str, dict[str, dict[str, Any]]] = {}
        self.ready: list[dict[str, Any]] = []
        self.files: list[str] = []
        self.committed = 0

    def add(self, result: dict[str, Any]) -> None:
        image_id = result["id"]
        got = self.pending.setdefault(image_id, {})
        got[result["granularity"]] = result
        if set(got) >= self.expected[image_id]:
            self.ready.append(self._row(image_id, self.pending.pop(image_id)))
            if len(self.ready) >= self.cfg.shard_rows:
                self.flush()

    def _row(self, image_id: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        previous = self.latest.get(image_id, {})
        row = {"id": image_id, "provenance": {}}
        for g in self.cfg.granularities:
            column = caption_column(g)
            if g.value in results:
                res = results[g.value]
                row[column] = res["caption"]
                row["provenance"][g.value] = provenance(self.cfg, g, status=Status(res["status"]),
                                                        detail=res["detail"])
            else:
                row[column] = previous.get(column)
                row["provenance"][g.value] = previous["provenance"][g.value]
        return row

    def flush(self) -> None:
        if self.ready:
            name = _part_name(self.generation, len(self.files))
            self.files.append(commit(self.output, name, self.ready, self.cfg.granularities))
            self.committed += len(self.ready)
            self.ready = []

"""Ingest images into the images Parquet table (Ray Data): read, decode/validate, dedup, write.

    python -m pipelines.ingest --config default --set source=PATH_OR_S3_PREFIX --output URI

Sources (`source`): a local directory or `s3://` prefix of images (jpg, png, webp, gif: first frame)
with optional sidecar alt-text files (`name.txt`, or `name.json` with an `alt_text`/`caption`/`text` key);
a directory/prefix of tar shards (webdataset style: `key.jpg` + `key.txt`/`key.json`); or a Parquet or
JSONL manifest with a `path` column (local or s3://, relative to the manifest) and optional `alt_text`.

Every image is opened with PIL, verified, fully loaded and converted to RGB (to prove it decodes);
width, height, format and sha256 are recorded and the id is derived from the sha256. Exact duplicates
(same sha256) keep the first in source order. Output: `<output>/images/*.parquet` (schema IMAGES,
row groups sized by encoded bytes), `<output>/errors/*.parquet` (one row per bad input, stage "ingest"),
`<output>/config.json`, `<output>/summary.json`. A rerun with the same config and output is skipped.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import cli, storage
from pipelines.errors import UsageError
from pipelines.lineage import Kind
from pipelines.ingest_read import (IMAGE_SUFFIXES, RGB_CONVERTIBLE_MODES, SIDECAR_SUFFIXES, BadImage, Decoded, Decoder,
                                   Reason, decode_image, image_id)
from pipelines.resources import RESOURCE_REQUESTS, Stage
from pipelines.stage_run import tracked
from pipelines.tracking import TrackingConfig
from tipsv2.data import schema

MANIFEST_SUFFIXES = (".parquet", ".jsonl")
TAR_SUFFIXES = (".tar",)
__all__ = ["BadImage", "Decoded", "Reason", "decode_image", "image_id", "RGB_CONVERTIBLE_MODES", "IngestConfig",
           "SourceKind", "run", "main"]


class SourceKind(str, enum.Enum):
    AUTO = "auto"
    DIRECTORY = "directory"
    TAR = "tar"
    MANIFEST = "manifest"


@dataclasses.dataclass(frozen=True, kw_only=True)
class IngestConfig:
    source: str = ""                          # local dir | s3:// prefix | manifest file (see module doc)
    source_kind: SourceKind = SourceKind.AUTO
    max_pixels: int = 89_478_485              # width * height above this is a decompression bomb (PIL's limit)
    allowed_modes: tuple[str, ...] = RGB_CONVERTIBLE_MODES
    row_group_bytes: int = schema.ROW_GROUP_BYTES   # encoded image bytes per Parquet row group
    file_bytes: int = 384 * 1024 * 1024       # encoded image bytes per Parquet file
    num_cpus_per_task: float = RESOURCE_REQUESTS[Stage.INGEST]["CPU"]   # Ray CPUs per decode task
    read_blocks: int = 0                      # input blocks; 0: about 4 per CPU in the cluster
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)   # its MLflow run (stage_run)


def default() -> IngestConfig:
    return IngestConfig()


PRESETS = {"default": default, "tiny": default, "demo": default}


# ---------------------------------------------------------------- listing the source (driver side)

def source_kind(cfg: IngestConfig) -> SourceKind:
    if cfg.source_kind != SourceKind.AUTO:
        return cfg.source_kind
    if cfg.source.lower().endswith(MANIFEST_SUFFIXES):
        return SourceKind.MANIFEST
    if storage.list_files(cfg.source, suffixes=TAR_SUFFIXES):
        return SourceKind.TAR
    return SourceKind.DIRECTORY


def _stem(uri: str) -> str:
    return uri.rsplit(".", 1)[0]


def list_directory(source: str) -> tuple[list[dict[str, Any]], int]:
    """Work items for a directory of images (+ sidecars); also the number of ignored files."""
    files = storage.list_files(source)
    sidecars = {}
    for uri in files:
        if uri.lower().endswith(SIDECAR_SUFFIXES):
            sidecars.setdefault(_stem(uri), uri)
    images = [u for u in files if u.lower().endswith(IMAGE_SUFFIXES)]
    items = [{"source": uri, "sidecar": sidecars.get(_stem(uri), ""), "alt_text": None, "tar": False}
             for uri in images]
    return items, len(files) - len(images) - len(sidecars)


def list_manifest(source: str) -> list[dict[str, Any]]:
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(source)
    if source.lower().endswith(".parquet"):
        table = pq.read_table(path, filesystem=fs)
    else:
        with fs.open_input_stream(path) as stream:
            table = pajson.read_json(io.BytesIO(stream.read()))
    if "path" not in table.column_names:
        raise UsageError(f"manifest {source!r} has columns {table.column_names}; expected 'path' (+ 'alt_text')")
    base = source.rsplit("/", 1)[0] if "/" in source else "."
    alt = table.column("alt_text").to_pylist() if "alt_text" in table.column_names else [None] * table.num_rows
    items = []
    for rel, text in zip(table.column("path").to_pylist(), alt):
        uri = rel if storage.is_remote(rel) or rel.startswith("/") else storage.join(base, rel)
        items.append({"source": uri, "sidecar": "", "alt_text": text, "tar": False})
    return items


def list_items(cfg: IngestConfig) -> tuple[list[dict[str, Any]], int]:
    if not cfg.source:
        raise ValueError("ingest needs `source` (a directory, s3:// prefix, or .parquet/.jsonl manifest)")
    kind = source_kind(cfg)
    if kind == SourceKind.MANIFEST:
        items, ignored = list_manifest(cfg.source), 0
    elif kind == SourceKind.TAR:
        items = [{"source": u, "sidecar": "", "alt_text": None, "tar": True}
                 for u in storage.list_files(cfg.source, suffixes=TAR_SUFFIXES)]
        ignored = 0
    else:
        items, ignored = list_directory(cfg.source)
    for order, item in enumerate(items):
        item["order"] = order
    return items, ignored


# ---------------------------------------------------------------- dedup + write

def duplicate_keys(meta: pa.Table) -> set[int]:
    """Sort keys of valid rows whose sha256 was already seen at a smaller key (the first one stays)."""
    valid = meta.filter(pc.equal(meta["reason"], "")).sort_by([("key", "ascending")])
    seen: set[str] = set()
    dupes = set()
    for sha, key in zip(valid["sha256"].to_pylist(), valid["key"].to_pylist()):
        if sha in seen:
            dupes.add(key)
        seen.add(sha)
    return dupes


def images_block(batch: pa.Table, *, dupes: pa.Array) -> pa.Table:
    """map_batches: keep valid, first-seen rows, cast to the IMAGES schema."""
    keep = pc.and_(pc.equal(batch["reason"], ""), pc.invert(pc.is_in(batch["key"], dupes)))
    batch = batch.filter(keep).sort_by([("key", "ascending")])
    return batch.select(schema.IMAGES.names).cast(schema.IMAGES)


def errors_block(batch: pa.Table) -> pa.Table:
    batch = batch.filter(pc.not_equal(batch["reason"], ""))
    stage = pa.array(["ingest"] * batch.num_rows, pa.string())
    return pa.table({"id": batch["id"], "source": batch["source"], "stage": stage, "reason": batch["reason"],
                     "detail": batch["detail"]}).cast(schema.ERRORS)


def rows_per_group(cfg: IngestConfig, mean_bytes: float) -> tuple[int, int]:
    """(rows per row group, rows per file) for encoded images of `mean_bytes` on average."""
    group = max(1, int(cfg.row_group_bytes // max(mean_bytes, 1.0)))
    per_file = max(group, int(cfg.file_bytes // max(mean_bytes, 1.0)) // group * group)
    return group, per_file


def _write(ds, uri: str, **kwargs) -> None:
    import ray.data

    fs, path = storage.filesystem(uri)
    storage.delete(uri)
    ds.write_parquet(path, filesystem=fs, mode=ray.data.SaveMode.OVERWRITE, **kwargs)


def _ray_blocks(n_items: int, requested: int) -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(n_items, requested or 4 * cpus))


@tracked("ingest", writes=(Kind.IMAGES, "images_path"))   # an MLflow run; inputs checked before Ray starts
def run(cfg: IngestConfig, output: str) -> dict[str, Any]:
    import ray
    import ray.data

    clock = cli.Stopwatch()
    previous = cli.done_before(storage.join(output, cli.SUMMARY_FILE), cfg)
    if previous is not None and previous.get("stage") == "ingest":
        return {**previous, "skipped": True}
    phases = Phases()   # seconds per phase: where an ingest's time goes (bench/caption.py reports them)
    items, ignored = list_items(cfg)
    if not items:   # before Ray starts: nothing to do is a usage error, found in a second
        raise UsageError(f"source={cfg.source!r}: no images, tar shards or manifest rows found there "
                         f"({ignored} other files); expected image files, .tar shards or a Parquet/JSONL manifest")
    phases.lap("list")
    cli.init_ray()
    ds = ray.data.from_items(items, override_num_blocks=_ray_blocks(len(items), cfg.read_blocks))
    decoded = ds.flat_map(Decoder(max_pixels=cfg.max_pixels, allowed_modes=cfg.allowed_modes),
                          num_cpus=cfg.num_cpus_per_task).materialize()
    phases.lap("read_decode_hash")
    meta = pa.concat_tables(ray.get(decoded.select_columns(["key", "sha256", "reason", "nbytes"]).to_arrow_refs()))
    dupes = duplicate_keys(meta)
    phases.lap("dedup")
    valid = meta.filter(pc.equal(meta["reason"], ""))
    mean_bytes = pc.mean(valid["nbytes"]).as_py() if valid.num_rows else 1.0
    group, per_file = rows_per_group(cfg, mean_bytes)
    images_uri, errors_uri = storage.join(output, "images"), storage.join(output, "errors")
    images = decoded.map_batches(images_block, fn_kwargs={"dupes": pa.array(sorted(dupes), pa.int64())},
                                 batch_format="pyarrow", batch_size=None)
    _write(images, images_uri, row_group_size=group, min_rows_per_file=group, max_rows_per_file=per_file)
    phases.lap("write_images")
    errors = decoded.select_columns(["id", "source", "reason", "detail"]).map_batches(
        errors_block, batch_format="pyarrow", batch_size=None)
    _write(errors, errors_uri)
    phases.lap("write_errors")
    reasons = meta.filter(pc.not_equal(meta["reason"], "")).group_by("reason").aggregate([("key", "count")])
    summary = cli.done_record(cfg, **{
        "stage": "ingest", "source": cfg.source, "source_kind": source_kind(cfg).value,
        "read": {"items": len(items), "ignored_files": ignored, "samples": meta.num_rows},
        "written": {"images": valid.num_rows - len(dupes), "errors": meta.num_rows - valid.num_rows,
                    "images_path": images_uri, "errors_path": errors_uri},
        "duplicates_dropped": len(dupes),
        "errors_by_reason": dict(zip(reasons["reason"].to_pylist(), reasons["key_count"].to_pylist())),
        "row_group_rows": group, "mean_image_bytes": mean_bytes, "mlflow_run_id": None,
        "phases_s": phases.seconds, "wall_time_s": clock.seconds(),
    })
    cli.write_resolved_config(output, cfg)
    cli.write_summary(output, summary)
    return summary


class Phases:
    """Wall seconds between successive laps, by name."""

    def __init__(self) -> None:
        self.last, self.seconds = time.perf_counter(), {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 3)
        self.last = now


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.stage_main(argv, PRESETS, run, description=__doc__, stage="ingest")


if __name__ == "__main__":
    main()

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
import hashlib
import io
import json
import posixpath
import tarfile
import warnings
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import cli, storage
from pipelines.resources import RESOURCE_REQUESTS, Stage
from pipelines.stage_run import tracked
from tipsv2.data import schema

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
SIDECAR_SUFFIXES = (".txt", ".json")
MANIFEST_SUFFIXES = (".parquet", ".jsonl")
TAR_SUFFIXES = (".tar",)
ALT_TEXT_KEYS = ("alt_text", "caption", "text")
ID_HEX_CHARS = 32  # 128 bits of the sha256
TAR_MEMBER_BITS = 24  # sort key = shard order << 24 | member order (up to 16M samples per shard)


class SourceKind(str, enum.Enum):
    AUTO = "auto"
    DIRECTORY = "directory"
    TAR = "tar"
    MANIFEST = "manifest"


class Reason(str, enum.Enum):
    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    DECOMPRESSION_BOMB = "decompression_bomb"
    UNSUPPORTED_MODE = "unsupported_mode"
    UNREADABLE = "unreadable"


# Modes that convert to RGB without silently clipping values (16-bit and float images would).
RGB_CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "La", "CMYK", "YCbCr")


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


def default() -> IngestConfig:
    return IngestConfig()


PRESETS = {"default": default, "tiny": default, "demo": default}


class BadImage(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decoded:
    format: str
    width: int   # pixels
    height: int  # pixels


def decode_image(data: bytes, *, max_pixels: int, allowed_modes: tuple[str, ...]) -> Decoded:
    """Verify, fully load and convert to RGB; raise BadImage(reason, detail) on any failure."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage(Reason.EMPTY_FILE, "0 bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height, fmt, mode = im.width, im.height, im.format, im.mode
                if width * height > max_pixels:
                    raise BadImage(Reason.DECOMPRESSION_BOMB,
                                   f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
                im.verify()
            if mode not in allowed_modes:
                raise BadImage(Reason.UNSUPPORTED_MODE, f"mode {mode!r} not in allowed_modes {list(allowed_modes)}")
            with Image.open(io.BytesIO(data)) as im:
                im.seek(0)  # first frame of animations
                im.load()
                rgb = im.convert("RGB")
                rgb.getpixel((0, 0))
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise BadImage(Reason.DECOMPRESSION_BOMB, str(err)) from None
        except UnidentifiedImageError as err:
            raise BadImage(Reason.NOT_AN_IMAGE, str(err)) from None
        except (OSError, SyntaxError, EOFError) as err:
            raise BadImage(Reason.TRUNCATED, f"{type(err).__name__}: {err}") from None
        except ValueError as err:
            raise BadImage(Reason.UNSUPPORTED_MODE, f"mode {mode!r}: {err}") from None
    return Decoded(format=str(fmt), width=int(width), height=int(height))


def image_id(sha256: str) -> str:
    return sha256[:ID_HEX_CHARS]


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
        raise ValueError(f"manifest {source!r} has columns {table.column_names}; expected 'path' (+ 'alt_text')")
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


# ---------------------------------------------------------------- reading + decoding (Ray tasks)

def _alt_text_from_sidecar(name: str, data: bytes) -> str | None:
    text = data.decode("utf-8", errors="replace")
    if name.lower().endswith(".json"):
        obj = json.loads(text)
        for key in ALT_TEXT_KEYS:
            if isinstance(obj, dict) and isinstance(obj.get(key), str):
                return obj[key].strip()
        return None
    return text.strip() or None


def _tar_samples(data: bytes) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(member name, image bytes, alt-text) for each image in a webdataset-style tar shard, in order."""
    groups: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = posixpath.basename(member.name)
            key = posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0])
            group = groups.setdefault(key, {"image": None, "alt": None, "name": None})
            payload = tar.extractfile(member).read()
            if base.lower().endswith(IMAGE_SUFFIXES) and group["name"] is None:
                group["image"], group["name"] = payload, member.name
            elif base.lower().endswith(SIDECAR_SUFFIXES):
                group["alt"] = _alt_text_from_sidecar(base, payload)
    for group in groups.values():
        if group["name"] is not None:
            yield group["name"], group["image"], group["alt"]


class Decoder:
    """flat_map function: one work item (a file or a tar shard) -> rows, valid or error."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg

    def __call__(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            data = storage.read_bytes(item["source"])
        except Exception as err:  # a missing object, a permission or network error: record, go on
            return [self._error(item["source"], item["order"] << TAR_MEMBER_BITS, Reason.UNREADABLE,
                                f"{type(err).__name__}: {err}")]
        if not item["tar"]:
            alt = item["alt_text"]
            if item["sidecar"]:
                alt = self._read_sidecar(item["sidecar"], alt)
            return [self._row(item["source"], item["order"] << TAR_MEMBER_BITS, data, alt)]
        try:
            samples = list(_tar_samples(data))
        except (tarfile.TarError, EOFError, OSError) as err:
            return [self._error(item["source"], item["order"] << TAR_MEMBER_BITS, Reason.UNREADABLE,
                                f"bad tar shard: {type(err).__name__}: {err}")]
        return [self._row(f"{item['source']}#{name}", (item["order"] << TAR_MEMBER_BITS) + i, payload, alt)
                for i, (name, payload, alt) in enumerate(samples)]

    @staticmethod
    def _read_sidecar(uri: str, fallback: str | None) -> str | None:
        try:
            return _alt_text_from_sidecar(uri, storage.read_bytes(uri))
        except (OSError, ValueError):
            return fallback

    def _row(self, source: str, key: int, data: bytes, alt: str | None) -> dict[str, Any]:
        try:
            decoded = decode_image(data, max_pixels=self.cfg.max_pixels, allowed_modes=self.cfg.allowed_modes)
        except BadImage as bad:
            return self._error(source, key, bad.reason, bad.detail)
        sha = hashlib.sha256(data).hexdigest()
        return {"id": image_id(sha), "image": data, "format": decoded.format, "width": decoded.width,
                "height": decoded.height, "alt_text": alt, "source": source, "sha256": sha, "key": key,
                "nbytes": len(data), "reason": "", "detail": ""}

    @staticmethod
    def _error(source: str, key: int, reason: Reason, detail: str) -> dict[str, Any]:
        return {"id": None, "image": b"", "format": "", "width": 0, "height": 0, "alt_text": None,
                "source": source, "sha256": "", "key": key, "nbytes": 0, "reason": reason.value,
                "detail": detail}


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


@tracked("ingest")   # an MLflow run; inputs checked before Ray starts
def run(cfg: IngestConfig, output: str) -> dict[str, Any]:
    import ray
    import ray.data

    clock = cli.Stopwatch()
    previous = _previous_summary(cfg, output)
    if previous is not None:
        return previous
    cli.init_ray()
    items, ignored = list_items(cfg)
    if not items:
        raise ValueError(f"no images, tar shards or manifest rows found under {cfg.source!r}")
    ds = ray.data.from_items(items, override_num_blocks=_ray_blocks(len(items), cfg.read_blocks))
    decoded = ds.flat_map(Decoder(cfg), num_cpus=cfg.num_cpus_per_task).materialize()
    meta = pa.concat_tables(ray.get(decoded.select_columns(["key", "sha256", "reason", "nbytes"]).to_arrow_refs()))
    dupes = duplicate_keys(meta)
    valid = meta.filter(pc.equal(meta["reason"], ""))
    mean_bytes = pc.mean(valid["nbytes"]).as_py() if valid.num_rows else 1.0
    group, per_file = rows_per_group(cfg, mean_bytes)
    images_uri, errors_uri = storage.join(output, "images"), storage.join(output, "errors")
    images = decoded.map_batches(images_block, fn_kwargs={"dupes": pa.array(sorted(dupes), pa.int64())},
                                 batch_format="pyarrow", batch_size=None)
    _write(images, images_uri, row_group_size=group, min_rows_per_file=group, max_rows_per_file=per_file)
    errors = decoded.map_batches(errors_block, batch_format="pyarrow", batch_size=None)
    _write(errors, errors_uri)
    reasons = meta.filter(pc.not_equal(meta["reason"], "")).group_by("reason").aggregate([("key", "count")])
    summary = {
        "stage": "ingest", "source": cfg.source, "source_kind": source_kind(cfg).value,
        "read": {"items": len(items), "ignored_files": ignored, "samples": meta.num_rows},
        "written": {"images": valid.num_rows - len(dupes), "errors": meta.num_rows - valid.num_rows,
                    "images_path": images_uri, "errors_path": errors_uri},
        "duplicates_dropped": len(dupes),
        "errors_by_reason": dict(zip(reasons["reason"].to_pylist(), reasons["key_count"].to_pylist())),
        "row_group_rows": group, "mean_image_bytes": mean_bytes, "mlflow_run_id": None,
        "wall_time_s": clock.seconds(),
    }
    cli.write_resolved_config(output, cfg)
    cli.write_summary(output, summary)
    return summary


def _previous_summary(cfg: IngestConfig, output: str) -> dict[str, Any] | None:
    """The summary of an earlier, finished run with the same config and output (then nothing to do)."""
    from tipsv2 import config_tree

    config_uri, summary_uri = storage.join(output, cli.CONFIG_FILE), storage.join(output, cli.SUMMARY_FILE)
    if not (storage.exists(config_uri) and storage.exists(summary_uri)):
        return None
    if storage.read_json(config_uri) != json.loads(json.dumps(config_tree.to_dict(cfg))):
        return None
    summary = storage.read_json(summary_uri)
    if summary.get("stage") != "ingest":
        return None
    return {**summary, "skipped": True}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.stage_main(argv, PRESETS, run, description=__doc__, stage="ingest")


if __name__ == "__main__":
    main()

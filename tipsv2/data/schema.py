"""Parquet schemas shared by every stage (versioned: bump SCHEMA_VERSION on any change).

images:   one row per unique image; `image` holds the original encoded bytes.
captions: one row per image id; one nullable `caption_<granularity>` column per granularity, plus
          provenance (JSON string: backend, model, prompt hash, sampling parameters, created_at),
          one entry per granularity so that a changed prompt recaptions only that granularity.
errors:   one row per rejected input or output; the job that wrote it went on.
"""

from __future__ import annotations

import enum
from typing import Any

SCHEMA_VERSION = 1


class Granularity(str, enum.Enum):
    SHORT = "short"
    MEDIUM = "medium"
    LONG = "long"


DEFAULT_GRANULARITIES: tuple[Granularity, ...] = (Granularity.SHORT, Granularity.MEDIUM, Granularity.LONG)


ID_HEX_CHARS = 32  # an image id: the first 128 bits of its bytes' sha256, in hex


def image_id(sha256: str) -> str:
    """The id of an image whose bytes hash to `sha256` (hex): stable, and equal for equal bytes."""
    return sha256[:ID_HEX_CHARS]


def caption_column(granularity: Granularity | str) -> str:
    return f"caption_{Granularity(granularity).value}"


def captions_schema(granularities: tuple[Granularity, ...] = DEFAULT_GRANULARITIES) -> pa.Schema:
    import pyarrow as pa

    fields = [pa.field("id", pa.string(), nullable=False)]
    fields += [pa.field(caption_column(g), pa.string(), nullable=True) for g in granularities]
    fields.append(pa.field("provenance", pa.string(), nullable=False))  # JSON: {granularity: {...}}
    return pa.schema(fields, metadata={"tipsv2.schema": "captions",
                                       "tipsv2.schema_version": str(SCHEMA_VERSION)})


def _images() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        pa.field("id", pa.string(), nullable=False),          # stable: derived from the content hash
        pa.field("image", pa.binary(), nullable=False),       # original encoded bytes
        pa.field("format", pa.string(), nullable=False),      # PIL format name, e.g. "JPEG"
        pa.field("width", pa.int32(), nullable=False),        # pixels
        pa.field("height", pa.int32(), nullable=False),       # pixels
        pa.field("alt_text", pa.string(), nullable=True),
        pa.field("source", pa.string(), nullable=False),      # URI the bytes came from
        pa.field("sha256", pa.string(), nullable=False),      # hex digest of `image`
    ], metadata={"tipsv2.schema": "images", "tipsv2.schema_version": str(SCHEMA_VERSION)})


def _errors() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        pa.field("id", pa.string(), nullable=True),           # the row id when one exists
        pa.field("source", pa.string(), nullable=True),       # else where the input came from
        pa.field("stage", pa.string(), nullable=False),       # ingest | caption | ...
        pa.field("reason", pa.string(), nullable=False),      # short machine-readable kind
        pa.field("detail", pa.string(), nullable=False),      # human-readable message
    ], metadata={"tipsv2.schema": "errors", "tipsv2.schema_version": str(SCHEMA_VERSION)})


# IMAGES and ERRORS are built on first use (PEP 562), so importing tipsv2 needs no pyarrow: the GPU
# step bench (bench/gpu_step.py) runs where only torch is installed.
SCHEMAS = {"IMAGES": _images, "ERRORS": _errors}


def __getattr__(name: str) -> Any:
    if name in SCHEMAS:
        value = globals()[name] = SCHEMAS[name]()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Row groups sized for image bytes: about 64-128 MB of encoded images per group.
ROW_GROUP_BYTES = 96 * 1024 * 1024

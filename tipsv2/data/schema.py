"""Parquet schemas shared by every stage (versioned: bump SCHEMA_VERSION on any change).

images:   one row per unique image; `image` holds the original encoded bytes.
captions: one row per image id; one nullable `caption_<granularity>` column per granularity of the main
          source (`caption_<source>_<granularity>` for another source: a later caption pass), plus
          provenance (JSON string: source, backend, model, prompt hash, sampling parameters, created_at),
          one entry per slot so that a changed prompt recaptions only that slot.
errors:   one row per rejected input or output; the job that wrote it went on.
"""

from __future__ import annotations

import dataclasses
import enum
import re
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


# Caption sources: a caption job's passes (pipelines.caption), each a model and prompt. The main source's captions
# are `caption_<granularity>` (one pass, or the pass named main); another source's are `caption_<source>_<granularity>`.
MAIN_SOURCE = "main"
SOURCE_NAME = re.compile(r"[a-z][a-z0-9]*")
_SLOT = re.compile(rf"(?:({SOURCE_NAME.pattern})_)?({'|'.join(g.value for g in Granularity)})")


def check_source(name: str) -> str:
    if not SOURCE_NAME.fullmatch(name):
        raise ValueError(f"caption source name {name!r}: expected a lowercase word of letters and digits "
                         "starting with a letter (it names Parquet columns: caption_<source>_<granularity>)")
    return name


@dataclasses.dataclass(frozen=True)
class Slot:
    """One caption of an image: a source's caption at one granularity. Slots sort with the main source
    first, then by source name, and by granularity short, medium, long (columns, prompts, fallbacks)."""
    source: str
    granularity: Granularity

    def __lt__(self, other: Slot) -> bool:
        return self._key() < other._key()

    def _key(self) -> tuple[bool, str, int]:
        return self.source != MAIN_SOURCE, self.source, list(Granularity).index(Granularity(self.granularity))

    @property
    def name(self) -> str:
        """"short" for the main source, "b_long" for source b: the column's and provenance's key."""
        g = Granularity(self.granularity).value
        return g if self.source == MAIN_SOURCE else f"{self.source}_{g}"

    @classmethod
    def of(cls, key: Slot | Granularity | str) -> Slot:
        """A Slot from itself, a granularity (the main source) or a name ("long", "b_long")."""
        if isinstance(key, Slot):
            return key
        match = _SLOT.fullmatch(Granularity(key).value if isinstance(key, Granularity) else key)
        if match is None:
            raise ValueError(f"caption {key!r}: expected a granularity ({[g.value for g in Granularity]}) or "
                             "<source>_<granularity>")
        return cls(match.group(1) or MAIN_SOURCE, Granularity(match.group(2)))


def caption_column(key: Slot | Granularity | str) -> str:
    return f"caption_{Slot.of(key).name}"


def caption_slot(column: str) -> Slot | None:
    """The slot a column holds (caption_short, caption_b_long), None for any other column."""
    try:
        return Slot.of(column.removeprefix("caption_")) if column.startswith("caption_") else None
    except ValueError:
        return None


def captions_schema(slots: tuple[Slot | Granularity, ...] = DEFAULT_GRANULARITIES) -> pa.Schema:
    import pyarrow as pa

    fields = [pa.field("id", pa.string(), nullable=False)]
    fields += [pa.field(caption_column(s), pa.string(), nullable=True) for s in slots]
    fields.append(pa.field("provenance", pa.string(), nullable=False))  # JSON: {slot name: {...}}
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

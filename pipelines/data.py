"""Training data, driver side: image + caption Parquet (local or s3://) -> the source, the texts, the records.

    source = prepare_source(cfg.data, output)           # synthetic scenes written first if no Parquet
    texts = read_texts(source)                           # ids + alt-text + captions, joined by id
    datasets, read = lineage.read_source(source)         # or: digests and texts from one read of each set
    texts = read_texts(source, read)

Join. The caption Parquet is text only (about 1 KB a row): the driver reads `id` + `caption_*` columns
with pyarrow, left-joins them onto the image ids and alt-texts, and puts the table in the object store;
the workers' decode tasks (`pipelines.stream`) look captions up by id. (Ray Data's own `Dataset.join`
needs polars, not a dependency.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.errors import UsageError
from tipsv2.data.captions import CaptionSamplingConfig, example_rng, sample_caption
from tipsv2.data.schema import Granularity, Slot, caption_column, caption_slot
from tipsv2.data.synthetic import Split, write_parquet
from tipsv2.loop import Record

SYNTHETIC_DIR = "data/synthetic"
SYNTHETIC_DONE = "_written.json"
CAPTION_COLUMNS = [caption_column(g) for g in Granularity]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Source:
    images: str                  # URI of the image Parquet (schema IMAGES)
    captions: str | None         # URI of the caption Parquet (id + caption_<granularity>), joined by id
    validation: str | None = None  # URI of held-out image Parquet (heatmaps); None: the first training rows


# ---------------------------------------------------------------- driver side


def prepare_source(data_cfg, output: str) -> Source:
    """The configured Parquet, or synthetic scenes written once under `<output>/data/synthetic`."""
    if data_cfg.images:
        return Source(images=data_cfg.images, captions=data_cfg.captions_uri)
    if data_cfg.captions_uri:
        raise ValueError(f"data.captions_uri={data_cfg.captions_uri!r} needs data.images (the image Parquet "
                         "it joins onto); got data.images=None")
    root = storage.join(output, SYNTHETIC_DIR)
    if not storage.exists(storage.join(root, SYNTHETIC_DONE)):
        fs, path = storage.filesystem(root)
        written = write_parquet(path, data_cfg.synthetic, filesystem=fs, splits=(Split.TRAIN, Split.VAL))
        storage.write_json(storage.join(root, SYNTHETIC_DONE), {"splits": {k: v["rows"] for k, v in written.items()}})
    # The ground-truth table carries caption_<granularity> columns keyed by id: it is the caption Parquet.
    return Source(images=storage.join(root, "train", "images"), captions=storage.join(root, "train", "ground_truth"),
                  validation=storage.join(root, "val", "images"))


def _read(uri: str, columns: list[str] | None, read: dict[str, pa.Table] | None = None) -> pa.Table:
    """`columns` of the Parquet at `uri`, from `read` (tables read before, by URI) where it holds them."""
    if read and uri in read:
        missing = [c for c in columns or [] if c not in read[uri].column_names]
        if not missing:
            return read[uri].select(columns) if columns else read[uri]
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type.name == "NotFound":
        raise ValueError(f"no Parquet at {uri!r}")
    return pq.read_table(path, filesystem=fs, columns=columns)


def _columns(uri: str, read: dict[str, pa.Table] | None = None) -> list[str]:
    """The column names of the Parquet at `uri`: its schema's, or those of its table in `read` (enough for
    read_texts: lineage.read takes every id and caption column there is)."""
    if read and uri in read:
        return read[uri].column_names
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(uri)
    return pads.dataset(path, filesystem=fs, format="parquet").schema.names


def read_texts(source: Source, read: dict[str, pa.Table] | None = None) -> pa.Table:
    """(id, alt_text, caption_*) for every image id, sorted by id; captions null where none was written.
    UsageError when the sets cannot train (check_texts).

    `read`: tables already read by URI (`pipelines.lineage.read_source`, whose columns include these); a set
    found there is not read again."""
    images = _read(source.images, ["id", "alt_text"], read)
    if images.num_rows == 0:
        raise UsageError(f"image Parquet {source.images!r} has no rows")
    ids = images.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        raise UsageError(f"image Parquet {source.images!r} repeats ids; run pipelines.ingest (it deduplicates)")
    captions = None
    if source.captions is None:
        texts = images.append_column("caption_short", pa.nulls(images.num_rows, pa.string()))
    else:
        names = _columns(source.captions, read)
        present = caption_columns(names)
        if "id" not in names or not present:
            raise UsageError(f"caption Parquet {source.captions!r} needs an id column and one of {CAPTION_COLUMNS} "
                             f"(or caption_<source>_<granularity>); found {names}")
        captions = _read(source.captions, ["id", *present], read)
        if captions.num_rows != len(set(captions.column("id").to_pylist())):
            raise UsageError(f"caption Parquet {source.captions!r} repeats ids; expected one row per image id "
                             "(pipelines.caption compacts its output to exactly one)")
        texts = images.join(captions, keys="id", join_type="left outer")
    for column in CAPTION_COLUMNS:
        if column not in texts.column_names:
            texts = texts.append_column(column, pa.nulls(texts.num_rows, pa.string()))
    texts = texts.select(["id", "alt_text", *caption_columns(texts.column_names)]).sort_by("id")
    check_texts(texts, source, captions)
    return texts


def has_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Per row: a text that is not null, empty or whitespace (what tipsv2.data.captions counts as present)."""
    return pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(column), ""), False)


def check_texts(texts: pa.Table, source: Source, captions: pa.Table | None) -> None:
    """UsageError when the texts cannot train as the user meant: a caption set that names none of the images (CLS2
    would silently train on alt-text), one whose every caption is empty, or no text at all on any row."""
    captioned = functools.reduce(pc.or_, [has_text(texts[c]) for c in caption_columns(texts.column_names)])
    if captions is not None and captions.num_rows:
        matched = pc.sum(pc.is_in(texts["id"], value_set=captions["id"])).as_py() or 0
        if matched == 0:
            raise UsageError(
                f"caption Parquet {source.captions!r} ({captions.num_rows} rows) shares no id with image Parquet "
                f"{source.images!r} (caption ids such as {captions['id'][0].as_py()!r}, image ids such as "
                f"{texts['id'][0].as_py()!r}); expected the captions pipelines.caption wrote for these images")
        if not pc.any(captioned).as_py():
            raise UsageError(f"caption Parquet {source.captions!r}: every caption of the {matched} images it names "
                             "is empty; CLS2 would train on alt-text only. Recaption (pipelines.caption), or train "
                             "without it (data.captions_uri unset)")
    if not pc.any(pc.or_(captioned, has_text(texts["alt_text"]))).as_py():
        raise UsageError(f"no image of {source.images!r} has an alt-text or a caption: nothing to train the text "
                         "tower on; expected alt_text in the images or a caption Parquet (data.captions_uri)")


def caption_columns(names: list[str]) -> list[str]:
    """The caption columns among `names`: the main source's granularities, then other sources' by name."""
    return sorted((n for n in names if caption_slot(n) is not None), key=caption_slot)


def captions_of(row: dict) -> dict[Slot, str | None]:
    return {slot: row[name] for name in row if (slot := caption_slot(name)) is not None}


def source_counts(texts: pa.Table, cfg: CaptionSamplingConfig, *, epoch: int = 0, limit: int = 100_000
                  ) -> dict[str, Any]:
    """What CLS2 trains on in `epoch`, by caption source ("alt_text" where it falls back to the alt-text), over
    the first `limit` rows by id: the per-example draws are seeded by (seed, epoch, id) alone, so the driver
    counts them without the stream."""
    counts: dict[str, int] = {}
    rows = texts.slice(0, limit).to_pylist()
    for row in rows:
        rng = example_rng(seed=cfg.seed, epoch=epoch, example_id=row["id"], stream="caption")
        drawn = sample_caption(row["alt_text"], captions_of(row), rng=rng, cfg=cfg, example_id=row["id"])
        key = drawn.source or "alt_text"
        counts[key] = counts.get(key, 0) + 1
    return {"epoch": epoch, "rows": len(rows), "of_rows": texts.num_rows, "sources": dict(sorted(counts.items()))}


def read_records(source: Source, texts: pa.Table | None = None) -> list[Record]:
    """Every row as a tipsv2.loop.Record, sorted by id (the single-process path; no Ray)."""
    texts = texts if texts is not None else read_texts(source)
    images = _read(source.images, ["id", "image"])
    image_of = dict(zip(images.column("id").to_pylist(), images.column("image").to_pylist()))
    return [Record(id=row["id"], image=image_of[row["id"]], alt_text=row["alt_text"], captions=captions_of(row))
            for row in texts.to_pylist()]


def read_validation(source: Source, count: int) -> list[Record]:
    """A few held-out rows for heatmaps (the first training rows when there is no held-out split)."""
    if source.validation is None:
        return read_records(source)[:count]
    images = _read(source.validation, ["id", "image", "alt_text"]).slice(0, count)
    return [Record(id=r["id"], image=r["image"], alt_text=r["alt_text"], captions={})
            for r in images.to_pylist()]


def texts_for_tokenizer(texts: pa.Table) -> list[str]:
    return [t for column in ["alt_text", *caption_columns(texts.column_names)] for t in texts.column(column).to_pylist()
            if t]

"""Caption lineage: the image and caption Parquet a stage wrote or a training run read, as MLflow datasets.

    images, captions = describe_source(source)                  # digest + profile of each Parquet set
    check_resume(output, [images, captions], policy=cfg.data.on_caption_change, resuming=True)
    log_inputs(sink, [images, captions], context=TRAINING)       # the run's inputs, context `training`
    log_output(Kind.CAPTIONS, storage.join(output, "captions"), summary, stage="caption")   # a stage's output

Digest: sha256 (first 16 hex digits) of the rows a training run reads, whatever the file layout, so a
compaction that rewrites the same rows keeps it:
- captions: `id` and every `caption_<granularity>` column, rows sorted by id;
- images: `id`, `sha256` and `alt_text`, rows sorted by id (id and sha256 are hashes of the image bytes,
  so the bytes need no second read).
Profile (the dataset's `profile` in MLflow, JSON): the Parquet files (path, bytes, rows; the first
MAX_FILES of them), row count, schema name and version, and for captions the provenance summary: one
entry per (granularity, backend, model, prompt hash, sampling parameters, status) with its row count.

A resumed run (pipelines/train/driver.py) compares the caption digest with the one in
`<output>/lineage.json`, written when the run started: a changed caption set fails with both digests
(`data.on_caption_change=fail`, the default) or warns and logs the new set (`warn`).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import warnings
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.errors import UsageError
from pipelines.tracking import MetricsSink
from tipsv2.configs import CaptionChange
from tipsv2.data.schema import Granularity, caption_column, caption_slot

log = logging.getLogger(__name__)

LINEAGE_FILE = "lineage.json"          # <output>/lineage.json: the datasets a training run started on
TRAINING, OUTPUT = "training", "output"   # MLflow dataset contexts: read by training, written by a stage
DIGEST_TAG = "tipsv2.{kind}.digest"    # run tag beside the dataset input, for pipelines.compare
MAX_FILES = 200                         # files listed in a profile (the count is always there)
VOLATILE = r'("(?:created_at|detail)": )"(?:[^"\\]|\\.)*"'   # provenance fields that differ per row


class Kind(str, enum.Enum):
    IMAGES = "images"
    CAPTIONS = "captions"


CONTENT = {Kind.IMAGES: ["id", "sha256", "alt_text"], Kind.CAPTIONS: ["id", *(caption_column(g) for g in Granularity)]}


def content_columns(kind: Kind, names: list[str]) -> list[str]:
    """The columns of a set that its digest covers, of those it has: CONTENT[kind], and for captions every
    other source's caption columns too (caption_<source>_<granularity>, after the main source's, by name)."""
    wanted = [c for c in CONTENT[kind] if c in names]
    if kind == Kind.CAPTIONS:
        wanted += sorted((c for c in names if c not in wanted and caption_slot(c) is not None),
                         key=lambda c: caption_slot(c))
    return wanted


class CaptionSetChanged(ValueError):
    """A resumed run found another caption set than the one it started on."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParquetSet:
    kind: Kind
    uri: str
    digest: str                         # 16 hex digits of the content (module docstring)
    rows: int
    files: list[dict[str, Any]]         # {path, bytes, rows}, sorted by path
    schema: str | None                  # the Parquet's `tipsv2.schema` metadata: images, captions, ...
    schema_version: str | None
    provenance: list[dict[str, Any]] | None = None   # captions only

    def profile(self) -> dict[str, Any]:
        out = {"rows": self.rows, "num_files": len(self.files), "files": self.files[:MAX_FILES],
               "schema": self.schema, "schema_version": self.schema_version}
        return out | ({"provenance": self.provenance} if self.provenance is not None else {})

    def brief(self) -> dict[str, Any]:
        return {"uri": self.uri, "digest": self.digest, "rows": self.rows}


def digest(table: pa.Table, columns: list[str]) -> str:
    """sha256 of `columns` of `table` (absent ones skipped), rows sorted by id; nulls differ from ""."""
    import pandas as pd

    table = table.sort_by("id")
    h = hashlib.sha256()
    for name in columns:
        if name not in table.column_names:
            continue
        column = table[name]
        h.update(name.encode() + b"\0")
        h.update(column.is_null().to_numpy(zero_copy_only=False).tobytes())
        values = pc.fill_null(column.cast(pa.string()), "").to_numpy(zero_copy_only=False)
        h.update(pd.util.hash_array(values, categorize=False).tobytes())
    return h.hexdigest()[:16]


def provenance_summary(column: pa.ChunkedArray) -> list[dict[str, Any]]:
    """Rows per (granularity, source, backend, model, prompt hash, sampling, status) of a `provenance` JSON
    column; `granularity` is the slot's name (long, b_long), `source` the caption pass (None before sources)."""
    stable = pc.replace_substring_regex(column, pattern=VOLATILE, replacement=r'\1""')
    counts: dict[str, int] = {}
    for entry in pc.value_counts(stable).to_pylist():
        for granularity, prov in sorted(json.loads(entry["values"]).items()):
            key = json.dumps({"granularity": granularity, "source": prov.get("source"),
                              "backend": prov.get("backend"), "model": prov.get("model"),
                              "prompt_hash": prov.get("prompt_hash"), "sampling": prov.get("sampling"),
                              "status": prov.get("status")}, sort_keys=True)
            counts[key] = counts.get(key, 0) + entry["counts"]
    return [json.loads(key) | {"rows": n} for key, n in sorted(counts.items())]


def describe(uri: str, kind: Kind) -> ParquetSet:
    """Digest and profile of the Parquet file or directory at `uri` (local or s3://)."""
    return read(uri, kind)[0]


def unreadable(fs, path: str, uri: str, kind: Kind, err: Exception) -> str:
    """Why the Parquet set at `uri` cannot be read, naming its first file that is not Parquet. A training set
    is read whole, its digest over every row: a corrupt file stops the run rather than being skipped, which
    would train on, and record, other data than the set named."""
    info = fs.get_file_info(path)
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
             if f.is_file and not f.base_name.startswith(("_", "."))] if info.type == pafs.FileType.Directory else [path]
    for file in sorted(files):
        try:
            pq.read_metadata(file, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as bad:
            return (f"{kind.value} Parquet {uri!r}: {storage.to_uri(fs, file)} is not a Parquet file ({bad}); "
                    f"expected the {kind.value} Parquet a pipelines stage writes: remove or replace that file")
    return f"{kind.value} Parquet {uri!r} cannot be read ({type(err).__name__}: {err})"


def read(uri: str, kind: Kind) -> tuple[ParquetSet, pa.Table]:
    """`describe(uri, kind)` and the columns it read (CONTENT[kind] present, and captions' provenance), for a
    caller that needs those rows too (the trainer's texts): one read of the set, not two."""
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type.name == "NotFound":
        raise UsageError(f"no {kind.value} Parquet at {uri!r}")
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        if "id" not in dataset.schema.names:
            raise UsageError(f"{kind.value} Parquet {uri!r} has no id column; found {dataset.schema.names}")
        wanted = content_columns(kind, dataset.schema.names)
        has_provenance = kind == Kind.CAPTIONS and "provenance" in dataset.schema.names
        table = dataset.to_table(columns=wanted + (["provenance"] if has_provenance else []))
    except (pa.ArrowInvalid, OSError) as err:
        raise UsageError(unreadable(fs, path, uri, kind, err)) from None
    sizes = {info.path: info.size for info in fs.get_file_info(dataset.files)}
    files = [{"path": storage.to_uri(fs, fragment.path), "bytes": sizes[fragment.path],
              "rows": fragment.metadata.num_rows} for fragment in dataset.get_fragments()]
    meta = dataset.schema.metadata or {}
    text = lambda key: meta[key].decode() if key in meta else None  # noqa: E731
    found = ParquetSet(kind=kind, uri=uri, digest=digest(table, wanted), rows=table.num_rows,
                       files=sorted(files, key=lambda f: f["path"]), schema=text(b"tipsv2.schema"),
                       schema_version=text(b"tipsv2.schema_version"),
                       provenance=provenance_summary(table["provenance"]) if has_provenance else None)
    return found, table


def read_source(source) -> tuple[list[ParquetSet], dict[str, pa.Table]]:
    """The image and (if any) caption Parquet sets of a training `pipelines.data.Source`, and the tables read
    for them by URI (`pipelines.data.read_texts(source, read=...)` takes its columns from these)."""
    uris = [(source.images, Kind.IMAGES)] + ([(source.captions, Kind.CAPTIONS)] if source.captions else [])
    found = [read(uri, kind) for uri, kind in uris]
    return [d for d, _ in found], {d.uri: table for d, table in found}


def describe_source(source) -> list[ParquetSet]:
    """The image and (if any) caption Parquet of a training `pipelines.data.Source`."""
    return read_source(source)[0]


# ---------------------------------------------------------------- resume


def check_resume(output: str, datasets: list[ParquetSet], *, policy: CaptionChange, resuming: bool) -> str | None:
    """Refuse (or warn, by `policy`) when a resumed run's caption set is not the one it started on; then
    record the current sets in <output>/lineage.json. Returns the warning given, if any."""
    uri = storage.join(output, LINEAGE_FILE)
    current = {d.kind.value: d.brief() for d in datasets}
    before = storage.read_json(uri).get(Kind.CAPTIONS.value) if resuming and storage.exists(uri) else None
    now = current.get(Kind.CAPTIONS.value)
    message = None
    if before is not None and (now is None or now["digest"] != before["digest"]):
        now_text = f"digest {now['digest']} ({now['rows']} rows at {now['uri']})" if now else "no caption set"
        message = (f"the caption set changed under the run resumed in {output}: it started on digest "
                   f"{before['digest']} ({before['rows']} rows at {before['uri']}) and now finds {now_text}")
        if CaptionChange(policy) == CaptionChange.FAIL:
            raise CaptionSetChanged(f"{message}. Continue on the new captions with --set data.on_caption_change=warn,"
                                    " or train on them from the start with another --output")
        warnings.warn(message, stacklevel=2)
        print(f"warning: {message}; going on (data.on_caption_change=warn)", flush=True)
    storage.write_json(uri, current | ({"previous_captions": before} if message else {}))
    return message


# ---------------------------------------------------------------- MLflow


def mlflow_dataset(found: ParquetSet):
    """An MLflow MetaDataset (digest and profile ours, source the Parquet URI)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class ParquetDataset(MetaDataset):
        @property
        def profile(self) -> dict[str, Any]:
            return found.profile()

        def to_dict(self) -> dict[str, str]:
            return super().to_dict() | {"profile": json.dumps(self.profile)}

    with warnings.catch_warnings():   # a local path resolves to two equal LocalArtifactDatasetSource kinds
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(storage.absolute(found.uri))
    return ParquetDataset(source, name=found.kind.value, digest=found.digest)


def log_inputs(sink: MetricsSink, datasets: list[ParquetSet], *, context: str, note: str | None = None) -> None:
    """The datasets as inputs of the sink's run (context `training` or `output`) and as digest tags; never
    fatal (tracking never stops training)."""
    client = getattr(sink, "client", None)
    if client is None or not datasets:
        return
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [DatasetInput(mlflow_dataset(d)._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
              for d in datasets]
    try:
        client.log_inputs(sink.run_id, datasets=inputs)
    except Exception as err:  # noqa: BLE001 - as MlflowSink: tracking never crashes training
        log.warning("MLflow dataset inputs not logged (%s: %s)", type(err).__name__, str(err)[:200])
    sink.set_tags({DIGEST_TAG.format(kind=d.kind.value): d.digest for d in datasets}
                  | ({"tipsv2.captions.changed": note[:4000]} if note else {}))


def caption_digest(run) -> str:
    """The digest of the caption set an MLflow run trained on: its tag, else its `training` dataset input."""
    if tag := run.data.tags.get(DIGEST_TAG.format(kind=Kind.CAPTIONS.value)):
        return tag
    for item in run.inputs.dataset_inputs if run.inputs else []:
        context = {t.key: t.value for t in item.tags}.get("mlflow.data.context")
        if item.dataset.name == Kind.CAPTIONS.value and context == TRAINING:
            return item.dataset.digest
    return ""


def log_output(sink: MetricsSink, kind: Kind, uri: str) -> None:
    """The Parquet set a stage wrote, as a dataset of the stage's own run (context `output`); a warning when
    MLflow fails (the stage's output stands)."""
    try:
        log_inputs(sink, [describe(uri, kind)], context=OUTPUT)
    except Exception as err:  # noqa: BLE001 - tracking never fails a stage whose output is written
        log.warning("output %s not logged to MLflow (%s: %s)", uri, type(err).__name__, str(err)[:200])

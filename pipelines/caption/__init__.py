"""The caption stage: synthetic captions at several granularities on Ray Data, resumable, exactly once.

    python -m pipelines.caption --config template --set input=outputs/demo --output outputs/demo

config.py   the stage's config dataclasses and presets
prompts.py  pure `build_prompt` / `parse_caption` (the quality gate)
backends.py the captioners behind one interface: vllm (ray.data.llm), hf (transformers), template
store.py    provenance, what still needs a caption, atomic commits, compaction (exactly once)
stage.py    `run(cfg, output)` and `main`; the full story is in its docstring
"""

from pipelines import cli
from pipelines.caption.config import (PRESETS, Backend, CaptionConfig, Device, EngineConfig, ImageInput, PromptConfig,
                                      PromptsConfig, QualityConfig, SamplingConfig, Status, TemplateConfig,
                                      WatchdogConfig, default, hf, template, tiny)
from pipelines.caption.prompts import (CaptionResult, build_prompt, cut_repetition, finish_request, parse_caption,
                                       repeat_fraction)
from pipelines.caption.stage import Pace, Stalled, images_uri, main, read_input_ids, run, watched
from pipelines.caption.store import (CAPTIONS_DIR, ERRORS_DIR, Assembler, _part_name, caption_files, commit, compact,
                                     errors_table, model_name, needs_caption, plan, prompt_hash, provenance,
                                     read_latest)

__all__ = ["PRESETS", "Backend", "CaptionConfig", "Device", "EngineConfig", "ImageInput", "PromptConfig",
           "PromptsConfig", "QualityConfig", "SamplingConfig", "Status", "TemplateConfig", "WatchdogConfig",
           "default", "hf", "template", "tiny", "CaptionResult", "build_prompt", "cut_repetition", "finish_request",
           "parse_caption", "repeat_fraction", "Pace", "Stalled", "images_uri", "main", "read_input_ids", "run",
           "watched", "CAPTIONS_DIR", "ERRORS_DIR", "Assembler", "_part_name", "caption_files", "commit", "compact",
           "errors_table", "model_name", "needs_caption", "plan", "prompt_hash", "provenance", "read_latest", "cli"]

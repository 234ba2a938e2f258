"""Hugging Face directories (tipsv2.models.hf) against the installed transformers' Tipsv2Model, offline.

Parity: relative error = max|ours - theirs| / max|theirs|, required <= 1e-5, for CLS1, CLS2, patch tokens
and text embeddings (with padding), at the native and larger resolutions; the temperature must agree.
Tiny random models built here; nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.reference_tips import random_text_arrays, random_vision_arrays
from tipsv2.checkpoint import Format, ModelSource, load_source, save_export
from tipsv2.models import FFN, ModelConfig, TextConfig, TIPSModel, VisionConfig, export_official, load_official
from tipsv2.models.hf import export_hf, load_hf
from tipsv2.tokenizer import Tokenizer, train_tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5
NATIVE = 56                                   # px: the 4x4 position grid of the tiny models below
RESOLUTIONS = [(NATIVE, NATIVE), (112, 112), (70, 98)]
TEXTS = ["A red cube", "  leading and   repeated spaces  ", "UPPER Case Photo of a CAT", "unknown \u2713 \u03a9mega",
         "tab\tand\nnewline", "", "a very long caption about a small shiny sphere " * 4,
         "\uff46\uff55\uff4c\uff4c width"]


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    rng = random.Random(0)
    words = "a red blue green cube sphere cylinder on the left of near photo cat dog small large shiny".split()
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(200)]
    path = train_tokenizer(corpus, vocab_size=60, out_path=tmp_path_factory.mktemp("spm") / "spm.model")
    return Tokenizer(path, max_len=16)


def tiny_config(ffn: FFN, vocab: int) -> ModelConfig:
    return ModelConfig(vision=VisionConfig(width=64, depth=2, heads=2, mlp_dim=256, ffn=ffn, image_size=NATIVE),
                       text=TextConfig(width=64, depth=2, heads=2, mlp_dim=128, vocab_size=vocab, max_len=16))


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every tensor away from its init (LayerScale, norms, biases, CLS/CLS2/mask tokens): a swapped or
    skipped tensor shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if name.endswith("temperature"):
            continue
        noise = torch.randn(param.shape, generator=generator)
        param.add_(noise * (0.5 if "ls" in name or "lambda" in name else 0.05))


def tiny_model(ffn: FFN, vocab: int, seed: int = 0) -> TIPSModel:
    torch.manual_seed(seed)
    model = TIPSModel(tiny_config(ffn, vocab)).eval()
    randomize(model, seed)
    with torch.no_grad():
        model.log_temperature.fill_(np.log(0.03))
    return model


def same_weights(a: TIPSModel, b: TIPSModel) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def text_batch(tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    ids, paddings = tokenizer(TEXTS)
    assert paddings.sum(1).min() == 0 and paddings.sum(1).max() > 8   # full rows and padded rows
    return ids, paddings


@torch.no_grad()
def errors(ours: TIPSModel, theirs, images: torch.Tensor, ids: torch.Tensor, paddings: torch.Tensor) -> dict:
    features = ours.encode_image(images)
    tokens = theirs.vision_model(pixel_values=images).last_hidden_state      # (B, 2 + N, D)
    text = theirs.text_model(input_ids=ids, attention_mask=(1 - paddings).long()).pooler_output
    texts = paddings.sum(1) < paddings.shape[1]   # not the empty text: transformers divides its zero norm (NaN)
    return {"cls1": rel_err(features.cls1, tokens[:, 0]), "cls2": rel_err(features.cls2, tokens[:, 1]),
            "patches": rel_err(features.patches, tokens[:, 2:]),
            "text": rel_err(ours.encode_text(ids, paddings), text),
            "logits": logits_error(ours, theirs, images, ids[texts], paddings[texts])}


def check_parity(ours: TIPSModel, theirs, tokenizer: Tokenizer) -> dict:
    ids, paddings = text_batch(tokenizer)
    measured = {}
    for seed, (h, w) in enumerate(RESOLUTIONS):
        images = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
        measured[f"{h}x{w}"] = errors(ours, theirs, images, ids, paddings)
    print(json.dumps(measured))   # the numbers the README quotes (pytest -s)
    assert all(e <= TOLERANCE for row in measured.values() for e in row.values()), measured   # False on NaN
    assert float(theirs.temperature.detach()) == pytest.approx(float(ours.temperature.detach()), rel=1e-7)
    return measured


@torch.no_grad()
def logits_error(ours: TIPSModel, theirs, images: torch.Tensor, ids: torch.Tensor, paddings: torch.Tensor) -> float:
    """Tipsv2Model's logits_per_image (CLS1 against the text, over the temperature) against ours."""
    cls1 = torch.nn.functional.normalize(ours.encode_image(images).cls1, dim=-1)
    text = torch.nn.functional.normalize(ours.encode_text(ids, paddings), dim=-1)
    out = theirs(pixel_values=images, input_ids=ids, attention_mask=(1 - paddings).long())
    return rel_err(cls1 @ text.T / ours.temperature, out.logits_per_image)


@pytest.mark.parametrize("ffn", [FFN.MLP, FFN.SWIGLU])
def test_transformers_loads_our_export_and_matches(ffn, tokenizer, tmp_path):
    model = tiny_model(ffn, tokenizer.vocab_size)
    export_hf(model, tokenizer, tmp_path / "hf")
    theirs, info = transformers.AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info   # no missing, unexpected or mismatched tensor on their side either
    assert theirs.config.vision_config.use_swiglu_ffn == (ffn == FFN.SWIGLU)
    theirs.eval()
    check_parity(model, theirs, tokenizer)


def hub_model(tmp_path: Path, *, swiglu: bool) -> tuple[object, Path]:
    """A random Tipsv2Model saved by transformers itself: the layout a Hub download has."""
    config = transformers.Tipsv2Config(
        vision_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 4,
                       "use_swiglu_ffn": swiglu, "image_size": NATIVE},
        text_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                     "vocab_size": 60, "max_position_embeddings": 16},
        temperature_init_value=0.02)
    torch.manual_seed(1)
    theirs = transformers.Tipsv2Model(config).eval()
    randomize(theirs, 1)
    theirs.save_pretrained(tmp_path / "hub")
    return theirs, tmp_path / "hub"


@pytest.mark.parametrize("swiglu", [False, True])
def test_load_hf_reads_a_directory_transformers_wrote(swiglu, tokenizer, tmp_path):
    theirs, directory = hub_model(tmp_path, swiglu=swiglu)
    ours = load_hf(directory)
    assert ours.cfg.vision.ffn == (FFN.SWIGLU if swiglu else FFN.MLP) and ours.cfg.vision.image_size == NATIVE
    check_parity(ours.eval(), theirs, tokenizer)


def test_sharded_checkpoint_and_either_vision_mlp_name(tokenizer, tmp_path):
    """Shards listed in model.safetensors.index.json; the vision MLP as `mlp.fc1` (the released name) as
    well as `mlp.c_fc` (what transformers writes)."""
    theirs, _ = hub_model(tmp_path, swiglu=False)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    check_parity(load_hf(tmp_path / "sharded").eval(), theirs, tokenizer)
    directory = tmp_path / "hub"
    tensors = load_file(str(directory / "model.safetensors"))
    def released(name: str) -> str:
        return name.replace(".mlp.c_fc.", ".mlp.fc1.").replace(".mlp.c_proj.", ".mlp.fc2.")

    renamed = {released(k) if k.startswith("vision_encoder.") else k: v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(directory / "model.safetensors"), metadata={"format": "pt"})
    check_parity(load_hf(directory).eval(), theirs, tokenizer)


def test_export_refuses_what_transformers_would_compute_differently(tokenizer, tmp_path):
    model = TIPSModel(ModelConfig(vision=VisionConfig(width=64, depth=1, heads=2, mlp_dim=128, image_size=NATIVE,
                                                      pos_interpolation="bicubic"),
                                  text=TextConfig(width=64, depth=1, heads=2, mlp_dim=128, vocab_size=60, max_len=16)))
    with pytest.raises(ValueError, match="pos_interpolation 'bicubic'.*expected 'bilinear'"):
        export_hf(model, tokenizer, tmp_path / "hf")


def test_published_checkpoint_without_temperature_takes_the_configs(tmp_path):
    """Google's Hub files carry no `temperature` tensor (transformers ignores its absence): the config's
    temperature_init_value is the temperature then, for both libraries."""
    _, directory = hub_model(tmp_path, swiglu=False)
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["temperature"]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["temperature_init_value"] = 0.0123
    (directory / "config.json").write_text(json.dumps(config))
    theirs = transformers.Tipsv2Model.from_pretrained(directory)
    for model in (load_hf(directory), theirs):
        assert float(model.temperature.detach()) == pytest.approx(0.0123, rel=1e-6)


def test_released_npz_to_ours_to_hf_to_ours_is_exact(tokenizer, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "v.npz", **random_vision_arrays(rng, width=128, depth=2, mlp_dim=512, grid=4))
    np.savez(tmp_path / "t.npz", **random_text_arrays(rng, width=128, depth=2, mlp_dim=256,
                                                       vocab=tokenizer.vocab_size, temperature=0.01))
    first = load_official(tmp_path / "v.npz", tmp_path / "t.npz", max_len=16)
    second = load_hf(export_hf(first, tokenizer, tmp_path / "hf"))
    assert second.cfg == first.cfg
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    export_official(second, tmp_path / "v2.npz", tmp_path / "t2.npz")
    for name in ("v", "t"):
        with np.load(tmp_path / f"{name}.npz") as original, np.load(tmp_path / f"{name}2.npz") as again:
            assert set(original.files) == set(again.files)
            for key in original.files:
                np.testing.assert_array_equal(original[key], again[key])


def test_tokenizer_and_processor_settings_load_offline(tokenizer, tmp_path):
    """The tokenizer through AutoTokenizer and the processor's text path give our ids and paddings; the
    image settings, read by a PIL image processor (Tipsv2ImageProcessor itself needs torchvision), give
    our pixels."""
    from tipsv2.eval.features import resize_center_crop, to_tensor

    directory = export_hf(tiny_model(FFN.MLP, tokenizer.vocab_size), tokenizer, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    ids, paddings = tokenizer(TEXTS)
    images = transformers.BitImageProcessorPil.from_pretrained(directory)
    processor = transformers.Tipsv2Processor(image_processor=images, tokenizer=theirs)
    pictures = [Image.fromarray(np.random.default_rng(s).integers(0, 256, (h, w, 3), dtype=np.uint8))
                for s, (h, w) in enumerate([(70, 90), (90, 70), (200, 57)])]
    batch = processor(text=TEXTS, images=pictures, return_tensors="pt")     # pads to the tokenizer's max_len
    assert torch.equal(batch["input_ids"], ids)
    assert torch.equal(batch["attention_mask"].float(), 1 - paddings)
    assert torch.equal(batch["pixel_values"], torch.stack([to_tensor(resize_center_crop(p, NATIVE)) for p in pictures]))


def test_processor_loads_with_torchvision(tokenizer, tmp_path):
    pytest.importorskip("torchvision", reason="transformers' Tipsv2ImageProcessor has a torchvision backend only")
    from tipsv2.eval.features import resize_center_crop, to_tensor

    directory = export_hf(tiny_model(FFN.MLP, tokenizer.vocab_size), tokenizer, tmp_path / "hf")
    processor = transformers.AutoProcessor.from_pretrained(directory)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    batch = processor(text=TEXTS, images=[picture], return_tensors="pt")
    assert torch.equal(batch["input_ids"], tokenizer(TEXTS)[0])
    ours = to_tensor(resize_center_crop(picture, NATIVE))
    assert float((batch["pixel_values"][0] - ours).abs().mean()) < 2 / 255   # torchvision vs PIL bicubic


def test_bpe_sentencepiece_goes_as_tipsv2_tokenizer(tmp_path):
    """A BPE SentencePiece model (the released TIPS kind) is written as tokenizer.model for Tipsv2Tokenizer."""
    import sentencepiece as spm

    rng = random.Random(1)
    words = "a red blue green cube sphere on the left photo cat dog".split()
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "bpe"),
                                   vocab_size=400, model_type="bpe", pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
                                   byte_fallback=True, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    tokenizer = Tokenizer(tmp_path / "bpe.model", max_len=16)
    directory = export_hf(tiny_model(FFN.MLP, tokenizer.vocab_size), tokenizer, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    assert type(theirs).__name__ == "Tipsv2Tokenizer"
    texts = [t for t in TEXTS if "\u2713" not in t]   # byte fallback: unknown characters become bytes there
    out = theirs(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(out["input_ids"], tokenizer(texts)[0])


def test_every_tensor_must_land(tokenizer, tmp_path):
    directory = export_hf(tiny_model(FFN.MLP, tokenizer.vocab_size), tokenizer, tmp_path / "hf")
    original = load_file(str(directory / "model.safetensors"))
    for change, message in [({"text_encoder.ln_final.bias": None}, r"missing \['ln_final.bias'\]"),
                            ({"vision_encoder.extra": torch.zeros(1)}, r"unexpected \['extra'\]"),
                            ({"vision_encoder.blocks.0.ls1.gamma": torch.zeros(3)}, r"wrong shape blocks.0.ls1.gamma"),
                            ({"stray": torch.zeros(1)}, r"unexpected tensors \['stray'\]"),
                            ({"vision_encoder.blocks.0.mlp.fc1.bias": torch.zeros(256)}, r"under two names")]:
        tensors = {k: v for k, v in (original | change).items() if v is not None}
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=message):
            load_hf(directory)


def test_config_our_towers_cannot_run_is_refused(tokenizer, tmp_path):
    directory = export_hf(tiny_model(FFN.MLP, tokenizer.vocab_size), tokenizer, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "gelu_new"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_act.*gelu_new.*expected.*'gelu'"):
        load_hf(directory)
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    with pytest.raises(ValueError, match="model_type is 'clip'"):
        load_hf(directory)


def test_model_source_forms(tokenizer, tmp_path):
    model = tiny_model(FFN.MLP, tokenizer.vocab_size)
    export_hf(model, tokenizer, tmp_path / "hf")
    save_export(tmp_path / "export", model=model)
    assert ModelSource.parse("hf:DIR") == ModelSource(Format.HF, ("DIR",))
    released = ("s3://b/v.npz", "s3://b/t.npz")
    assert ModelSource.parse(",".join(released)) == ModelSource(Format.OFFICIAL, released)
    assert ModelSource.parse("s3://b/v.npz").directory == "s3://b"
    assert ModelSource.parse("runs/x/export") == ModelSource(Format.EXPORT, ("runs/x/export",))
    for bad in ("hf:", "a.npz,b.npz,c.npz", ""):
        with pytest.raises(ValueError):
            ModelSource.parse(bad)
    fetched = []
    loaded, dino, patch = load_source(ModelSource.parse(f"hf:{tmp_path / 'hf'}"),
                                      fetch=lambda p: fetched.append(p) or p)
    assert fetched == [str(tmp_path / "hf")] and dino is None and patch is None
    assert same_weights(loaded, model)
    with pytest.raises(ValueError, match="hf:"):   # a Hugging Face directory given without its prefix
        load_source(ModelSource.parse(str(tmp_path / "hf")))


def test_pipelines_take_hf_directories(tokenizer, tmp_path):
    """`--set teacher=hf:DIR` / `student_init=hf:DIR` (pipelines.train) and `--checkpoint hf:DIR`
    (pipelines.evaluate, which finds the tokenizer.model inside)."""
    from pipelines.evaluate import EvaluateConfig, default_tokenizer_uri, load_model
    from pipelines.train import load_teacher

    model = tiny_model(FFN.MLP, tokenizer.vocab_size)
    spec = f"hf:{export_hf(model, tokenizer, tmp_path / 'hf')}"
    teacher, dino, patch = load_teacher(spec)
    assert same_weights(teacher, model) and dino is None and patch is None
    assert same_weights(load_model(EvaluateConfig(checkpoint=spec), str(tmp_path)), model)
    assert default_tokenizer_uri(spec) == str(tmp_path / "hf" / "tokenizer.model")


def test_importing_tipsv2_does_not_import_transformers():
    code = ("import importlib, pkgutil, sys, tipsv2\n"
            "for m in pkgutil.walk_packages(tipsv2.__path__, 'tipsv2.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted({'transformers', 'tokenizers'} & set(k.split('.')[0] for k in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

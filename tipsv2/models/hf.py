"""Hugging Face `transformers` TIPSv2 directories in and out (`Tipsv2Model`, `Tipsv2Processor`).

    from tipsv2.models.hf import export_hf, load_hf
    export_hf(model, tokenizer, "outputs/tiny/export/hf")   # transformers.AutoModel / AutoProcessor load it
    model = load_hf("outputs/tiny/export/hf")                # or a directory downloaded from the Hub

A Hub checkpoint (`model.safetensors`, or shards listed in `model.safetensors.index.json`) holds the
released PyTorch names under a tower prefix: `vision_encoder.` + our vision names, `text_encoder.` + our
text names, and optionally a scalar `temperature`. That is what transformers' conversion mapping for
`tipsv2` expects of the Hub's files (it splits qkv/in_proj into q/k/v at load time) and what
`Tipsv2Model.save_pretrained` writes. The one rename: the vision MLP is `mlp.c_fc`/`mlp.c_proj` there and
`mlp.fc1`/`mlp.fc2` here (both are read). Published checkpoints carry no `temperature` tensor (so says
transformers' Tipsv2Model); then the config's `temperature_init_value` is the temperature, as there.

Nothing here imports `transformers`: the directory is plain JSON and safetensors (no pickle). The
tokenizer: a unigram SentencePiece model (ours, tipsv2.tokenizer.train_tokenizer) is written as
`tokenizer.json` (the `tokenizers` Unigram equivalent: lower-case, the model's normaliser, no BOS/EOS,
pad id 0) for the generic `TokenizersBackend`; a BPE SentencePiece model goes as `tokenizer.model` for
`Tipsv2Tokenizer`, which builds a BPE (with byte fallback) from it and is what the Hub's directories name. `tokenizer.model` is always copied, so our
own pipelines find it too. The image processor resizes the short side to the model's `image_size`
(bicubic), centre-crops a square, scales to [0, 1] and does not normalise, as tipsv2.eval.features does;
transformers implements `Tipsv2ImageProcessor` on torchvision only, so `AutoProcessor` needs torchvision.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from tipsv2.models.config import FFN, ModelConfig, TextConfig, VisionConfig
from tipsv2.models.model import TIPSModel, load_strict
from tipsv2.tokenizer import Tokenizer

VISION_PREFIX = "vision_encoder."
TEXT_PREFIX = "text_encoder."
TEMPERATURE = "temperature"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SPM_FILE = "tokenizer.model"
# Tipsv2Config's default temperature_init_value (transformers 5.19): the temperature of a config without one.
DEFAULT_TEMPERATURE = 0.005065968260169029
# Vision MLP: our (released .npz) names -> names in a Hub checkpoint. Every other tensor keeps its name.
VISION_RENAMES = ((".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."))
# Config fields our towers do not make configurable: written as they are, and a directory whose config
# says otherwise (absent = transformers' default, the same value) cannot load into our model.
FIXED_VISION = {"hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True, "num_register_tokens": 1,
                "num_channels": 3}
FIXED_TEXT = {"hidden_act": "relu", "layer_norm_eps": 1e-5, "scale_sqrt_depth": True, "pooling_epsilon": 1e-8}
SPM_UNIGRAM, SPM_BPE = 1, 2                  # sentencepiece TrainerSpec.model_type
SPM_CONTROL, SPM_USER_DEFINED = 3, 4         # sentencepiece piece types that are added tokens in `tokenizers`


# ---------------------------------------------------------------- export


def export_hf(model: TIPSModel, tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write a directory that `transformers.Tipsv2Model.from_pretrained` and `AutoProcessor` load as is:
    model.safetensors (float32), config.json, tokenizer files, processor_config.json and
    preprocessor_config.json (the image settings)."""
    directory = Path(directory)
    if tokenizer.max_len > model.cfg.text.max_len:
        raise ValueError(f"tokenizer max_len {tokenizer.max_len} exceeds the text tower's max_len "
                         f"{model.cfg.text.max_len} (transformers' position table has that many rows)")
    directory.mkdir(parents=True, exist_ok=True)
    temperature = float(model.temperature.detach().double())
    save_file(hub_tensors(model, temperature), str(directory / WEIGHTS), metadata={"format": "pt"})
    write_json(directory / "config.json", hub_config(model.cfg, temperature))
    write_tokenizer(tokenizer, directory)
    images = image_processor_config(model.cfg.vision.image_size)
    # transformers 5 reads the image processor nested in processor_config.json (what it writes), older
    # loaders and AutoImageProcessor's fallback read preprocessor_config.json: both hold the same settings.
    write_json(directory / "processor_config.json", {"processor_class": "Tipsv2Processor", "image_processor": images})
    write_json(directory / "preprocessor_config.json", images)
    return directory


def hub_tensors(model: TIPSModel, temperature: float) -> dict[str, Tensor]:
    def plain(tensor: Tensor) -> Tensor:
        return tensor.detach().float().cpu().contiguous()

    state = {VISION_PREFIX + hub_vision_name(k): plain(v) for k, v in model.vision.state_dict().items()}
    state |= {TEXT_PREFIX + k: plain(v) for k, v in model.text.state_dict().items()}
    state[TEMPERATURE] = torch.tensor(temperature, dtype=torch.float32)
    return state


def hub_vision_name(name: str) -> str:
    for ours, hub in VISION_RENAMES:
        name = name.replace(ours, hub)
    return name


def hub_config(cfg: ModelConfig, temperature: float) -> dict[str, Any]:
    """config.json of a Tipsv2Model with our sizes."""
    vision, text = cfg.vision, cfg.text
    if vision.pos_interpolation != "bilinear":
        raise ValueError(f"vision pos_interpolation {vision.pos_interpolation!r}: transformers' Tipsv2 interpolates "
                         "the position embedding bilinearly (antialiased); expected 'bilinear'")
    mlp_ratio = vision.mlp_dim / vision.width
    if int(vision.width * mlp_ratio) != vision.mlp_dim:  # transformers sizes the MLP as int(width * ratio)
        raise ValueError(f"vision mlp_dim {vision.mlp_dim} is not int(width {vision.width} x mlp_ratio)")
    return {
        "architectures": ["Tipsv2Model"], "model_type": "tipsv2", "dtype": "float32",
        "temperature_init_value": temperature,
        "vision_config": {
            "model_type": "tipsv2_vision_model", "hidden_size": vision.width, "num_hidden_layers": vision.depth,
            "num_attention_heads": vision.heads, "mlp_ratio": mlp_ratio,
            "use_swiglu_ffn": vision.ffn == FFN.SWIGLU, "patch_size": vision.patch_size,
            "image_size": vision.image_size, "layerscale_value": vision.layerscale_init,
            "drop_path_rate": 0.0, **FIXED_VISION},
        "text_config": {
            "model_type": "tipsv2_text_model", "hidden_size": text.width, "num_hidden_layers": text.depth,
            "num_attention_heads": text.heads, "intermediate_size": text.mlp_dim, "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_len, "pad_token_id": 0, **FIXED_TEXT},
    }


def image_processor_config(image_size: int) -> dict[str, Any]:
    """Tipsv2ImageProcessor settings that feed images as we do: short side to image_size px (bicubic), centre
    crop, RGB in [0, 1], no mean/std (mean 0 and std 1 written too, so turning normalisation on is a no-op)."""
    return {
        "image_processor_type": "Tipsv2ImageProcessor", "processor_class": "Tipsv2Processor",
        "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False,
        "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0],
    }


def write_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """tokenizer.model always; tokenizer.json for a unigram model; tokenizer_config.json naming the class."""
    shutil.copyfile(tokenizer.path, directory / SPM_FILE)
    proto = spm_proto(tokenizer.path)
    kind = proto.trainer_spec.model_type
    if kind == SPM_UNIGRAM:
        write_json(directory / "tokenizer.json", unigram_tokenizer(proto))
        tokenizer_class = "TokenizersBackend"
    elif kind == SPM_BPE:
        tokenizer_class = "Tipsv2Tokenizer"   # builds its BPE from tokenizer.model
    else:
        raise ValueError(f"tokenizer {str(tokenizer.path)!r} is a SentencePiece model of type {kind}; "
                         f"expected unigram ({SPM_UNIGRAM}) or BPE ({SPM_BPE})")
    write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": tokenizer_class, "processor_class": "Tipsv2Processor", "do_lower_case": True,
        "pad_token": tokenizer.sp.id_to_piece(0), "unk_token": proto.trainer_spec.unk_piece,
        "bos_token": None, "eos_token": None, "padding_side": "right",
        # The processor pads and truncates to max_length; its own default (64) yields to this.
        "model_max_length": tokenizer.max_len, "max_length": tokenizer.max_len,
    })


def spm_proto(path: Path):
    """The parsed SentencePiece ModelProto. protobuf ships with sentencepiece's generated module; it is
    imported here only, so that importing tipsv2 does not need it."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def unigram_tokenizer(proto) -> dict[str, Any]:
    """tokenizer.json (the `tokenizers` serialisation) equivalent to our Tokenizer on a unigram model:
    lower-case, then SentencePiece's own normaliser, whitespace collapsed, "▁" prefix, no BOS/EOS."""
    spec = proto.normalizer_spec
    steps: list[dict[str, Any]] = [{"type": "Lowercase"}]
    if spec.precompiled_charsmap:
        steps.append({"type": "Precompiled",
                      "precompiled_charsmap": base64.b64encode(spec.precompiled_charsmap).decode()})
    if spec.remove_extra_whitespaces:
        steps += [{"type": "Strip", "strip_left": True, "strip_right": True},
                  {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    metaspace = {"type": "Metaspace", "replacement": "\u2581", "split": True,
                 "prepend_scheme": "always" if spec.add_dummy_prefix else "never"}
    added = [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": p.type == SPM_CONTROL}
             for i, p in enumerate(proto.pieces) if p.type in (SPM_CONTROL, SPM_USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": steps}, "pre_tokenizer": metaspace,
        "post_processor": None, "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": proto.trainer_spec.unk_id,
                  "vocab": [[p.piece, p.score] for p in proto.pieces],
                  "byte_fallback": proto.trainer_spec.byte_fallback},
    }


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- import


def load_hf(directory: str | Path) -> TIPSModel:
    """A TIPSModel from a transformers Tipsv2Model directory (ours or the Hub's). Every tensor must land:
    a missing, unexpected or wrongly shaped one raises ValueError naming it."""
    directory = Path(directory)
    config = read_config(directory)
    tensors = read_tensors(directory)
    temperature = read_temperature(tensors, config, directory)
    vision = vision_tensors(tensors, directory)
    text = {k[len(TEXT_PREFIX):]: v for k, v in tensors.items() if k.startswith(TEXT_PREFIX)}
    stray = sorted(k for k in tensors if not k.startswith((VISION_PREFIX, TEXT_PREFIX)))
    if stray:
        raise ValueError(f"cannot load {directory}: unexpected tensors {stray}; expected names under "
                         f"{VISION_PREFIX!r} or {TEXT_PREFIX!r}, and {TEMPERATURE!r}")
    cfg = ModelConfig(vision=vision_config(config.get("vision_config", {}), directory),
                      text=text_config(config.get("text_config", {}), directory),
                      temperature_init=temperature, temperature_min=min(0.01, temperature),
                      temperature_max=max(1.0, temperature))
    model = TIPSModel(cfg)
    load_strict(model.vision, vision, source=f"{directory / WEIGHTS} [{VISION_PREFIX}]")
    load_strict(model.text, text, source=f"{directory / WEIGHTS} [{TEXT_PREFIX}]")
    with torch.no_grad():
        model.log_temperature.fill_(math.log(temperature))
    return model


def read_temperature(tensors: dict[str, Tensor], config: dict[str, Any], directory: Path) -> float:
    """The `temperature` tensor (removed from `tensors`), else the config's temperature_init_value."""
    if TEMPERATURE in tensors:
        temperature = float(tensors.pop(TEMPERATURE).double())
    else:
        temperature = float(config.get("temperature_init_value", DEFAULT_TEMPERATURE))
    if not temperature > 0:
        raise ValueError(f"{directory}: temperature must be > 0, got {temperature}")
    return temperature


def vision_tensors(tensors: dict[str, Tensor], directory: Path) -> dict[str, Tensor]:
    """The vision tower's tensors under our names; one stored under both MLP names is refused."""
    names: dict[str, list[str]] = {}
    for key in tensors:
        if key.startswith(VISION_PREFIX):
            names.setdefault(our_vision_name(key[len(VISION_PREFIX):]), []).append(key)
    twice = sorted(keys for keys in names.values() if len(keys) > 1)
    if twice:
        raise ValueError(f"cannot load {directory}: tensors stored under two names each: {twice}")
    return {name: tensors[keys[0]] for name, keys in names.items()}


def our_vision_name(name: str) -> str:
    for ours, hub in VISION_RENAMES:
        name = name.replace(hub, ours)
    return name


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} is not a Hugging Face model directory (no config.json)")
    config = json.loads(path.read_text())
    if config.get("model_type") != "tipsv2":
        raise ValueError(f"{path}: model_type is {config.get('model_type')!r}; expected 'tipsv2' (Tipsv2Model)")
    return config


def read_tensors(directory: Path) -> dict[str, Tensor]:
    """All tensors of model.safetensors, or of the shards its index lists, in float32."""
    if (directory / WEIGHTS).is_file():
        files = [directory / WEIGHTS]
    elif (directory / WEIGHTS_INDEX).is_file():
        weight_map = json.loads((directory / WEIGHTS_INDEX).read_text())["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        raise ValueError(f"{str(directory)!r} has neither {WEIGHTS} nor {WEIGHTS_INDEX} "
                         "(only safetensors are read, never pickled .bin files)")
    tensors: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            tensors |= {key: handle.get_tensor(key).float() for key in handle.keys()}
    return tensors


def check_fixed(section: dict[str, Any], fixed: dict[str, Any], *, name: str, directory: Path) -> None:
    wrong = {k: section[k] for k, v in fixed.items() if k in section and section[k] != v}
    if wrong:
        raise ValueError(f"{directory}/config.json {name}: {wrong} cannot load into TIPSModel; expected "
                         f"{ {k: fixed[k] for k in wrong} }")


def square(value: int | list[int], *, field: str, directory: Path) -> int:
    if isinstance(value, int):
        return value
    if len(value) != 2 or value[0] != value[1]:
        raise ValueError(f"{directory}/config.json vision_config.{field} is {value}; expected one int or a square")
    return int(value[0])


def vision_config(section: dict[str, Any], directory: Path) -> VisionConfig:
    """Missing fields take Tipsv2VisionConfig's defaults (transformers 5.19), as from_pretrained does."""
    check_fixed(section, FIXED_VISION, name="vision_config", directory=directory)
    width = int(section.get("hidden_size", 768))
    return VisionConfig(
        width=width, depth=int(section.get("num_hidden_layers", 12)),
        heads=int(section.get("num_attention_heads", 12)),
        mlp_dim=int(width * section.get("mlp_ratio", 4)),
        ffn=FFN.SWIGLU if section.get("use_swiglu_ffn", False) else FFN.MLP,
        patch_size=square(section.get("patch_size", 14), field="patch_size", directory=directory),
        image_size=square(section.get("image_size", 448), field="image_size", directory=directory),
        layerscale_init=float(section.get("layerscale_value", 1.0)))


def text_config(section: dict[str, Any], directory: Path) -> TextConfig:
    """Missing fields take Tipsv2TextConfig's defaults (transformers 5.19), as from_pretrained does."""
    check_fixed(section, FIXED_TEXT, name="text_config", directory=directory)
    return TextConfig(
        width=int(section.get("hidden_size", 768)), depth=int(section.get("num_hidden_layers", 12)),
        heads=int(section.get("num_attention_heads", 12)), mlp_dim=int(section.get("intermediate_size", 3072)),
        vocab_size=int(section.get("vocab_size", 32000)), max_len=int(section.get("max_position_embeddings", 64)))

"""The run root: one directory per recipe run, one subdirectory per stage, as pipelines.run_all lays it out.

    ROOT/ingest/     images/*.parquet, errors/                  python -m pipelines.ingest   --output ROOT/ingest
    ROOT/caption/    captions/*.parquet, errors/                python -m pipelines.caption  --output ROOT/caption
    ROOT/pretrain/   export/, tokenizer/spm.model, ray/train/   python -m pipelines.pretrain --output ROOT/pretrain
    ROOT/distill/    export/                                    python -m pipelines.distill  --output ROOT/distill
    ROOT/evaluate/   eval_<suite>.json                          python -m pipelines.evaluate --output ROOT/evaluate

A stage whose `--output` is `ROOT/<its name>` reads what it needs from the stages before it under ROOT,
unless its config names that input (`--set input=...`, `--teacher ...`): `connect` fills the unset
input keys (table INPUTS) and fails, naming the stage to run first, when one is missing. An input set
explicitly must exist too. An `--output` not named after the stage is not a run root: nothing is filled
(pretrain then trains on synthetic scenes, as before).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipelines import storage
from pipelines.errors import UsageError
from tipsv2 import config_tree

STAGES = ("ingest", "caption", "pretrain", "distill", "evaluate")
TOKENIZER = ("tokenizer", "spm.model")   # where the trainer writes the tokenizer it trained (pipelines/train)


@dataclasses.dataclass(frozen=True)
class Input:
    key: str                    # dotted config key of the stage
    producer: str               # the stage whose output holds it
    path: tuple[str, ...]       # under ROOT/<producer>
    follows: str | None = None  # filled only when this key was filled from the run root too


INPUTS: dict[str, tuple[Input, ...]] = {
    "ingest": (),
    "caption": (Input("input", "ingest", ()),),
    "pretrain": (Input("data.images", "ingest", ("images",)),
                 Input("data.captions_uri", "caption", ("captions",), follows="data.images")),
    "distill": (Input("teacher", "pretrain", ("export",)),
                Input("data.tokenizer", "pretrain", TOKENIZER, follows="teacher"),
                Input("data.images", "ingest", ("images",)),
                Input("data.captions_uri", "caption", ("captions",), follows="data.images")),
    "evaluate": (Input("checkpoint", "distill", ("export",)),
                 Input("tokenizer", "pretrain", TOKENIZER, follows="checkpoint")),
}
# Keys naming something that must exist when set (model keys may be "hf:DIR" or "VISION.npz,TEXT.npz").
REQUIRED = {"ingest": ("source",), "caption": ("input",), "distill": ("teacher",), "evaluate": ("checkpoint",)}


class MissingInput(UsageError):
    """A stage's input is not there: the message names the key, the value and what to run first."""


def run_root(stage: str, output: str | None) -> str | None:
    """ROOT when `output` is ROOT/<stage>, else None."""
    if not output:
        return None
    head, _, name = output.rstrip("/").rpartition("/")
    return head if name == stage and head and not head.endswith(":/") else None


def stage_dir(root: str, stage: str) -> str:
    return storage.join(root, stage)


def get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _with(cfg: Any, key: str, value: Any) -> Any:
    tree: Any = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return config_tree.merge(cfg, tree)


def producer_uri(root: str, item: Input) -> str:
    """Where the producer left `item`; the tokenizer is the one pretrain's config named, if it named one."""
    where = stage_dir(root, item.producer)
    if item.path == TOKENIZER:
        config = storage.join(where, "config.json")
        named = storage.read_json(config).get("data", {}).get("tokenizer") if storage.exists(config) else None
        if named:
            return named
    return storage.join(where, *item.path)


def _parts(value: str) -> list[str]:
    return [p.removeprefix("hf:") for p in str(value).split(",") if p]


def connect(stage: str, cfg: Any, output: str | None, *, check: bool = True) -> Any:
    """`cfg` with its unset inputs taken from the run root (when `output` is ROOT/<stage>); with `check`,
    MissingInput when an input it needs is not there."""
    root = run_root(stage, output)
    filled: set[str] = set()
    for item in INPUTS.get(stage, ()):
        if get(cfg, item.key) or root is None or (item.follows and item.follows not in filled):
            continue
        uri = producer_uri(root, item)
        if check and not storage.exists(uri):
            raise MissingInput(
                f"{stage}: `{item.key}` is not set and {uri} does not exist; run `python -m pipelines.{item.producer}"
                f" ... --output {stage_dir(root, item.producer)}` first, or --set {item.key}=URI")
        cfg = _with(cfg, item.key, uri)
        filled.add(item.key)
    if check:
        check_inputs(stage, cfg, filled=filled)
    return cfg


def check_inputs(stage: str, cfg: Any, *, filled: set[str] = frozenset()) -> None:
    """MissingInput when a required input is empty or an input set explicitly does not exist."""
    for key in REQUIRED.get(stage, ()):
        if not get(cfg, key):
            raise MissingInput(f"{stage} needs `{key}`: --set {key}=URI (a local path, s3:// or gs:// URI)"
                               + (f", or --output ROOT/{stage} under a run root holding "
                                  f"ROOT/{INPUTS[stage][0].producer}" if INPUTS.get(stage) else ""))
    keys = {item.key for item in INPUTS.get(stage, ())} | set(REQUIRED.get(stage, ()))
    for key in sorted(keys - filled):
        value = get(cfg, key)
        for part in _parts(value) if value else ():
            if not storage.exists(part):
                raise MissingInput(f"{stage}: {key}={value!r}: {part} does not exist; expected an existing local "
                                   "path or s3:// / gs:// URI")
    for key in sorted((keys - filled) & MODEL_KEYS):   # set by the user (the run root's exports are a stage's)
        if value := get(cfg, key):
            check_model(stage, key, str(value))


MODEL_KEYS = {"checkpoint", "teacher", "student_init"}   # DIR (an export), hf:DIR or VISION.npz[,TEXT.npz]
MODEL_FORMS = ("an export directory (OUTPUT/export of pipelines.pretrain or distill), hf:DIR (a transformers "
               "Tipsv2Model directory) or VISION.npz[,TEXT.npz] (released weights)")


def check_model(stage: str, key: str, value: str) -> None:
    """MissingInput when a model input that exists is not a model: a directory without the files its form
    needs (found before any model code opens it)."""
    if value.startswith("models:") or value.endswith(".npz") or "," in value:
        return   # a registry version (resolved by MLflow), or released files (their existence is checked above)
    directory = value.removeprefix("hf:")
    needed = ("config.json", "model.safetensors") if value.startswith("hf:") else ("model.safetensors",)
    missing = [name for name in needed if not storage.exists(storage.join(directory, name))]
    if missing:
        raise MissingInput(f"{stage}: {key}={value!r} is not a model: no {' or '.join(missing)} in {directory}; "
                           f"expected {MODEL_FORMS}")
    config = storage.join(directory, "config.json")
    if not value.startswith("hf:") and storage.exists(config) and "model_type" in storage.read_json(config):
        raise MissingInput(f"{stage}: {key}={value!r} is a Hugging Face directory: pass it as hf:{value}")

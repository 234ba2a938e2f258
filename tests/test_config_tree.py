from __future__ import annotations

import dataclasses
import enum
from typing import Any
from dataclasses import dataclass, field

import pytest

from tipsv2 import config_tree
from tipsv2.models import ModelConfig, model_config


class Kind(enum.Enum):
    A = "a"
    B = "b"


@dataclass(frozen=True, kw_only=True)
class Inner:
    rate: float = 0.1
    sizes: tuple[int, ...] = (1, 2)
    kind: Kind = Kind.A
    name: str | None = None


@dataclass(frozen=True, kw_only=True)
class Outer:
    steps: int = 10
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_override_parses_types():
    cfg = Outer()
    cfg = config_tree.override(cfg, "inner.rate=1e-3")
    cfg = config_tree.override(cfg, "inner.sizes=3,4,5")
    cfg = config_tree.override(cfg, "inner.kind=B")
    cfg = config_tree.override(cfg, "flag=true")
    cfg = config_tree.override(cfg, "steps=20")
    cfg = config_tree.override(cfg, "inner.name=x")
    assert cfg == Outer(steps=20, flag=True, inner=Inner(rate=1e-3, sizes=(3, 4, 5), kind=Kind.B, name="x"))
    assert config_tree.override(cfg, "inner.name=none").inner.name is None


def test_unknown_keys_fail_with_valid_list():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['inner.rat'\]; valid keys here: "
                                         r"\['inner.kind', 'inner.name', 'inner.rate', 'inner.sizes'\]"):
        config_tree.override(Outer(), "inner.rat=1")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['bogus'\]"):
        config_tree.from_dict(Outer, {"bogus": 1})


def test_bad_values_name_key_and_value():
    with pytest.raises(ValueError, match=r"'steps': cannot use '1.5'"):
        config_tree.override(Outer(), "steps=1.5")
    with pytest.raises(ValueError, match=r"'inner.kind'.*expected one of \['a', 'b'\]"):
        config_tree.override(Outer(), "inner.kind=c")
    with pytest.raises(ValueError, match=r"'flag'.*expected true or false"):
        config_tree.override(Outer(), "flag=maybe")
    with pytest.raises(ValueError, match="key.path=value"):
        config_tree.override(Outer(), "steps")


def test_round_trip_through_dict():
    cfg = model_config("vit_g14")
    assert config_tree.from_dict(ModelConfig, config_tree.to_dict(cfg)) == cfg
    assert "vision.width" in config_tree.leaf_keys(cfg)


def test_model_config_validation():
    with pytest.raises(ValueError, match="unknown model preset 'vit_x'"):
        model_config("vit_x")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        model_config("tiny", image_size=100)


def test_set_one_key_of_a_dict_field_keeps_the_others_and_reads_literals():
    """`--set engine.engine_kwargs.gpu_memory_utilization=0.8` changes one key, as a float (issue #13 item 7)."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Engine:
        engine_kwargs: dict[str, Any] = dataclasses.field(
            default_factory=lambda: {"limit_mm_per_prompt": {"image": 1}, "enforce_eager": True})
        weights: dict[str, float] = dataclasses.field(default_factory=lambda: {"short": 1.0, "long": 1.0})

    cfg = config_tree.override(Engine(), "engine_kwargs.gpu_memory_utilization=0.8")
    assert cfg.engine_kwargs == {"limit_mm_per_prompt": {"image": 1}, "enforce_eager": True,
                                 "gpu_memory_utilization": 0.8}
    cfg = config_tree.override(cfg, "engine_kwargs.limit_mm_per_prompt.video=0")
    assert cfg.engine_kwargs["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    cfg = config_tree.override(cfg, "engine_kwargs.enforce_eager=null")
    assert "enforce_eager" not in cfg.engine_kwargs
    cfg = config_tree.override(cfg, "engine_kwargs.model_impl=transformers")
    assert cfg.engine_kwargs["model_impl"] == "transformers"
    cfg = config_tree.override(cfg, "weights.short=0.5")
    assert cfg.weights == {"short": 0.5, "long": 1.0}
    whole = config_tree.override(Engine(), 'engine_kwargs={"max_model_len": 512}')
    assert whole.engine_kwargs == {"max_model_len": 512}   # the whole dict, given as JSON, replaces it


def test_done_before_returns_the_record_of_the_same_config_only(tmp_path):
    """The one skip-if-done rule (pipelines.cli): a record holds its config as JSON stores it."""
    from pipelines import cli, storage
    from pipelines.train.config import preset

    cfg = preset("tiny")
    uri = str(tmp_path / "summary.json")
    assert cli.done_before(uri, cfg) is None                                   # nothing recorded yet
    storage.write_json(uri, cli.done_record(cfg, result={"loss": 1.5}, complete=True))
    assert cli.done_before(uri, cfg)["result"] == {"loss": 1.5}               # enums and tuples compare as stored
    assert cli.done_before(uri, config_tree.override(cfg, "steps=31")) is None
    steps = {"suite": "synthetic", "models": {"a": "x"}, "sizes": (1, 2)}      # the chain's dict configs
    storage.write_json(uri, cli.done_record(steps, result={}))
    assert cli.done_before(uri, steps) == {"config": {"suite": "synthetic", "models": {"a": "x"}, "sizes": [1, 2]},
                                           "result": {}}
    assert cli.done_before(uri, {**steps, "suite": "coco"}) is None


@dataclass(frozen=True, kw_only=True)
class Named:
    """A dict of config sections, as pipelines.caption's `passes`."""
    sections: dict[str, Inner] = field(default_factory=lambda: {"x": Inner(rate=0.5, kind=Kind.B)})


def test_one_key_of_a_named_section_keeps_the_rest_of_that_section():
    cfg = config_tree.override(Named(), "sections.x.rate=0.25")
    assert cfg.sections["x"] == Inner(rate=0.25, kind=Kind.B)          # kind kept, not reset to the default
    cfg = config_tree.override(cfg, "sections.y.sizes=3,4")              # a new section: defaults elsewhere
    assert cfg.sections["y"] == Inner(sizes=(3, 4)) and list(cfg.sections) == ["x", "y"]
    assert list(config_tree.override(cfg, "sections.x=null").sections) == ["y"]
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['sections.x.rte'\]"):
        config_tree.override(cfg, "sections.x.rte=1")
    again = config_tree.from_dict(Named, config_tree.to_dict(cfg))      # JSON round trip
    assert again == cfg

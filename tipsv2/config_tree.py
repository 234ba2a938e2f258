"""Typed configuration trees: overrides by dotted path, dict round trips, loud errors on unknown keys.

Every config in this project is a frozen, keyword-only dataclass. A pipeline resolves its config as
`preset -> optional JSON file -> --set key.path=value ...`; each step goes through this module so that
a misspelt key fails with the list of keys that do exist.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class SetText(str):
    """A value typed on the command line (`--set k=v`): where the field's type says nothing (`Any`, as in
    a dict of engine keyword arguments), it is read as a JSON literal if it is one (0.8, true, null,
    {"image": 1}), else kept as text. Values from JSON files keep the type they have there."""


def _literal(value: SetText) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return str(value)


def _nulls_as_none(update: dict) -> dict:
    """`--set k.key=null` removes `key` from a dict field: typed `null` / `none` become None (nested too)."""
    return {k: _nulls_as_none(v) if isinstance(v, dict)
            else None if isinstance(v, SetText) and v.lower() in ("null", "none") else v for k, v in update.items()}


def _literals(value: Any) -> Any:
    """Command-line text read as JSON literals, inside dicts too; everything else as it is."""
    if isinstance(value, SetText):
        return _literal(value)
    if isinstance(value, dict):
        return {k: _literals(v) for k, v in value.items()}
    return value


def merge_dicts(current: dict, update: dict) -> dict:
    """`current` with `update` applied key by key, nested dicts merged the same way; None removes a key."""
    merged = dict(current)
    for key, value in update.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, *, key: str) -> Any:
    """Turn `value` (from JSON or a `--set` string) into type `tp`; ValueError naming `key` if it cannot."""
    tp, optional = _strip_optional(tp)
    if tp is Any:
        return _literals(value)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"config key {key!r}: got None, expected a value of type {tp}")
    try:
        if dataclasses.is_dataclass(tp):
            if isinstance(value, str):
                value = json.loads(value)
            return from_dict(tp, value, prefix=key + ".")
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            if isinstance(value, tp):
                return value
            names = {m.name.lower(): m for m in tp} | {str(m.value).lower(): m for m in tp}
            if str(value).lower() not in names:
                raise ValueError(f"expected one of {[m.name.lower() for m in tp]}")
            return names[str(value).lower()]
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        origin = typing.get_origin(tp)
        if origin in (tuple, list):
            if isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            args = typing.get_args(tp)
            if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(v, args[0], key=key) for v in value)
            if origin is tuple:
                if len(value) != len(args):
                    raise ValueError(f"expected {len(args)} items")
                return tuple(coerce(v, a, key=key) for v, a in zip(value, args))
            return [coerce(v, args[0], key=key) for v in value]
        if origin is dict:
            if isinstance(value, str):
                value = json.loads(value)
            kt, vt = typing.get_args(tp)
            return {coerce(k, kt, key=key): coerce(v, vt, key=key) for k, v in dict(value).items()}
    except (TypeError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"config key {key!r}: cannot use {value!r}: {err}") from None
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
    """Build `cls` from a (nested) dict; unknown keys raise ValueError listing the valid ones."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or cls.__name__!r}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: "
                         f"{sorted(prefix + k for k in types_)}")
    kwargs = {k: coerce(v, types_[k], key=prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict (enums by name, tuples as lists)."""
    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, enum.Enum):
            return value.name.lower()
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {str(convert(k)): convert(v) for k, v in value.items()}
        return value
    return convert(cfg)


def merge(cfg: T, data: dict[str, Any], *, prefix: str = "") -> T:
    """Return `cfg` with the (nested, partial) dict `data` applied on top."""
    types_ = _field_types(type(cfg))
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: "
                         f"{sorted(prefix + k for k in types_)}")
    changes = {}
    for key, value in data.items():
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = merge(current, value, prefix=prefix + key + ".")
        elif isinstance(current, dict) and isinstance(value, dict) and _holds_configs(types_[key]):
            changes[key] = _merge_entries(current, value, types_[key], prefix=prefix + key + ".")
        elif isinstance(current, dict) and isinstance(value, dict):
            # One key of a dict field (`--set engine.engine_kwargs.x=1`) changes that key, not the whole dict.
            changes[key] = coerce(merge_dicts(current, _nulls_as_none(value)), types_[key], key=prefix + key)
        else:
            changes[key] = coerce(value, types_[key], key=prefix + key)
    return dataclasses.replace(cfg, **changes)


def _holds_configs(tp: Any) -> bool:
    """A dict field whose values are config dataclasses (named sections: `passes.b.engine...`)."""
    tp, _ = _strip_optional(tp)
    return typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1])


def _merge_entries(current: dict, update: dict, tp: Any, *, prefix: str) -> dict:
    """A dict of configs with `update` applied: an entry it names is merged key by key (the rest of that
    entry kept), a new entry built from its keys (defaults elsewhere), null removes one."""
    kt, vt = typing.get_args(_strip_optional(tp)[0])
    merged = dict(current)
    for name, value in _nulls_as_none(update).items():
        name = coerce(name, kt, key=prefix.rstrip("."))
        if value is None:
            merged.pop(name, None)
        elif name in merged and isinstance(value, dict):
            merged[name] = merge(merged[name], value, prefix=f"{prefix}{name}.")
        else:
            merged[name] = coerce(value, vt, key=f"{prefix}{name}")
    return merged


def override(cfg: T, assignment: str) -> T:
    """Apply one `a.b.c=value` assignment (the `--set` syntax)."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key.path=value, got {assignment!r}")
    path, value = assignment.split("=", 1)
    nested: dict[str, Any] = {}
    node = nested
    parts = path.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = SetText(value)
    return merge(cfg, nested)


def leaf_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted leaf path of a config tree (for help texts and error messages)."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += leaf_keys(value, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys

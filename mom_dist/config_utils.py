"""Helpers that turn YAML/dicts into validated config dataclasses.

Every config in mom_dist is a dataclass with a ``validate()`` method. ``from_dict`` builds one
from a plain dict, recursing into nested dataclasses, and rejects unknown keys with a message
that lists the valid ones. ``apply_overrides`` applies ``a.b.c=value`` strings from the command
line (values parsed as YAML, so ``true``, ``3``, ``1e-3`` and ``[1, 2]`` work).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

import yaml


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nested_dataclass(tp) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):  # Optional[SomeConfig]
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``ValueError`` naming the fix."""
    data = dict(data or {})
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(types), n=1)
        hint = f" Did you mean '{where}{close[0]}'?" if close else ""
        raise ValueError(
            f"unknown config key '{where}{key}'.{hint} Valid keys here: {', '.join(sorted(types))}."
        )
    kwargs = {}
    for name, value in data.items():
        sub = _nested_dataclass(types[name])
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, where=f"{where}{name}.")
        kwargs[name] = _coerce(value, types[name], f"{where}{name}")
    obj = cls(**kwargs)
    if not where and hasattr(obj, "validate"):  # the top level validates its sections
        obj.validate()
    return obj


def _coerce(value, tp, name: str):
    """YAML 1.1 reads ``1e-3`` as a string: accept numbers written that way for numeric fields.
    It also reads ``on``/``off`` as booleans: a text field (``grouped_gemm``, ``compile``) gets
    the word back."""
    if tp is str and isinstance(value, bool):
        return "on" if value else "off"
    if tp is float and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} must be a number")
    if tp is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} must be an integer")
    return value


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def set_by_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``section.key=value`` overrides (YAML-parsed values) to a config dict in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like section.key=value (e.g. model.n_steps=4)")
        key, raw = item.split("=", 1)
        set_by_path(data, key.strip(), yaml.safe_load(raw))
    return data


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ValueError(f"config file '{path}' does not exist; pass a path under configs/ (e.g. configs/tiny.yaml)")
    if not isinstance(data, dict):
        raise ValueError(f"config file '{path}' must hold a mapping at the top level")
    return data


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: used by every ``validate()``."""
    if not condition:
        raise ValueError(message)


def check_choice(value, choices, field: str) -> None:
    check(value in choices, f"{field}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")

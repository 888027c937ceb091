"""Helpers that turn YAML/dicts into validated config dataclasses.

Every config in mom_dist is a dataclass with a ``validate()`` method. ``from_dict`` builds one
from a plain dict, recursing into nested dataclasses; it rejects unknown keys with a message
that lists the valid ones, and values of the wrong type (a float for an int, a scalar for a
section, a list of the wrong length, a string for a number) with a message naming the field,
the value and what is expected, all derived from the dataclass annotations (``checked_fields``),
so it happens before ``validate()`` compares values and before anything is written.
``apply_overrides`` applies ``a.b.c=value`` strings from the command line (values parsed as
YAML, so ``true``, ``3``, ``1e-3`` and ``[1, 2]`` work). Every failure is one ``ValueError`` line.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

import yaml


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass ``cls`` from ``data``: unknown keys and values of the wrong type raise
    ``ValueError`` naming the field and the fix (``checked_fields``); the top level validates."""
    obj = cls(**checked_fields(cls, data, where))
    if not where and hasattr(obj, "validate"):  # the top level validates its sections
        obj.validate()
    return obj


def checked_fields(cls, data: dict | None, where: str = "") -> dict:
    """``data``'s values checked against the type annotations of dataclass ``cls``'s fields.

    One check for every config section, derived from the annotations, so no field can be
    forgotten: ``int`` (an integral float such as 1e4 is taken, 2.5 is refused), ``float`` (YAML
    1.1 reads ``1e-3`` as a string: numeric strings are taken), ``bool``, ``str``, ``X | None``,
    ``tuple[X, Y]`` (that length), ``tuple[X, ...]``/``list[X]``, ``dict``, and nested dataclasses
    (a mapping, checked recursively; null is refused); unknown keys are refused too. Returns the
    converted values; raises ``ValueError("model.d_model=2.5 must be an integer (default: 768)")``.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where.rstrip('.') or 'the config'}={data!r} must be {_describe(cls)}")
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types), key=str)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(types), n=1)
        hint = f" Did you mean '{where}{close[0]}'?" if close else ""
        raise ValueError(f"unknown config key '{where}{key}'.{hint} Valid keys here: {', '.join(sorted(types))}.")
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    return {name: check_value(value, types[name], f"{where}{name}", defaults.get(name, _NO_DEFAULT))
            for name, value in data.items() if name in types}


_NO_DEFAULT = object()


def check_value(value, tp, name: str, default=_NO_DEFAULT):
    """``value`` converted to type ``tp`` (see ``checked_fields``), or ``ValueError`` naming ``name``."""
    ok, out = _convert(value, tp, name)
    if ok:
        return out
    example = "" if default is _NO_DEFAULT or dataclasses.is_dataclass(default) else f" (default: {_yaml(default)})"
    hint = ""
    if value is None and (dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict or tp is dict):
        hint = f"; an empty '{name.rsplit('.', 1)[-1]}:' in YAML is null: remove the key for the defaults"
    elif isinstance(value, (int, float)) and str in (_union_args(tp) or (tp,)):
        hint = f"; write '{value}' in quotes if you mean the text"
    raise ValueError(f"{name}={_yaml(value)} must be {_describe(tp)}{example}{hint}")


def _yaml(value) -> str:
    """A value as the user would write it in YAML / --set (lists in brackets, null, quoted strings)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _union_args(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _convert(value, tp, name):
    """(True, converted value) when ``value`` fits ``tp``, else (False, None)."""
    if tp is Any:
        return True, value
    options = _union_args(tp)
    if options is not None:
        if value is None:
            return type(None) in options, None
        for option in options:
            if option is not type(None):
                ok, out = _convert(value, option, name)
                if ok:
                    return True, out
        return False, None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return True, from_dict(tp, value, where=f"{name}.")
        return False, None
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str and isinstance(value, bool):
        # YAML 1.1 reads on/off as booleans: a text field (grouped_gemm, compile) gets the word back
        return True, "on" if value else "off"
    if isinstance(value, bool):
        return False, None  # never a number
    if tp is int:
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else int(value)
            except ValueError:
                return False, None
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int), value
    if tp is float:
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else None
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, None
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return False, None
            items = [check_value(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        elif args:
            items = [check_value(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
        else:
            items = list(value)
        return True, tuple(items) if origin is tuple else items
    if origin is dict:
        return isinstance(value, dict), value
    return True, value  # a type this checker does not know: left to validate()


def _describe(tp) -> str:
    """What a value of type ``tp`` looks like, for the error message."""
    options = _union_args(tp)
    if options is not None:
        parts = [_describe(o) for o in options if o is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in options else "")
    if dataclasses.is_dataclass(tp):
        return f"a section (a mapping with keys among {', '.join(sorted(_field_types(tp)))})"
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              dict: "a section (a mapping)"}
    if tp in simple:
        return simple[tp]
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            kinds = {_plural(a) for a in args}
            return f"a list of {len(args)} {kinds.pop()}" if len(kinds) == 1 else f"a list of {len(args)} values"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict:
        return simple[dict]
    return getattr(tp, "__name__", str(tp))


def _plural(tp) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, "values")


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def set_by_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for i, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override '{dotted}': {'.'.join(keys[:i + 1])}={_yaml(node)} is not a section (a "
                             f"mapping), so it has no key '{keys[i + 1]}'; fix that value in the config")
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``section.key=value`` overrides (YAML-parsed values) to a config dict in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like section.key=value (e.g. model.n_steps=4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"override '{item}': the value is not valid YAML ({_yaml_problem(err)}); "
                             "write lists as [0.9, 0.95], sections as '{kind: gru, dim: 32}', and quote "
                             "strings with special characters") from None
        set_by_path(data, key.strip(), value)
    return data


def _yaml_problem(err: Exception) -> str:
    """A YAML parser error on one line: what went wrong and where (1-based line and column)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ValueError(f"config file '{path}' does not exist; pass a path under configs/ (e.g. configs/tiny.yaml)")
    except yaml.YAMLError as err:
        raise ValueError(f"config file '{path}' is not valid YAML: {_yaml_problem(err)}; fix the syntax there "
                         "(keys need a space after ':', lists are [a, b])") from None
    except UnicodeDecodeError:
        raise ValueError(f"config file '{path}' is not UTF-8 text; pass a YAML config (e.g. configs/tiny.yaml)") from None
    except OSError as err:
        raise ValueError(f"config file '{path}' cannot be read ({err.strerror or err}); pass a readable YAML "
                         "file (e.g. configs/tiny.yaml)") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file '{path}' must hold a mapping at the top level")
    return data


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: used by every ``validate()``."""
    if not condition:
        raise ValueError(message)


def check_choice(value, choices, field: str) -> None:
    check(value in choices, f"{field}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")

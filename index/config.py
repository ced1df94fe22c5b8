"""Config loading, one way for every config (the Spark job's, the trainer's, the model presets).

A YAML file (``read_yaml``), ``--set a.b=value`` overrides (``apply_overrides``), and a (nested)
dataclass built from the mapping with strict keys and type coercion (``build``). Every problem is
one ``ConfigError``: a ``ValueError`` whose message is one line naming the file, the key path and
what to do. Ground floor: the standard library and yaml only, so any layer may load a config.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line."""


class ConfigNotFound(ConfigError, FileNotFoundError):
    """No config of that name or path (a FileNotFoundError too: callers catch either)."""


def find_yaml(name_or_path: str, directory: str, what: str) -> str:
    """``name_or_path`` when it is a file, else ``directory/<name>.yaml``."""
    if os.path.isfile(name_or_path):
        return name_or_path
    path = os.path.join(directory, f"{name_or_path}.yaml")
    if os.path.isfile(path):
        return path
    names = sorted(f[:-5] for f in os.listdir(directory) if f.endswith(".yaml")) if os.path.isdir(directory) else []
    raise ConfigNotFound(f"no {what} {name_or_path!r}: not a file and not one of {names} (in {directory})")


def read_yaml(path: str, where: str | None = None) -> dict:
    """The mapping a YAML file holds ({} for an empty file); errors name ``where`` (default: the path)."""
    where = where or path
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got a {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """``key=value`` / ``section.key=value`` strings applied to ``raw`` in place. Values are parsed as
    YAML: ``[2,1]`` is a list, ``false`` a bool, ``{hf: DIR}`` a mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        keys = key.split(".")
        if not sep or not all(keys):
            raise ConfigError(f"--set {item!r}: expected key=value or section.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); quote it"
            ) from None
        node = raw
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[: i + 1])} is {node!r}, not a section")
        node[keys[-1]] = value
    return raw


def section(raw: dict, key: str, where: str) -> dict:
    """``raw[key]`` taken out of ``raw``: a mapping, empty when absent (for sections read by hand)."""
    value = raw.pop(key, None)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
    return dict(value)


def build(cls, raw: dict, where: str, *, key: str = "", fixed: dict | None = None, what: str = ""):
    """A ``cls`` dataclass from ``raw``, nested dataclasses too. Unknown keys are refused (the message
    lists the known ones); values are coerced to the field types (``_coerce``). ``where`` names the
    source (a file), ``key`` the key path of ``raw`` in it, ``fixed`` ready-made fields, ``what`` the
    kind of config in the unknown-keys message. The dataclass's own ValueErrors become ConfigErrors."""
    at = f"{where}: {key}" if key else where
    if not isinstance(raw, dict):
        raise ConfigError(f"{at}: expected a mapping of {cls.__name__} keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{at}: unknown {what + ' ' if what else ''}keys {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k], where, f"{key}.{k}" if key else k) for k, v in raw.items()}
    values.update(fixed or {})
    missing = sorted(
        n
        for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"{at}: missing keys {missing}")
    try:
        return cls(**values)
    except ValueError as e:  # the dataclass's own checks (__post_init__)
        raise ConfigError(f"{at}: {e}") from None


def _coerce(value, tp, where: str, key: str):
    """``value`` as type ``tp``: YAML reads 1e-4 as a string and has no tuples, a command line gives
    strings, and a single string stands for a list of one. A bool is never taken for a number."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, {} if value is None else value, where, key=key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where, key)
    if origin in (list, tuple):
        if args == (str,) and isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            if origin is tuple and Ellipsis not in args:
                if len(value) == len(args):
                    return tuple(_coerce(v, a, where, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            else:
                items = [_coerce(v, args[0], where, f"{key}[{i}]") for i, v in enumerate(value)]
                return items if origin is list else tuple(items)
    elif isinstance(value, bool):
        if tp is bool:
            return value
    elif tp in (int, float) and isinstance(value, (int, float, str)) and not (tp is int and isinstance(value, float)):
        try:
            return tp(value)
        except ValueError:
            pass
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: {key}: {value!r} is not {_describe(tp)}")


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and Ellipsis not in args:
        return f"a list [{', '.join(map(_describe, args))}]"
    if origin in (list, tuple):
        return "a list of strings" if args[0] is str else f"a list of {_describe(args[0])} values"
    return tp.__name__

"""Configuration: dataclasses with defaults in code, YAML files, dotted ``key=value`` overrides.

Unknown keys and values of the wrong type are rejected with one message that names the key and what is
allowed, and so are values no config may hold (``vqgen.core.checks``: non-finite floats, seeds outside
``[0, 2**32)``, integers beyond 64 bits, over-long names, YAML with a key written twice). ``load_config(cls, path, overrides)`` is the single entry point the pipelines use.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .checks import check_float, check_int, check_str, load_yaml
from .errors import UserError
from .io import atomic_path


class ConfigError(UserError, ValueError):
    """A configuration the user wrote is invalid; the message says what to change."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (nested dataclasses, lists, dicts)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"config key '{key}': {value!r} is not allowed; choose one of {allowed}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; give a mapping, not {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        ktp, vtp = get_args(tp) or (Any, Any)
        return {_convert(k, ktp, key): _convert(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any numeric spelling
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None:
                return check_float(number, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        try:
            return check_float(float(value), key)
        except OverflowError:
            raise ConfigError(f"config key '{key}' is too large a number") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return check_int(int(value), key)
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return check_int(value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return check_str(value, key)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) mapping, rejecting unknown keys and wrong types.

    A class with a ``__config_resolve__(data, prefix) -> (cls, data)`` classmethod picks the class to build from
    the data itself (the quantizer config: one class per kind).
    """
    data = dict(data or {})
    resolve = getattr(cls, "__config_resolve__", None)
    if resolve is not None:
        cls, data = resolve(data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        allowed = ", ".join(sorted(fields))
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys{' in ' + prefix[:-1] if prefix else ''}: {allowed}"
        )
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(f"{prefix[:-1] or cls.__name__}: {err}") from None
    return obj


def to_dict(cfg: Any) -> dict:
    """A dataclass as plain nested dicts/lists (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def _set_dotted(target: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """``["a.b=3", "c=[1, 2]"]`` -> ``{"a": {"b": 3}, "c": [1, 2]}`` (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.steps=1000)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            message = " ".join(str(err).split())
            raise ConfigError(f"override '{item}': value is not valid YAML ({message})") from None
        _set_dotted(out, key, value)
    return out


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; ``update`` wins. Neither input is modified."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with clear errors for a missing file or a non-mapping document."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; --config takes a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the --config path")
    try:
        data = load_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        message = " ".join(str(err).split())  # PyYAML's message spans several lines
        raise ConfigError(f"config file {path} is not valid YAML: {message}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty; give at least one key (or leave --config out for the defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Defaults from ``cls``, then the YAML file at ``path``, then ``key=value`` overrides."""
    data = read_yaml(path) if path else {}
    data = merge(data, parse_overrides(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        where = f" (in {path})" if path else ""
        raise ConfigError(f"{err}{where}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (a config dataclass, or its dict) as YAML, atomically."""
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))

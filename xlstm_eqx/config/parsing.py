"""Turning dicts, YAML files and dotted overrides into frozen config dataclasses, and back.

Every error names the dotted path of the field at fault (``model.num_heads``), so a typo in a
200-line YAML file is found at once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from beartype.door import is_bearable

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent. ``path`` is the dotted field path."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Converts YAML-natural values to ``hint`` (dict → dataclass, list → tuple, int → float)."""
    if _is_dataclass_type(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping for {hint.__name__}, got {type(value).__name__}")
        return from_dict(hint, value, path)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                candidate = _coerce(value, option, path)
            except ConfigError:
                continue
            if is_bearable(candidate, option):
                return candidate
        return value
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) == len(value):
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return tuple(value)
    if hint is int and isinstance(value, bool):  # beartype takes a bool for an int; YAML's yes/true is not 1
        raise ConfigError(path, f"expected int, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-3" (no dot) as a string
            return float(value)
        except ValueError:
            return value
    return value


def _admits_bool(hint: Any) -> bool:
    """Whether ``hint`` means a bool may stand there (beartype takes a bool for an int: it subclasses int)."""
    if hint is bool or hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_admits_bool(option) for option in typing.get_args(hint))
    if origin is typing.Literal:
        return any(isinstance(option, bool) for option in typing.get_args(hint))
    return False


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Builds dataclass ``cls`` from ``data``, checking keys, types and the class's own invariants."""
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(_join(path, str(unknown[0])), f"unknown key; {cls.__name__} has fields {sorted(fields)}")
    kwargs = {}
    for name, raw in data.items():
        field_path = _join(path, name)
        value = _coerce(raw, hints[name], field_path)
        if not is_bearable(value, hints[name]) or (isinstance(value, bool) and not _admits_bool(hints[name])):
            raise ConfigError(field_path, f"expected {_hint_name(hints[name])}, got {value!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as error:  # raised by __post_init__ with a field-relative path
        raise ConfigError(_join(path, error.path), error.message) from None


def _hint_name(hint: Any) -> str:
    """How an annotation reads in an error: a Literal as the values it allows, unions member by member."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_hint_name(a) for a in args)
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def to_dict(config: Any) -> dict[str, Any]:
    """The inverse of :func:`from_dict`; tuples become lists so the result is plain YAML/JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return plain(config)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Returns a copy of ``data`` with ``key.sub=value`` overrides applied (values parsed as YAML)."""
    result = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like `section.field=value`")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = result
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(keys[: depth + 1]), "is a value, not a section")
            node = child
        node[keys[-1]] = yaml.safe_load(text)
    return result


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(str(path), f"invalid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "the top level of a config file must be a mapping")
    return data

"""Typed, self-describing role settings.

Each role declares its settings once, as a frozen dataclass whose fields carry
a default and a one-line doc (``setting(default, "doc")``). ``parse`` builds an
instance from plain YAML data, rejecting unknown keys and wrong types with a
:class:`~webstack.errors.ConfigError` naming the file and the key. The README
tables are generated from the same declarations (``webstack.docs``).

Supported field types: ``str``, ``int``, ``float``, ``bool``, ``Literal[...]``,
``X | None``, ``tuple[X, ...]`` (a YAML list) and nested settings dataclasses
(a YAML mapping).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from webstack.errors import ConfigError

T = TypeVar("T")

# A function giving the file a key came from, for error messages.
Locator = Callable[[str], str]


def setting(default: Any, doc: str) -> Any:
    """Declare a settings field with its default and a one-line description."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples (immutable) for list defaults")
    return dataclasses.field(default=default, metadata={"doc": doc})


def required(doc: str) -> Any:
    """Declare a settings field that has no default (nested records only)."""
    return dataclasses.field(metadata={"doc": doc})


def fields_of(cls: type) -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, doc) for every field of a settings class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        out.append((f.name, hints[f.name], default, f.metadata.get("doc", "")))
    return out


def type_name(tp: Any) -> str:
    """A short human name for a settings type, as shown in errors and the README."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple:
        return f"list of {type_name(args[0])}"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad() -> ConfigError:
        return ConfigError(
            where, key, f"expected {type_name(tp)}, got {type(value).__name__} {value!r}"
        )

    if tp is Any:
        return value
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(where, key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for alt in non_none:
            try:
                return _convert(alt, value, key, where)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise bad()
    if origin is tuple:
        if not isinstance(value, list):
            raise bad()
        return tuple(_convert(args[0], item, f"{key}[{i}]", where) for i, item in enumerate(value))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise bad()
        return parse(tp, value, lambda _k: where, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"unsupported settings type {tp!r} for {key}")


def parse(cls: type[T], data: Mapping[str, Any], locate: Locator, prefix: str = "") -> T:
    """Build a settings instance of ``cls`` from ``data``.

    ``locate(key)`` names the file a key came from; ``prefix`` is prepended to
    key names in messages (for namespaced or nested keys).
    """
    known = {name: (tp, default) for name, tp, default, _doc in fields_of(cls)}
    for key in data:
        if key not in known:
            hint = ", ".join(sorted(known))
            raise ConfigError(locate(key), f"{prefix}{key}", f"unknown key (known: {hint})")
    values = {}
    for name, (tp, default) in known.items():
        if name in data:
            values[name] = _convert(tp, data[name], f"{prefix}{name}", locate(name))
        elif default is dataclasses.MISSING:
            raise ConfigError(locate(name), f"{prefix}{name}", "required key is missing")
    instance = cls(**values)
    check = getattr(instance, "check", None)
    if check is not None:
        problem = check()
        if problem:
            bad_key, message = problem
            top = re.split(r"[\[.]", bad_key, maxsplit=1)[0]
            raise ConfigError(locate(top), f"{prefix}{bad_key}", message)
    return instance

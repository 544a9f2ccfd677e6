"""Typed ``--data`` options of the deploys, refused before pyinfra connects when unknown.

Each deploy declares its options once, as a frozen dataclass whose fields use
:func:`option` (default, one-line doc, and the ``--data`` key when it is no
Python name, like ``from``). :func:`parse` builds the typed object from
pyinfra's host data; :func:`check_command_line` is called by the inventory
file, the earliest point of a pyinfra run, and refuses a misspelt or unknown
``--data`` key naming the key, the deploy and its options. The README table
of options is generated from the same declarations (``webstack.docs``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from webstack.catalog import Catalog, DeployInfo
from webstack.errors import ConfigError

T = TypeVar("T")

TRUE = ("1", "yes", "true", "on")
FALSE = ("0", "no", "false", "off", "")
# pyinfra's own host data (connection settings, global operation arguments) may also come from --data.
PYINFRA_PREFIXES = ("ssh_", "_")


class Data(Protocol):
    """What options are read from: pyinfra's host data, or any mapping."""

    def get(self, key: str, default: Any = None, /) -> Any: ...


def option(default: Any, doc: str, key: str | None = None) -> Any:
    """Declare an option field: its default, a one-line doc, and its ``--data`` key if not the field name."""
    return dataclasses.field(default=default, metadata={"doc": doc, "key": key})


def keys(cls: type) -> dict[str, dataclasses.Field]:
    """``--data`` key -> field of an options class."""
    return {f.metadata.get("key") or f.name: f for f in dataclasses.fields(cls)}


def to_bool(value: Any, key: str) -> bool:
    """The one reading of a yes/no option: 1/yes/true/on or 0/no/false/off (any case)."""
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ConfigError("--data", key, f"expected yes or no, got {value!r}")


def parse(cls: type[T], data: Data | Mapping[str, Any]) -> T:
    """The options object from ``data`` (pyinfra's host data: only the declared keys are read)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, f in keys(cls).items():
        raw = data.get(key)
        if raw is None or raw == "":  # `--data key=` is the default, as if not given
            continue
        values[f.name] = to_bool(raw, key) if hints[f.name] is bool else str(raw)
    return cls(**values)


def unknown(deploys: Iterable[DeployInfo], data_keys: Iterable[str]) -> str | None:
    """A message for the first ``--data`` key none of ``deploys`` declares, else None."""
    deploys = list(deploys)
    known = {k for d in deploys if d.options for k in keys(d.options)}
    for key in data_keys:
        if key in known or key.startswith(PYINFRA_PREFIXES):
            continue
        names = ", ".join(f"deploys/{d.name}.py" for d in deploys) or "this run"
        options = ", ".join(sorted(known)) or "none"
        return f"--data {key}: unknown option of {names} (its options: {options})"
    return None


# The running ``pyinfra`` command line, as read while the inventory loads (the click context is
# gone in the greenlets deploy code runs in): deploy file names, ``--data`` items, ``--dry``.
COMMAND_LINE: dict[str, Any] = {"deploys": [], "data": [], "dry": False}


def command_line() -> dict[str, Any]:
    """The running pyinfra command's deploys (file stems), ``--data`` (key -> value as given) and ``dry``."""
    data = {}
    for item in COMMAND_LINE["data"]:
        key, _, value = str(item).partition("=")
        data[key] = value
    return {"deploys": list(COMMAND_LINE["deploys"]), "dry": bool(COMMAND_LINE["dry"]), "data": data}


def check_command_line(catalog: Catalog) -> None:
    """Refuse unknown ``--data`` keys of the running ``pyinfra`` command (a no-op outside the CLI).

    Read from pyinfra's own parsed command line (the click context the
    inventory file is loaded in), so nothing is parsed twice.
    """
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None or "data" not in ctx.params:
        return
    COMMAND_LINE.update(deploys=[Path(str(op)).stem for op in ctx.params.get("operations") or ()
                                 if str(op).endswith(".py")],
                        data=list(ctx.params.get("data") or ()), dry=bool(ctx.params.get("dry")))
    files = [Path(str(op)) for op in ctx.params.get("operations") or () if str(op).endswith(".py")]
    if not files:
        return
    deploys = [catalog.deploys.get(f.stem) or DeployInfo(f.stem, "") for f in files]
    problem = unknown(deploys, [str(arg).split("=", 1)[0] for arg in ctx.params["data"]])
    if problem:
        raise ConfigError("pyinfra", None, problem)

"""What the tooling needs to know about the roles, handed over by the roles package.

The tooling (inventory loader, docs generator, ``webstack`` command) never
imports the roles. The roles package declares one :class:`Catalog` and
registers it under the entry point group ``webstack.catalog`` (pyproject.toml);
:func:`discover` finds it. A test or another role library can pass its own
catalog to :func:`webstack.inventory.load` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from webstack.inventory import HostConfig

ENTRY_POINT_GROUP = "webstack.catalog"


class RoleInfo(Protocol):
    """A role as the tooling sees it: name, one-line doc, settings dataclass."""

    @property
    def name(self) -> str: ...

    @property
    def doc(self) -> str: ...

    @property
    def settings(self) -> type: ...


@dataclass(frozen=True)
class DeployInfo:
    """A deploy (``deploys/<name>.py``) and the ``--data`` options it accepts (a frozen dataclass)."""

    name: str
    doc: str
    options: type | None = None


@dataclass(frozen=True)
class Catalog:
    """The roles an inventory may name, the deploys and their options, and the questions only roles answer."""

    roles: Mapping[str, RoleInfo]
    deploys: Mapping[str, DeployInfo]
    check_fleet: Callable[[Sequence[HostConfig], str], None]
    needed_secrets: Callable[[HostConfig], list[str]]
    ssh_port: Callable[[HostConfig], int]
    # The application a host runs or works for (its system user, unit and /srv/<app>), "" if none.
    app_name: Callable[[HostConfig], str] = lambda cfg: ""


@cache
def discover() -> Catalog:
    """The catalog registered under the ``webstack.catalog`` entry point (exactly one)."""
    from importlib.metadata import entry_points

    found = list(entry_points(group=ENTRY_POINT_GROUP))
    if len(found) != 1:
        names = ", ".join(f"{e.name} = {e.value}" for e in found) or "none"
        raise RuntimeError(f"webstack: expected one `{ENTRY_POINT_GROUP}` entry point, found {names} "
                           "(is the project installed? `make setup`)")
    catalog = found[0].load()
    if not isinstance(catalog, Catalog):
        raise RuntimeError(f"webstack: {found[0].value} is not a webstack.catalog.Catalog")
    return catalog

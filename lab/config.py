"""Load and validate the fleet file (lab/fleet.yml)."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lab.util import REPO_ROOT, LabError

DEFAULT_FLEET = REPO_ROOT / "lab" / "fleet.yml"
RELEASES = ("trixie", "bookworm")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,11}$")  # veth "vw-NAME" must fit IFNAMSIZ (15)


@dataclass(frozen=True)
class Machine:
    """One machine of the fleet."""

    name: str
    address: str
    release: str
    roles: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    on_demand: bool = False  # booted only when named (`lab up grow1`), never in the lab inventory

    @property
    def veth(self) -> str:
        """Host-side veth name (on the bridge)."""
        return f"vw-{self.name}"


@dataclass(frozen=True)
class Fleet:
    """The whole fleet: bridge, subnet and machines."""

    path: Path
    bridge: str
    subnet: ipaddress.IPv4Network
    gateway: str
    vip: str | None
    machines: tuple[Machine, ...] = field(default_factory=tuple)

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen

    def get(self, name: str) -> Machine:
        """The machine called name, or LabError."""
        for m in self.machines:
            if m.name == name:
                return m
        raise LabError(f"no machine called {name!r} in {self.path} "
                       f"(known: {', '.join(m.name for m in self.machines)})")

    @property
    def standing(self) -> tuple[Machine, ...]:
        """The machines `lab up` boots and the lab inventory lists (not the on-demand ones)."""
        return tuple(m for m in self.machines if not m.on_demand)

    def select(self, names: list[str]) -> list[Machine]:
        """Machines named in names (all standing machines if empty), in fleet order."""
        if not names:
            return list(self.standing)
        wanted = {self.get(n).name for n in names}
        return [m for m in self.machines if m.name in wanted]


def fleet_path(cli_value: str | None) -> Path:
    """--fleet, else $WEBSTACK_LAB_FLEET, else lab/fleet.yml."""
    value = cli_value or os.environ.get("WEBSTACK_LAB_FLEET")
    return Path(value).resolve() if value else DEFAULT_FLEET


def _expand(entries: list, path: Path) -> list:
    """An entry with ``count: N`` stands for N machines NAME1..NAMEN at consecutive addresses."""
    out = []
    for entry in entries:
        if isinstance(entry, dict) and "count" in entry:
            try:
                count, first = int(entry["count"]), ipaddress.IPv4Address(str(entry["address"]))
            except (KeyError, ValueError) as exc:
                raise LabError(f"fleet file {path}: entry {entry.get('name')!r}: bad count or address: {exc}") from exc
            rest = {k: v for k, v in entry.items() if k not in ("count", "name", "address")}
            out += [{**rest, "name": f"{entry['name']}{n + 1}", "address": str(first + n)} for n in range(count)]
        else:
            out.append(entry)
    return out


def load_fleet(path: Path) -> Fleet:
    """Parse and validate a fleet file."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise LabError(f"fleet file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise LabError(f"fleet file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise LabError(f"fleet file {path}: expected a mapping at top level")
    try:
        bridge = str(data["bridge"])
        subnet = ipaddress.IPv4Network(str(data["subnet"]))
    except (KeyError, ValueError) as exc:
        raise LabError(f"fleet file {path}: bad or missing bridge/subnet: {exc}") from exc
    if len(bridge) > 15:
        raise LabError(f"fleet file {path}: bridge name {bridge!r} longer than 15 characters")
    gateway = str(next(subnet.hosts()))
    vip = str(data["vip"]) if data.get("vip") else None
    machines: list[Machine] = []
    seen_names: set[str] = set()
    seen_addrs: set[str] = {gateway} | ({vip} if vip else set())
    for i, entry in enumerate(_expand(data.get("machines") or [], path)):
        where = f"fleet file {path}, machine #{i + 1}"
        if not isinstance(entry, dict):
            raise LabError(f"{where}: expected a mapping")
        try:
            name, address, release = str(entry["name"]), str(entry["address"]), str(entry["release"])
        except KeyError as exc:
            raise LabError(f"{where}: missing key {exc}") from exc
        if not NAME_RE.match(name):
            raise LabError(f"{where}: name {name!r} must match {NAME_RE.pattern}")
        if release not in RELEASES:
            raise LabError(f"{where}: release {release!r} not one of {RELEASES}")
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError as exc:
            raise LabError(f"{where}: bad address {address!r}") from exc
        if ip not in subnet:
            raise LabError(f"{where}: address {address} not in {subnet}")
        if name in seen_names or address in seen_addrs:
            raise LabError(f"{where}: duplicate name or address ({name}, {address})")
        seen_names.add(name)
        seen_addrs.add(address)
        machines.append(Machine(
            name=name, address=address, release=release,
            roles=tuple(str(r) for r in entry.get("roles") or ()),
            groups=tuple(str(g) for g in entry.get("groups") or ()),
            on_demand=bool(entry.get("on_demand", False)),
        ))
    if not machines:
        raise LabError(f"fleet file {path}: no machines")
    return Fleet(path=path, bridge=bridge, subnet=subnet, gateway=gateway, vip=vip,
                 machines=tuple(machines))

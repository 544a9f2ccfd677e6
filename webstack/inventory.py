"""Load a YAML inventory directory into validated, typed per-host configuration.

An inventory is a directory ``inventories/<env>/`` holding:

- ``hosts.yml``: ``ssh`` connection defaults and ``hosts`` (address, roles,
  groups, optional release);
- ``group_data/all.yml``, ``group_data/<group>.yml``: settings for every host /
  the hosts of one group or role;
- ``host_data/<host>.yml``: settings for one host;
- ``secrets.age``: the encrypted secrets (see ``webstack.secrets``).

Settings keys are flat and namespaced by role (``base__ssh_port``). They merge
explicitly, one key at a time: all < groups (in the order the host lists its
roles then groups) < host. Every key, type, secret and cross-host rule is
checked here, before pyinfra connects to any server; a problem raises
:class:`ConfigError` naming the file and key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from webstack.errors import ConfigError
from webstack.settings import parse

if TYPE_CHECKING:
    from webstack.catalog import Catalog

HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
RELEASES = ("bookworm", "trixie")
HOST_KEYS = {"address", "roles", "groups", "release"}
SSH_KEYS = {"user": "ssh_user", "key": "ssh_key", "known_hosts": "ssh_known_hosts_file"}
# The SSH port has one owner, the base role's ``ssh_port`` setting (sshd, firewall, pyinfra, onboarding).
PORT_HINT = "the SSH port is the setting base__ssh_port (sshd listens on it, pyinfra connects to it)"
# Set by `webstack onboard` for its one run: "name:port,..." are fresh servers, reached as root on the
# port their sshd answers on now; every other host as the inventory's admin user.
ROOT_LOGIN_ENV = "WEBSTACK_ROOT_LOGIN"

S = TypeVar("S")


def _settings_of(owner: str, settings: Mapping[str, Any], cls: type[S]) -> S:
    for value in settings.values():
        if type(value) is cls:
            return value
    raise LookupError(f"{owner} has no {cls.__name__} (its roles: base, {', '.join(k for k in settings if k != 'base')})")


@dataclass(frozen=True)
class Peer:
    """What every host may know about every other host of the inventory."""

    name: str
    address: str
    roles: tuple[str, ...]
    groups: tuple[str, ...]
    role_settings: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)
    release: str = ""

    def settings(self, cls: type[S]) -> S:
        """The peer's typed settings of one role, by class (``base`` and its own roles only)."""
        return _settings_of(self.name, self.role_settings, cls)

    def is_in(self, group_or_role: str) -> bool:
        """True when the host has this role or belongs to this group."""
        return group_or_role in self.roles or group_or_role in self.groups


@dataclass(frozen=True)
class HostConfig:
    """Everything a deploy needs to know about one host, validated."""

    name: str
    address: str
    env: str
    release: str | None
    roles: tuple[str, ...]
    groups: tuple[str, ...]
    role_settings: Mapping[str, Any]
    peers: tuple[Peer, ...]
    secrets: Mapping[str, Any] = field(repr=False)
    inventory_dir: str = ""

    def settings(self, cls: type[S]) -> S:
        """The typed settings of one role, by class: ``cfg.settings(LbSettings)`` is an ``LbSettings``."""
        return _settings_of(self.name, self.role_settings, cls)

    def with_settings(self, value: object) -> HostConfig:
        """This configuration with one role's settings replaced (what a host will be after a change)."""
        role = next(k for k, v in self.role_settings.items() if type(v) is type(value))
        return dataclasses.replace(self, role_settings={**self.role_settings, role: value})

    def secret(self, key: str) -> Any:
        """A secret as a pyinfra ``HiddenValue`` (masked in all output)."""
        return self.secrets[key]

    def to_json(self) -> dict[str, Any]:
        """What ``pyinfra INVENTORY debug-inventory`` prints: settings in full, secrets by name only."""
        return {
            "name": self.name, "address": self.address, "env": self.env, "release": self.release,
            "roles": list(self.roles), "groups": list(self.groups),
            "settings": {role: dataclasses.asdict(value) for role, value in self.role_settings.items()},
            "secrets": sorted(self.secrets), "peers": [p.name for p in self.peers],
        }


@dataclass
class _Source:
    """Merged raw settings with the file each key came from."""

    values: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)

    def update(self, data: Mapping[str, Any], path: str) -> None:
        for key, value in data.items():
            self.values[key] = value
            self.origin[key] = path


def _locator(source: _Source, role: str, fallback: str) -> Callable[[str], str]:
    """The file a role's setting came from (for error messages)."""
    return lambda key: source.origin.get(f"{role}__{key}", fallback)


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: Path, *, required: bool = True) -> Any:
    """Parse one YAML file, turning syntax errors into a ConfigError naming the file."""
    if not path.exists():
        if required:
            raise ConfigError(str(path), None, "file not found")
        return None
    try:
        text = path.read_text(encoding="utf-8")
        try:
            # libyaml's safe loader when PyYAML has it: about 10x faster, same results.
            return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader
        except yaml.YAMLError:
            return yaml.safe_load(text)  # raises again, with the pure-Python parser's clearer message
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(where, None, f"malformed YAML: {problem}") from None


def _mapping(data: Any, path: Path, what: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), None, f"{what} must be a mapping, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(str(path), str(key), "keys must be strings")
    return data


def _hosts(inv: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    path = inv / "hosts.yml"
    doc = _mapping(read_yaml(path), path, "hosts.yml")
    unknown = set(doc) - {"ssh", "hosts"}
    if unknown:
        raise ConfigError(str(path), sorted(unknown)[0], "unknown key (known: hosts, ssh)")
    ssh = _mapping(doc.get("ssh"), path, "ssh")
    for key in ssh:
        if key == "port":
            raise ConfigError(str(path), "ssh.port", f"not here: {PORT_HINT}")
        if key not in SSH_KEYS:
            raise ConfigError(str(path), f"ssh.{key}", f"unknown key (known: {', '.join(SSH_KEYS)})")
    hosts = _mapping(doc.get("hosts"), path, "hosts")
    if not hosts:
        raise ConfigError(str(path), "hosts", "no hosts defined")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in hosts.items():
        key = f"hosts.{name}"
        if not HOST_NAME.match(name):
            raise ConfigError(str(path), key, "host names are lower-case letters, digits and '-'")
        entry = _mapping(entry, path, key)
        for k in entry:
            if k == "port":
                raise ConfigError(str(path), f"{key}.port", f"not here: {PORT_HINT}")
            if k not in HOST_KEYS:
                raise ConfigError(str(path), f"{key}.{k}", f"unknown key (known: {', '.join(sorted(HOST_KEYS))})")
        address = entry.get("address")
        try:
            ipaddress.ip_address(str(address))
        except ValueError:
            raise ConfigError(str(path), f"{key}.address", f"not an IP address: {address!r}") from None
        for listkey in ("roles", "groups"):
            value = entry.get(listkey, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(str(path), f"{key}.{listkey}", "must be a list of names")
        release = entry.get("release")
        if release is not None and release not in RELEASES:
            raise ConfigError(str(path), f"{key}.release", f"must be one of {', '.join(RELEASES)}")
        out[name] = entry
    return ssh, out


def _settings_files(inv: Path, kind: str, name: str) -> tuple[Path, dict[str, Any]]:
    path = inv / kind / f"{name}.yml"
    return path, _mapping(read_yaml(path, required=False), path, f"{kind}/{name}.yml")


def load(inv_dir: str | Path, *, secrets: Mapping[str, str] | None = None,
         catalog: Catalog | None = None) -> list[HostConfig]:
    """Load and validate an inventory directory; return one HostConfig per host.

    ``secrets`` is the decrypted secrets mapping; when None it is read from the
    inventory's ``secrets.age`` (``webstack.secrets.decrypt``). ``catalog``: the
    roles (default: the one the roles package registers, ``webstack.catalog``).
    """
    from pyinfra.api import HiddenValue

    from webstack.catalog import discover

    catalog = catalog or discover()
    known_roles = catalog.roles
    inv = Path(inv_dir)
    env = inv.name
    ssh, hosts = _hosts(inv)
    hosts_path = str(inv / "hosts.yml")

    # Every role a host names exists; every data file names a known group or host.
    groups_known: set[str] = set()
    for name, entry in hosts.items():
        for role in entry.get("roles", []):
            if role not in known_roles or role == "base":
                known = ", ".join(sorted(r for r in known_roles if r != "base"))
                raise ConfigError(hosts_path, f"hosts.{name}.roles", f"unknown role {role!r} (known: {known})")
        groups_known.update(entry.get("roles", []))
        groups_known.update(entry.get("groups", []))
    for kind, known_names in (("group_data", groups_known | {"all"}), ("host_data", set(hosts))):
        folder = inv / kind
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.suffix != ".yml":
                    raise ConfigError(str(path), None, "data files end in .yml")
                if path.stem not in known_names:
                    what = "group or role" if kind == "group_data" else "host"
                    raise ConfigError(str(path), None, f"no {what} named {path.stem!r} in {hosts_path}")

    # Settings keys are '<role>__<field>' for a known role.
    def split_key(key: str, path: str) -> tuple[str, str]:
        role, sep, fieldname = key.partition("__")
        if not sep or role not in known_roles:
            raise ConfigError(path, key, f"unknown key: settings are '<role>__<setting>' with role one of {', '.join(sorted(known_roles))}")
        return role, fieldname

    all_path, all_data = _settings_files(inv, "group_data", "all")
    all_settings: dict[str, dict[str, Any]] = {}
    # (file, role) -> (a key, whether some host taking it from that file has the role)
    used: dict[tuple[str, str], tuple[str, bool]] = {}
    for name, entry in hosts.items():
        source = _Source()
        source.update(all_data, str(all_path))
        for group in [*entry.get("roles", []), *entry.get("groups", [])]:
            path, data = _settings_files(inv, "group_data", group)
            source.update(data, str(path))
        path, data = _settings_files(inv, "host_data", name)
        source.update(data, str(path))

        per_role: dict[str, dict[str, Any]] = {}
        for key, value in source.values.items():
            role, fieldname = split_key(key, source.origin[key])
            per_role.setdefault(role, {})[fieldname] = value
        applied = ("base", *entry.get("roles", []))
        for key, origin in source.origin.items():
            role = key.partition("__")[0]
            seen = used.get((origin, role), (key, False))
            used[(origin, role)] = (seen[0], seen[1] or role in applied)
        settings: dict[str, Any] = {}
        for role in applied:
            settings[role] = parse(
                known_roles[role].settings,
                per_role.get(role, {}),
                _locator(source, role, hosts_path),
                prefix=f"{role}__",
            )
        # Settings for a role the host does not have are still type-checked,
        # so a typo in group data never waits for the day the role is added.
        for role, data in per_role.items():
            if role not in applied:
                parse(known_roles[role].settings, data, _locator(source, role, hosts_path), prefix=f"{role}__")
        all_settings[name] = settings

    # Settings for a role no host of their group (or the host itself) has are a mistake: a scheduled
    # job in the app group's file would never run anywhere. all.yml may hold any role's defaults.
    for (origin, role), (key, has_role) in used.items():
        if not has_role and origin != str(all_path) and origin != hosts_path:
            raise ConfigError(origin, key, f"no host this file applies to has role {role!r}: "
                                           "the setting would never be used")
    peers = tuple(
        Peer(name, str(e["address"]), tuple(e.get("roles", [])), tuple(e.get("groups", [])), all_settings[name],
             str(e.get("release") or ""))
        for name, e in hosts.items()
    )
    drafts = [
        HostConfig(
            name=name,
            address=str(entry["address"]),
            env=env,
            release=entry.get("release"),
            roles=tuple(entry.get("roles", [])),
            groups=tuple(entry.get("groups", [])),
            role_settings=all_settings[name],
            peers=peers,
            secrets={},
            inventory_dir=str(inv),
        )
        for name, entry in hosts.items()
    ]
    catalog.check_fleet(drafts, hosts_path)

    # Secrets last: a settings mistake is reported even without the key.
    if secrets is None:
        from webstack.secrets import decrypt

        secrets = decrypt(inv)
    secrets_path = str(inv / "secrets.age")
    configs = []
    for draft in drafts:
        wanted = catalog.needed_secrets(draft)
        missing = [k for k in wanted if k not in secrets]
        if missing:
            raise ConfigError(secrets_path, missing[0],
                              f"missing secret (needed by host {draft.name}); add it with `webstack secrets edit {inv}`")
        configs.append(
            HostConfig(**{**draft.__dict__, "secrets": {k: HiddenValue(secrets[k]) for k in wanted}})
        )
    return configs


def root_logins(value: str) -> dict[str, int]:
    """``WEBSTACK_ROOT_LOGIN``'s "name:port,..." as {name: port}."""
    out = {}
    for item in filter(None, (x.strip() for x in value.split(","))):
        name, _, port = item.partition(":")
        out[name] = int(port or 22)
    return out


def pyinfra_groups(inventory_file: str, catalog: Catalog | None = None) -> dict[str, Any]:
    """The module-level groups a pyinfra inventory file exposes.

    ``inventories/<env>.py`` calls this with its ``__file__``; it loads
    ``inventories/<env>/`` and returns ``{"all": [(name, data), ...], <role or
    group>: [names], ...}``. Validation errors, and ``--data`` options the
    deploy does not declare, stop pyinfra before it connects.
    """
    from pyinfra.api.exceptions import PyinfraError

    from webstack import factcache, fastops, nodelay, sshoutput
    from webstack.catalog import discover
    from webstack.options import check_command_line

    factcache.install()
    fastops.install()
    nodelay.install()
    sshoutput.install()
    catalog = catalog or discover()
    inv = Path(inventory_file).resolve().with_suffix("")
    try:
        check_command_line(catalog)
        configs = load(inv, catalog=catalog)
        ssh, _ = _hosts(inv)
    except ConfigError as exc:
        raise PyinfraError(f"webstack: {exc}") from None

    root_login = root_logins(os.environ.get(ROOT_LOGIN_ENV, ""))
    unknown = sorted(set(root_login) - {cfg.name for cfg in configs})
    if unknown:
        raise PyinfraError(f"webstack: {ROOT_LOGIN_ENV} names hosts not in {inv}: {', '.join(unknown)}")
    all_hosts = []
    groups: dict[str, list[str]] = {}
    for cfg in configs:
        data: dict[str, Any] = {"ssh_hostname": cfg.address, "ssh_port": catalog.ssh_port(cfg), "webstack": cfg}
        for key, data_key in SSH_KEYS.items():
            if key in ssh:
                data[data_key] = ssh[key]
        if cfg.name in root_login:
            data["ssh_user"], data["ssh_port"] = "root", root_login[cfg.name]
        if data.get("ssh_user", "root") != "root":
            data["_sudo"] = True
        all_hosts.append((cfg.name, data))
        for group in (*cfg.roles, *cfg.groups):
            groups.setdefault(group, []).append(cfg.name)
    return {"all": all_hosts, **groups}

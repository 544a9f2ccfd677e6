"""The roles an inventory may name, their order, secrets and cross-host rules.

This module imports only settings declarations (no pyinfra operations), so the
inventory loader, the docs generator and the unit tests can use it freely.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from roles.base.settings import BaseSettings
from webstack.errors import ConfigError

if TYPE_CHECKING:
    from webstack.inventory import HostConfig


@dataclass(frozen=True)
class Role:
    """One role: its settings class, the roles it must follow, its secrets."""

    name: str
    doc: str
    settings: type
    after: tuple[str, ...] = ()
    secrets: Callable[[HostConfig], list[str]] = lambda cfg: []


def _base_secrets(cfg: HostConfig) -> list[str]:
    # A console password per operator: SSH stays key-only, but a broken
    # network or sshd config must not lock the operator out of the console.
    return [f"password_hash_{u.name}" for u in cfg.role("base").admin_users]


ROLES: dict[str, Role] = {
    "base": Role("base", "every host: users, SSH, firewall, updates, time, journal", BaseSettings, secrets=_base_secrets),
}


def ordered_roles(names: Sequence[str]) -> list[str]:
    """The given roles in dependency order (each after the roles it names in ``after``)."""
    done: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        for dep in ROLES[name].after:
            if dep in names:
                visit(dep)
        done.append(name)

    for name in sorted(names):
        visit(name)
    return done


def needed_secrets(cfg: HostConfig) -> list[str]:
    """Secret keys the host's roles need, base included."""
    keys: list[str] = []
    for role in ("base", *cfg.roles):
        keys.extend(k for k in ROLES[role].secrets(cfg) if k not in keys)
    return keys


def check_fleet(configs: Sequence[HostConfig], where: str) -> None:
    """Rules that span hosts; raise ConfigError naming the host and key."""
    seen: dict[str, str] = {}
    for cfg in configs:
        if cfg.address in seen:
            raise ConfigError(where, f"hosts.{cfg.name}.address", f"{cfg.address} is also the address of {seen[cfg.address]}")
        seen[cfg.address] = cfg.name
    groups = {g for cfg in configs for g in (*cfg.roles, *cfg.groups)}
    for cfg in configs:
        base = cfg.role("base")
        if not base.admin_users:
            raise ConfigError(where, f"hosts.{cfg.name}: base__admin_users",
                              "at least one admin user is needed (root login is disabled)")
        for user in base.admin_users:
            if not user.ssh_keys:
                raise ConfigError(where, f"hosts.{cfg.name}: base__admin_users.{user.name}.ssh_keys",
                                  "an admin user needs at least one SSH key")
            for i, key in enumerate(user.ssh_keys):
                if key.startswith("file:") and not Path(key[5:]).is_file():
                    raise ConfigError(where, f"hosts.{cfg.name}: base__admin_users.{user.name}.ssh_keys[{i}]",
                                      f"key file not found on the control machine: {key[5:]}")
        for i, opening in enumerate(base.firewall_openings):
            for group in opening.from_groups:
                if group not in groups:
                    raise ConfigError(where, f"hosts.{cfg.name}: base__firewall_openings[{i}].from_groups",
                                      f"no host has role or group {group!r}")
        for net in base.admin_networks:
            ipaddress.ip_network(net, strict=False)

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

from roles.app.settings import AppSettings
from roles.backup.settings import BackupSettings
from roles.base.settings import BaseSettings
from roles.lb.settings import LbSettings
from roles.postgres.settings import PostgresSettings
from webstack.errors import ConfigError

if TYPE_CHECKING:
    from webstack.inventory import HostConfig


@dataclass(frozen=True)
class Derived:
    """An inbound opening a role needs: port, protocol, source addresses, why."""

    port: int
    proto: str
    sources: tuple[str, ...]
    comment: str


@dataclass(frozen=True)
class Role:
    """One role: its settings class, the roles it must follow, its secrets and openings."""

    name: str
    doc: str
    settings: type
    after: tuple[str, ...] = ()
    secrets: Callable[[HostConfig], list[str]] = lambda cfg: []
    openings: Callable[[HostConfig], list[Derived]] = lambda cfg: []


def _base_secrets(cfg: HostConfig) -> list[str]:
    # A console password per operator: SSH stays key-only, but a broken
    # network or sshd config must not lock the operator out of the console.
    return [f"password_hash_{u.name}" for u in cfg.role("base").admin_users]


def cluster_members(cfg: HostConfig) -> list[str]:
    """Names of the hosts in the same PostgreSQL cluster as ``cfg`` (itself included)."""
    cluster = cfg.role("postgres").cluster
    return [p.name for p in cfg.peers if "postgres" in p.roles and p.role("postgres").cluster == cluster]


def backup_secrets(cluster: str, s3: bool) -> list[str]:
    """Secrets of a cluster's pgBackRest repository: the cipher passphrase and the transport's key."""
    transport = [f"pgbackrest_s3_key_{cluster}", f"pgbackrest_s3_key_secret_{cluster}"] if s3 \
        else [f"pgbackrest_sftp_key_{cluster}"]
    return [f"pgbackrest_cipher_pass_{cluster}", *transport, f"pgbackrest_tls_ca_key_{cluster}"]


def _postgres_secrets(cfg: HostConfig) -> list[str]:
    pg = cfg.role("postgres")
    out = ["postgres_password_replicator", *(f"postgres_password_{u}" for u in pg.users)]
    if pg.backup_host or pg.backup_s3_bucket:
        out += backup_secrets(pg.cluster, bool(pg.backup_s3_bucket))
    return out


def backup_clients(cfg: HostConfig) -> dict[str, list[str]]:
    """On a backup host: cluster -> addresses allowed to use its repository
    (the cluster's members, then the restore-drill hosts)."""
    out: dict[str, list[str]] = {}
    for peer in cfg.peers:
        if "postgres" in peer.roles and peer.role("postgres").backup_host == cfg.name:
            out.setdefault(peer.role("postgres").cluster, []).append(peer.address)
    drills = sorted({p.address for g in cfg.role("backup").restore_groups for p in cfg.members(g)})
    return {c: sorted(a) + [d for d in drills if d not in a] for c, a in sorted(out.items())}


def _backup_secrets(cfg: HostConfig) -> list[str]:
    # Only the SSH keys, from which the control machine derives the public
    # halves; the cipher passphrase never reaches a backup host's context.
    return [f"pgbackrest_sftp_key_{cluster}" for cluster in backup_clients(cfg)]


def _backup_openings(cfg: HostConfig) -> list[Derived]:
    sources = sorted({a for addrs in backup_clients(cfg).values() for a in addrs})
    port = cfg.role("base").ssh_port
    return [Derived(port, "tcp", tuple(sources), "sftp from database hosts (pgBackRest)")] if sources else []


def _postgres_openings(cfg: HostConfig) -> list[Derived]:
    pg = cfg.role("postgres")
    clients = sorted({p.address for group in pg.clients for p in cfg.members(group) if p.name != cfg.name})
    members = cluster_members(cfg)
    peers = sorted(p.address for p in cfg.peers if p.name in members and p.name != cfg.name)
    out = []
    if clients:
        out.append(Derived(5432, "tcp", tuple(clients), "postgres clients"))
    if peers:
        out.append(Derived(5432, "tcp", tuple(peers), "postgres replication and rewind"))
        if pg.backup_host or pg.backup_s3_bucket:
            out.append(Derived(8432, "tcp", tuple(peers), "pgBackRest TLS server (backups from the standby)"))
    return out


def _vip_peers(cfg: HostConfig) -> list[str]:
    vip = cfg.role("lb").vip
    return sorted(p.address for p in cfg.peers if "lb" in p.roles and p.name != cfg.name and p.role("lb").vip == vip)


def _lb_openings(cfg: HostConfig) -> list[Derived]:
    out = [Derived(80, "tcp", ("0.0.0.0/0", "::/0"), "http (redirects to https)"),
           Derived(443, "tcp", ("0.0.0.0/0", "::/0"), "https")]
    if cfg.role("lb").vip and _vip_peers(cfg):
        out.append(Derived(0, "vrrp", tuple(_vip_peers(cfg)), "vrrp from the load-balancer peer"))
    return out


def app_database_owner(cfg: HostConfig) -> str | None:
    """Owner of the database the application uses (None when no postgres host has it)."""
    wanted = cfg.role("app").database
    for peer in cfg.peers:
        if "postgres" in peer.roles:
            for db in peer.role("postgres").databases:
                if db.name == wanted:
                    return db.owner
    return None


def _app_secrets(cfg: HostConfig) -> list[str]:
    owner = app_database_owner(cfg)
    return ["app_secret_key", *([f"postgres_password_{owner}"] if owner else [])]


def _app_openings(cfg: HostConfig) -> list[Derived]:
    lbs = tuple(sorted(p.address for p in cfg.peers if "lb" in p.roles))
    return [Derived(cfg.role("app").port, "tcp", lbs, "application from the load balancers")] if lbs else []


ROLES: dict[str, Role] = {
    "base": Role("base", "every host: users, SSH, firewall, updates, time, journal", BaseSettings, secrets=_base_secrets),
    "backup": Role("backup", "off-site pgBackRest repository host (chrooted SFTP, ciphertext only)", BackupSettings,
                   secrets=_backup_secrets, openings=_backup_openings),
    "postgres": Role("postgres", "PostgreSQL primary or streaming replica", PostgresSettings, after=("backup",),
                     secrets=_postgres_secrets, openings=_postgres_openings),
    "app": Role("app", "WSGI application servers (gunicorn), rolling releases", AppSettings, after=("postgres",),
                secrets=_app_secrets, openings=_app_openings),
    "lb": Role("lb", "nginx TLS terminator, keepalived pair with a floating IP", LbSettings, after=("app",),
               secrets=lambda cfg: ["tls_cert", "tls_key"], openings=_lb_openings),
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
    _check_postgres_clusters(configs, where)
    _check_lb_pairs(configs, where)
    for cfg in configs:
        if "app" in cfg.roles and app_database_owner(cfg) is None:
            raise ConfigError(where, f"hosts.{cfg.name}: app__database",
                              f"no postgres host has database {cfg.role('app').database!r}")


def _check_lb_pairs(configs: Sequence[HostConfig], where: str) -> None:
    """Each VIP: one VRRP id, inside every member's subnet, no host's address; VRRP ids unique per network."""
    pairs: dict[str, list[HostConfig]] = {}
    for cfg in configs:
        if "lb" in cfg.roles and cfg.role("lb").vip:
            pairs.setdefault(cfg.role("lb").vip, []).append(cfg)
    addresses = {cfg.address: cfg.name for cfg in configs}
    ids: dict[int, str] = {}
    for vip, members in pairs.items():
        names = ", ".join(c.name for c in members)
        if vip in addresses:
            raise ConfigError(where, f"lb pair {names}: lb__vip", f"{vip} is the address of host {addresses[vip]}")
        vrrp_ids = {c.role("lb").vrrp_id for c in members}
        if len(vrrp_ids) > 1:
            raise ConfigError(where, f"lb pair {names}: lb__vrrp_id", f"members disagree: {sorted(vrrp_ids)}")
        vrrp_id = vrrp_ids.pop()
        if vrrp_id in ids:
            raise ConfigError(where, f"lb pair {names}: lb__vrrp_id",
                              f"duplicate VRRP id {vrrp_id}: also used by the pair with VIP {ids[vrrp_id]}")
        ids[vrrp_id] = vip
        for cfg in members:
            net = ipaddress.ip_interface(f"{cfg.address}/{cfg.role('lb').vip_prefix}").network
            if ipaddress.ip_address(vip) not in net:
                raise ConfigError(where, f"hosts.{cfg.name}: lb__vip", f"{vip} is outside {cfg.name}'s subnet {net}")


def _check_postgres_clusters(configs: Sequence[HostConfig], where: str) -> None:
    """One primary per cluster, a primary that is a member, one Debian release per cluster."""
    clusters: dict[str, list[HostConfig]] = {}
    for cfg in configs:
        if "postgres" in cfg.roles:
            clusters.setdefault(cfg.role("postgres").cluster, []).append(cfg)
    for name, members in clusters.items():
        primaries: dict[str, list[str]] = {}
        for cfg in members:
            primaries.setdefault(cfg.role("postgres").primary, []).append(cfg.name)
        if len(primaries) > 1:
            detail = "; ".join(f"{', '.join(hosts)} say {p or '(none)'!r}" for p, hosts in primaries.items())
            raise ConfigError(where, f"cluster {name}: postgres__primary", f"two primaries named: {detail}")
        primary = next(iter(primaries))
        names = [cfg.name for cfg in members]
        if not primary:
            raise ConfigError(where, f"cluster {name}: postgres__primary", "no primary named")
        if primary not in names:
            raise ConfigError(where, f"cluster {name}: postgres__primary",
                              f"{primary!r} is not a postgres host of this cluster (members: {', '.join(names)})")
        releases = {cfg.release for cfg in members if cfg.release}
        if len(releases) > 1:
            raise ConfigError(where, f"cluster {name}: release",
                              f"members run different Debian releases ({', '.join(sorted(releases))}): "
                              "streaming replication needs one PostgreSQL major version")
        for key in ("backup_host", "backup_s3_bucket", "backup_retention_full", "backup_retention_diff"):
            values = {str(getattr(cfg.role("postgres"), key)) for cfg in members}
            if len(values) > 1:
                raise ConfigError(where, f"cluster {name}: postgres__{key}", f"members disagree: {sorted(values)}")
        backup_host = members[0].role("postgres").backup_host
        if backup_host:
            target = next((c for c in configs if c.name == backup_host), None)
            if target is None or "backup" not in target.roles:
                raise ConfigError(where, f"cluster {name}: postgres__backup_host",
                                  f"{backup_host!r} is not a host with role backup")
            if backup_host in names:
                raise ConfigError(where, f"cluster {name}: postgres__backup_host",
                                  "the backup host must not be a member of the cluster it backs up (off-site)")
        if members[0].role("postgres").synchronous and len(members) < 2:
            raise ConfigError(where, f"cluster {name}: postgres__synchronous", "needs at least one replica")

"""The roles an inventory may name, the deploys and their options, secrets and cross-host rules.

This module imports only settings and option declarations and the topology
(no pyinfra, no jinja2, no role operations), so the inventory loader, the docs
generator and the unit tests can use it freely. It hands all of it to the
tooling as one :class:`~webstack.catalog.Catalog` (``CATALOG``), registered as
the ``webstack.catalog`` entry point in pyproject.toml.

A new role: its ``settings.py``, an entry in ``ROLES``, a line in deploys/site.py.
A new cross-host rule: a method of ``roles.topology.Topology``, asked from here.
A new deploy option: a field in ``roles/options.py`` (a new deploy: a line in ``DEPLOYS``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from roles.app.settings import AppSettings
from roles.backup.settings import BackupSettings
from roles.base._release import PACKAGES as BASE_PACKAGES
from roles.base.settings import BaseSettings
from roles.lb.settings import LbSettings
from roles.mailprovider.settings import MailproviderSettings
from roles.options import (
    FailoverOptions,
    JobsOptions,
    MaintenanceOptions,
    PatchOptions,
    RejoinOptions,
    RestoreOptions,
    RollbackOptions,
    RolloutOptions,
    SwitchoverOptions,
)
from roles.postgres._release import PGBACKREST_SFTP
from roles.postgres.settings import PostgresSettings
from roles.topology import Topology, topology
from roles.worker.settings import WorkerSettings
from webstack.catalog import Catalog, DeployInfo
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
    """One role: its settings class, its secrets and the openings it needs."""

    name: str
    doc: str
    settings: type
    secrets: Callable[[HostConfig], list[str]] = lambda cfg: []
    openings: Callable[[HostConfig], list[Derived]] = lambda cfg: []
    packages: Callable[[HostConfig], list[str]] = lambda cfg: []


def _base_secrets(cfg: HostConfig) -> list[str]:
    # A console password per operator: SSH stays key-only, but a broken
    # network or sshd config must not lock the operator out of the console.
    base = cfg.settings(BaseSettings)
    out = [f"password_hash_{u.name}" for u in base.admin_users]
    if base.mail_relay and not topology(cfg).relays_locally(cfg.name):
        out.append(f"smtp_password_{base.mail_relay_user}")
    # The CA of every PostgreSQL cluster it connects to (derived from its key on the control machine).
    out += [f"postgres_tls_ca_key_{c}" for c in topology(cfg).ca_clusters(cfg.name)]
    return out


# The Debian packages each role installs. The role's own operation installs them (and stays the
# check that they are there); the base role installs every role's at once, in one apt transaction
# per host, before any role runs: a cold deploy unpacks and configures everything in one dpkg run
# instead of one per role, each host at its own pace (pyinfra waits for every host at each
# operation, so six installs in turn were six waits for the slowest host).
NULL_CLIENT_PACKAGES = ("postfix", "libsasl2-modules", "ca-certificates")
POSTGRES_PACKAGES = ("postgresql", "postgresql-client")
PGBACKREST_PACKAGES = ("pgbackrest",)
BACKUP_PACKAGES = ("rsync",)
MAILPROVIDER_PACKAGES = ("postfix", "postfix-pcre", "dovecot-core", "ca-certificates")


def _base_packages(cfg: HostConfig) -> list[str]:
    base = cfg.settings(BaseSettings)
    out = [*BASE_PACKAGES, *base.extra_packages]
    if base.relay is not None and not topology(cfg).relays_locally(cfg.name):
        out += NULL_CLIENT_PACKAGES
    return out


def _postgres_packages(cfg: HostConfig) -> list[str]:
    """PostgreSQL, and pgBackRest when the cluster has a repository (with sshfs where pgBackRest
    has no SFTP: Debian 12; a host whose release the inventory does not say gets it from the role)."""
    pg = cfg.settings(PostgresSettings)
    if not (pg.backup_host or pg.backup_s3_bucket):
        return list(POSTGRES_PACKAGES)
    sshfs = not pg.backup_s3_bucket and cfg.release is not None and not PGBACKREST_SFTP[cfg.release]
    return [*POSTGRES_PACKAGES, *PGBACKREST_PACKAGES, *(["sshfs"] if sshfs else [])]


def _lb_packages(cfg: HostConfig) -> list[str]:
    return ["nginx", "curl", *(["keepalived"] if cfg.settings(LbSettings).vip else [])]


def _app_packages(cfg: HostConfig) -> list[str]:
    return ["gunicorn", *cfg.settings(AppSettings).packages]


def _worker_packages(cfg: HostConfig) -> list[str]:
    """python3-psycopg2 and the packages of the application it runs (its own app settings, else
    the first application server's)."""
    app = topology(cfg).app_of(cfg.name)
    return sorted({"python3-psycopg2", *(app.settings(AppSettings).packages if app else ())})


def packages(cfg: HostConfig) -> list[str]:
    """Every Debian package the host's roles install, base first, each once."""
    out: list[str] = []
    for role in ("base", *cfg.roles):
        out.extend(p for p in ROLES[role].packages(cfg) if p not in out)
    return out


def _mailprovider_secrets(cfg: HostConfig) -> list[str]:
    # Its logins' passwords (the relays' and the application's share these secrets: one
    # name, one value), and its TLS key + certificate chain in one PEM.
    return [*(f"smtp_password_{a}" for a in topology(cfg).mail_accounts(cfg.name)), f"mailprovider_tls_{cfg.name}"]


def _mailprovider_openings(cfg: HostConfig) -> list[Derived]:
    return [Derived(587, "tcp", tuple(topology(cfg).mail_clients(cfg.name)),
                    "smtp submission (STARTTLS + AUTH) from the hosts' relays and senders")]


def backup_secrets(cluster: str, s3: bool) -> list[str]:
    """Secrets of a cluster's pgBackRest repository: the cipher passphrase and the transport's key."""
    transport = [f"pgbackrest_s3_key_{cluster}", f"pgbackrest_s3_key_secret_{cluster}"] if s3 \
        else [f"pgbackrest_sftp_key_{cluster}"]
    return [f"pgbackrest_cipher_pass_{cluster}", *transport, f"pgbackrest_tls_ca_key_{cluster}"]


def _postgres_secrets(cfg: HostConfig) -> list[str]:
    pg = cfg.settings(PostgresSettings)
    out = ["postgres_password_replicator", *(f"postgres_password_{u}" for u in pg.users),
           f"postgres_tls_ca_key_{pg.cluster}"]
    if pg.backup_host or pg.backup_s3_bucket:
        out += backup_secrets(pg.cluster, bool(pg.backup_s3_bucket))
    return out


def _backup_secrets(cfg: HostConfig) -> list[str]:
    # Only the SSH keys, from which the control machine derives the public
    # halves; the cipher passphrase never reaches a backup host's context.
    return [f"pgbackrest_sftp_key_{cluster}" for cluster in topology(cfg).backup_clients(cfg.name)]


def _backup_openings(cfg: HostConfig) -> list[Derived]:
    top = topology(cfg)
    sources = sorted({a for addrs in top.backup_clients(cfg.name).values() for a in addrs})
    port = top.ssh_port(cfg.name)
    return [Derived(port, "tcp", tuple(sources), "sftp from database hosts (pgBackRest)")] if sources else []


def _postgres_openings(cfg: HostConfig) -> list[Derived]:
    pg = cfg.settings(PostgresSettings)
    top = topology(cfg)
    clients = top.addresses((h for _group, h in top.database_clients(cfg.name)), besides=cfg.name)
    peers = top.addresses(top.cluster_peers(cfg.name))
    out = []
    if clients:
        out.append(Derived(5432, "tcp", tuple(clients), "postgres clients"))
    if peers:
        out.append(Derived(5432, "tcp", tuple(peers), "postgres replication and rewind"))
        if pg.backup_host or pg.backup_s3_bucket:
            out.append(Derived(8432, "tcp", tuple(peers), "pgBackRest TLS server (backups from the standby)"))
    return out


def _lb_openings(cfg: HostConfig) -> list[Derived]:
    out = [Derived(80, "tcp", ("0.0.0.0/0", "::/0"), "http (redirects to https)"),
           Derived(443, "tcp", ("0.0.0.0/0", "::/0"), "https")]
    vrrp = topology(cfg).addresses(topology(cfg).vrrp_peers(cfg.name))
    if cfg.settings(LbSettings).vip and vrrp:
        out.append(Derived(0, "vrrp", tuple(vrrp), "vrrp from the load-balancer peer"))
    return out


def _app_secrets(cfg: HostConfig) -> list[str]:
    db = topology(cfg).app_database(cfg.name)
    return ["app_secret_key", *([f"postgres_password_{db.database.owner}"] if db else [])]


def _app_openings(cfg: HostConfig) -> list[Derived]:
    lbs = tuple(topology(cfg).addresses(topology(cfg).load_balancers()))
    return [Derived(cfg.settings(AppSettings).port, "tcp", lbs, "application from the load balancers")] if lbs else []


def _worker_secrets(cfg: HostConfig) -> list[str]:
    user = cfg.settings(WorkerSettings).smtp_user
    return [*_app_secrets(cfg), *([f"smtp_password_{user}"] if user else [])]


ROLES: dict[str, Role] = {
    "base": Role("base", "every host: users, SSH, firewall, updates, time, journal", BaseSettings, secrets=_base_secrets,
                 packages=_base_packages),
    "backup": Role("backup", "off-site pgBackRest repository host (chrooted SFTP, ciphertext only)", BackupSettings,
                   secrets=_backup_secrets, openings=_backup_openings, packages=lambda cfg: list(BACKUP_PACKAGES)),
    "postgres": Role("postgres", "PostgreSQL primary or streaming replica", PostgresSettings,
                     secrets=_postgres_secrets, openings=_postgres_openings, packages=_postgres_packages),
    "app": Role("app", "WSGI application servers (gunicorn), rolling releases", AppSettings,
                secrets=_app_secrets, openings=_app_openings, packages=_app_packages),
    "worker": Role("worker", "background job workers and scheduled jobs, on the application's release",
                   WorkerSettings, secrets=_worker_secrets, packages=_worker_packages),
    "lb": Role("lb", "nginx TLS terminator, keepalived pair with a floating IP", LbSettings,
               secrets=lambda cfg: ["tls_cert", "tls_key"], openings=_lb_openings, packages=_lb_packages),
    "mailprovider": Role("mailprovider", "lab only: stand-in email provider (Postfix submission, SASL, Maildirs)",
                         MailproviderSettings, secrets=_mailprovider_secrets, openings=_mailprovider_openings,
                         packages=lambda cfg: list(MAILPROVIDER_PACKAGES)),
}

DEPLOYS: dict[str, DeployInfo] = {d.name: d for d in (
    DeployInfo("site", "build or converge every host, then the rolling application step", RolloutOptions),
    DeployInfo("rollout", "the rolling application step alone", RolloutOptions),
    DeployInfo("rollback", "every application server back to its previous release", RollbackOptions),
    DeployInfo("maintenance", "maintenance mode on or off: application paths answer 503 on the load balancers",
               MaintenanceOptions),
    DeployInfo("check", "certificate expiry, backup freshness, job queue depth, age and dead letters"),
    DeployInfo("jobs", "list the job queue's dead letters, re-queue some", JobsOptions),
    DeployInfo("patch", "the monthly patch run: every host upgraded, rebooted if needed, one at a time", PatchOptions),
    DeployInfo("status", "read-only facts for `webstack status` (run with --dry)"),
    DeployInfo("switchover", "planned change of a cluster's primary, no data loss", SwitchoverOptions),
    DeployInfo("failover", "promote a replica when the primary is dead", FailoverOptions),
    DeployInfo("rejoin", "make a former primary a replica of the current one", RejoinOptions),
    DeployInfo("restore", "restore a cluster from its repository (in place, new machines, or a drill host)",
               RestoreOptions),
)}


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
        base = cfg.settings(BaseSettings)
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
    if not configs:
        return
    top = topology(configs[0])
    _check_postgres_clusters(top, where)
    _check_lb_pairs(top, where)
    _check_workers(top, where)
    _check_reboot_times(top, where)
    for cfg in configs:
        target = top.mail_provider(cfg.name)
        if target is not None and "mailprovider" not in target.roles:
            raise ConfigError(where, f"hosts.{cfg.name}: base__mail_relay",
                              f"{cfg.settings(BaseSettings).mail_relay!r} names inventory host {target.name}, "
                              "which has no role mailprovider")
        if "app" in cfg.roles and top.app_database(cfg.name) is None:
            raise ConfigError(where, f"hosts.{cfg.name}: app__database",
                              f"no postgres host has database {cfg.settings(AppSettings).database!r}")


def _check_workers(top: Topology, where: str) -> None:
    """Worker hosts run the application servers' release: there is one, and app servers agree on it."""
    releases = {(h.settings(AppSettings).name, h.settings(AppSettings).source, h.settings(AppSettings).git_ref)
                for h in top.app_servers()}
    if len(releases) > 1:
        raise ConfigError(where, "app__name / app__source / app__git_ref",
                          f"application servers disagree on the application: {sorted(releases)}")
    for h in top.workers():
        if top.app_of(h.name) is None:
            raise ConfigError(where, f"hosts.{h.name}.roles",
                              "a worker runs the application's release: the inventory needs an app server")
        if top.app_database(h.name) is None:
            raise ConfigError(where, f"hosts.{h.name}: app__database", "no postgres host has the application's database")


def _minutes(hhmm: str) -> int:
    hours, _, minutes = hhmm.partition(":")
    return int(hours) * 60 + int(minutes or 0)


def _check_reboot_times(top: Topology, where: str) -> None:
    """Hosts that stand in for each other (a load-balancer pair, a cluster's members, the application
    servers, the worker hosts) never reboot by themselves within 30 minutes of each other."""
    sets = [*top.lb_pairs().values(), *top.clusters().values(), top.app_servers(), top.workers()]
    for members in sets:
        rebooting = [(h.name, h.settings(BaseSettings).unattended_reboot_time) for h in members
                     if h.settings(BaseSettings).unattended_reboot]
        for i, (a, at_a) in enumerate(rebooting):
            for b, at_b in rebooting[i + 1:]:
                gap = abs(_minutes(at_a) - _minutes(at_b))
                if min(gap, 24 * 60 - gap) < 30:
                    raise ConfigError(where, f"hosts.{b}: base__unattended_reboot_time",
                                      f"{at_b}, within 30 minutes of {a}'s {at_a}: hosts that stand in for each "
                                      f"other must not reboot together (stagger them in host_data)")


def _check_lb_pairs(top: Topology, where: str) -> None:
    """Each VIP: one VRRP id, inside every member's subnet, no host's address; VRRP ids unique per network."""
    addresses = {h.address: h.name for h in top.hosts}
    for h in top.load_balancers():
        if not top.upstreams(h.name):
            group = h.settings(LbSettings).upstream_group
            raise ConfigError(where, f"hosts.{h.name}: lb__upstream_group",
                              f"no host is in {group!r}: the load balancer would have no application server "
                              "(the last one cannot be removed while a load balancer remains)")
    ids: dict[int, str] = {}
    for vip, members in top.lb_pairs().items():
        names = ", ".join(h.name for h in members)
        if vip in addresses:
            raise ConfigError(where, f"lb pair {names}: lb__vip", f"{vip} is the address of host {addresses[vip]}")
        vrrp_ids = {h.settings(LbSettings).vrrp_id for h in members}
        if len(vrrp_ids) > 1:
            raise ConfigError(where, f"lb pair {names}: lb__vrrp_id", f"members disagree: {sorted(vrrp_ids)}")
        vrrp_id = vrrp_ids.pop()
        if vrrp_id in ids:
            raise ConfigError(where, f"lb pair {names}: lb__vrrp_id",
                              f"duplicate VRRP id {vrrp_id}: also used by the pair with VIP {ids[vrrp_id]}")
        ids[vrrp_id] = vip
        for h in members:
            net = ipaddress.ip_interface(f"{h.address}/{h.settings(LbSettings).vip_prefix}").network
            if ipaddress.ip_address(vip) not in net:
                raise ConfigError(where, f"hosts.{h.name}: lb__vip", f"{vip} is outside {h.name}'s subnet {net}")


def _check_postgres_clusters(top: Topology, where: str) -> None:
    """One primary per cluster, a primary that is a member, one Debian release per cluster."""
    for name, members in top.clusters().items():
        primaries: dict[str, list[str]] = {}
        for h in members:
            primaries.setdefault(h.settings(PostgresSettings).primary, []).append(h.name)
        if len(primaries) > 1:
            detail = "; ".join(f"{', '.join(hosts)} say {p or '(none)'!r}" for p, hosts in primaries.items())
            raise ConfigError(where, f"cluster {name}: postgres__primary", f"two primaries named: {detail}")
        primary = next(iter(primaries))
        names = [h.name for h in members]
        if not primary:
            raise ConfigError(where, f"cluster {name}: postgres__primary", "no primary named")
        if primary not in names:
            raise ConfigError(where, f"cluster {name}: postgres__primary",
                              f"{primary!r} is not a postgres host of this cluster (members: {', '.join(names)})")
        releases = {h.release for h in members if h.release}
        if len(releases) > 1:
            raise ConfigError(where, f"cluster {name}: release",
                              f"members run different Debian releases ({', '.join(sorted(releases))}): "
                              "streaming replication needs one PostgreSQL major version")
        for key in ("backup_host", "backup_s3_bucket", "backup_retention_full", "backup_retention_diff"):
            values = {str(getattr(h.settings(PostgresSettings), key)) for h in members}
            if len(values) > 1:
                raise ConfigError(where, f"cluster {name}: postgres__{key}", f"members disagree: {sorted(values)}")
        pg = members[0].settings(PostgresSettings)
        if pg.backup_host:
            target = top.get(pg.backup_host)
            if target is None or "backup" not in target.roles:
                raise ConfigError(where, f"cluster {name}: postgres__backup_host",
                                  f"{pg.backup_host!r} is not a host with role backup")
            if pg.backup_host in names:
                raise ConfigError(where, f"cluster {name}: postgres__backup_host",
                                  "the backup host must not be a member of the cluster it backs up (off-site)")
        if pg.synchronous and len(members) < 2:
            raise ConfigError(where, f"cluster {name}: postgres__synchronous", "needs at least one replica")


def app_name(cfg: HostConfig) -> str:
    """The application an app server runs or a worker host works for; "" for other hosts."""
    from roles.worker.deploy import app_settings

    return app_settings(cfg).name if {"app", "worker"} & set(cfg.roles) else ""


CATALOG = Catalog(roles=ROLES, deploys=DEPLOYS, check_fleet=check_fleet, needed_secrets=needed_secrets,
                  ssh_port=lambda cfg: topology(cfg).ssh_port(cfg.name), app_name=app_name)

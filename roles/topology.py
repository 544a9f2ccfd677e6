"""Every question that spans hosts, answered once: who is in my cluster, who may reach this port.

A :class:`Topology` is built from the inventory's hosts (``Topology(cfg.peers)``
or ``topology(cfg)``) and answers from their typed settings only: no pyinfra,
no server, no role operation module. Validation (``roles.registry``), the
templates' context and the firewall derivation all ask it, so what a
configuration file allows and what the firewall opens cannot drift apart.
A new cross-host rule is a method here, with a test in tests/unit/test_topology.py.

Lists of hosts are in inventory order unless said otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from roles.app.settings import AppSettings
from roles.backup.settings import BackupSettings
from roles.base.settings import BaseSettings
from roles.lb.settings import LbSettings
from roles.mailprovider.settings import MailproviderSettings
from roles.postgres.settings import Database, PostgresSettings

if TYPE_CHECKING:
    from webstack.inventory import HostConfig, Peer

# Tiers for rolling work across the fleet, front to back: traffic is drained
# at the edge first, state is touched last. A host takes its first matching
# tier (a role or a group); hosts in none come last.
TIERS = ("lb", "app", "worker", "postgres", "backup")


@dataclass(frozen=True)
class AppDatabase:
    """The database an application server uses: its declaration and the cluster that holds it."""

    database: Database
    cluster: str


class Topology:
    """Cross-host answers for one inventory."""

    def __init__(self, hosts: Sequence[Peer]) -> None:
        self.hosts = tuple(hosts)
        self._by_name = {h.name: h for h in self.hosts}

    def host(self, name: str) -> Peer:
        """The host of that name (KeyError when the inventory has none)."""
        return self._by_name[name]

    def get(self, name: str) -> Peer | None:
        """The host of that name, or None."""
        return self._by_name.get(name)

    def members(self, group_or_role: str) -> list[Peer]:
        """Hosts with this role or in this group."""
        return [h for h in self.hosts if h.is_in(group_or_role)]

    def addresses(self, hosts: Iterable[Peer], besides: str | None = None) -> list[str]:
        """Sorted unique addresses of ``hosts``, leaving out host ``besides``."""
        return sorted({h.address for h in hosts if h.name != besides})

    def ssh_port(self, name: str) -> int:
        """The port the host's sshd listens on, and everything connects to (``base__ssh_port``)."""
        return self.host(name).settings(BaseSettings).ssh_port

    # --- PostgreSQL -------------------------------------------------------------------------------------------

    def clusters(self) -> dict[str, list[Peer]]:
        """Cluster name -> its members (postgres hosts sharing ``postgres__cluster``), clusters by first member."""
        out: dict[str, list[Peer]] = {}
        for h in self.hosts:
            if "postgres" in h.roles:
                out.setdefault(h.settings(PostgresSettings).cluster, []).append(h)
        return out

    def cluster(self, name: str) -> list[Peer]:
        """Members of cluster ``name`` (empty when none)."""
        return self.clusters().get(name, [])

    def cluster_of(self, host: str) -> list[Peer]:
        """Members of the cluster of postgres host ``host``, itself included."""
        return self.cluster(self.host(host).settings(PostgresSettings).cluster)

    def cluster_peers(self, host: str) -> list[Peer]:
        """The other members of ``host``'s cluster (its replicas, or its primary and fellow replicas)."""
        return [h for h in self.cluster_of(host) if h.name != host]

    def primary(self, host: str) -> Peer:
        """The named primary (``postgres__primary``) of ``host``'s cluster."""
        return self.host(self.host(host).settings(PostgresSettings).primary)

    def database_clients(self, host: str) -> list[tuple[str, Peer]]:
        """(group, host) for every client group of postgres host ``host`` and each of its hosts (pg_hba);
        a host in two client groups appears twice."""
        return [(group, h) for group in self.host(host).settings(PostgresSettings).clients for h in self.members(group)]

    def app_database(self, host: str) -> AppDatabase | None:
        """The database application server ``host`` uses (``app__database``): the first postgres host
        declaring it names its owner and cluster. None when no postgres host has it."""
        app = self.app_of(host)
        if app is None:
            return None
        wanted = app.settings(AppSettings).database
        for h in self.hosts:
            if "postgres" in h.roles:
                pg = h.settings(PostgresSettings)
                for db in pg.databases:
                    if db.name == wanted:
                        return AppDatabase(db, pg.cluster)
        return None

    def ca_clusters(self, host: str) -> list[str]:
        """Clusters whose PostgreSQL CA ``host`` needs to verify their servers: its own (a member), those
        whose ``postgres__clients`` groups hold it, and its application's database's (app or worker)."""
        me = self.host(host)
        out = {me.settings(PostgresSettings).cluster} if "postgres" in me.roles else set()
        for name, members in self.clusters().items():
            if any(h.name == host for _group, h in self.database_clients(members[0].name)):
                out.add(name)
        if {"app", "worker"} & set(me.roles) and (found := self.app_database(host)) is not None:
            out.add(found.cluster)
        return sorted(out)

    # --- backups ----------------------------------------------------------------------------------------------

    def backup_host(self, cluster: str) -> Peer | None:
        """The host holding ``cluster``'s repository over SFTP (None: no backups, S3, or not in the inventory)."""
        members = self.cluster(cluster)
        name = members[0].settings(PostgresSettings).backup_host if members else ""
        return self.get(name) if name else None

    def drill_hosts(self, backup_host: str) -> list[Peer]:
        """Restore-drill hosts that may read the repositories on ``backup_host`` (``backup__restore_groups``)."""
        groups = self.host(backup_host).settings(BackupSettings).restore_groups
        return [h for h in self.hosts if any(h.is_in(g) for g in groups)]

    def backup_clients(self, backup_host: str) -> dict[str, list[str]]:
        """On a backup host: cluster -> addresses allowed to use its repository (the cluster's
        members, sorted, then the restore-drill hosts), clusters sorted by name."""
        out: dict[str, list[str]] = {}
        for h in self.hosts:
            if "postgres" in h.roles and h.settings(PostgresSettings).backup_host == backup_host:
                out.setdefault(h.settings(PostgresSettings).cluster, []).append(h.address)
        drills = self.addresses(self.drill_hosts(backup_host))
        return {c: sorted(a) + [d for d in drills if d not in a] for c, a in sorted(out.items())}

    # --- load balancers and application servers ----------------------------------------------------------------

    def load_balancers(self) -> list[Peer]:
        """Every host with role lb."""
        return [h for h in self.hosts if "lb" in h.roles]

    def lb_pairs(self) -> dict[str, list[Peer]]:
        """VIP -> the load balancers sharing it (``lb__vip``), VIPs by first member."""
        out: dict[str, list[Peer]] = {}
        for h in self.load_balancers():
            vip = h.settings(LbSettings).vip
            if vip:
                out.setdefault(vip, []).append(h)
        return out

    def vrrp_peers(self, host: str) -> list[Peer]:
        """The other load balancers sharing ``host``'s VIP (keepalived's unicast peers)."""
        vip = self.host(host).settings(LbSettings).vip
        return [h for h in self.load_balancers() if h.name != host and h.settings(LbSettings).vip == vip]

    def app_servers(self) -> list[Peer]:
        """Every host with role app (the rolling step changes them one at a time)."""
        return [h for h in self.hosts if "app" in h.roles]

    def upstreams(self, host: str) -> list[Peer]:
        """The application servers load balancer ``host`` sends requests to (``lb__upstream_group``)."""
        return self.members(self.host(host).settings(LbSettings).upstream_group)

    # --- mail: every host relays through the provider; the lab's provider is an inventory host ---------------

    def mail_provider(self, host: str) -> Peer | None:
        """The inventory host ``host``'s relay (``base__mail_relay``) names, by name or address; None when
        the relay is unset or outside the inventory (a real provider)."""
        relay = self.host(host).settings(BaseSettings).relay
        if relay is None:
            return None
        return next((h for h in self.hosts if relay[0] in (h.name, h.address)), None)

    def relays_locally(self, host: str) -> bool:
        """True for a mail provider host: its own Postfix delivers its mail, no null client."""
        return "mailprovider" in self.host(host).roles

    def mail_accounts(self, provider: str) -> list[str]:
        """SMTP logins of mail provider ``provider``, sorted: its ``mailprovider__accounts`` and the
        relay login of every other host relaying through it."""
        logins = set(self.host(provider).settings(MailproviderSettings).accounts)
        for h in self.hosts:
            target = self.mail_provider(h.name)
            if h.name != provider and target is not None and target.name == provider:
                logins.add(h.settings(BaseSettings).mail_relay_user)
        return sorted(logins)

    def mail_clients(self, provider: str) -> list[str]:
        """Addresses that may reach ``provider``'s submission port: every other inventory host (relays,
        and senders such as the workers) and ``mailprovider__client_networks``."""
        extra = self.host(provider).settings(MailproviderSettings).client_networks
        return [*self.addresses(self.hosts, besides=provider), *extra]


    # --- the worker tier -----------------------------------------------------------------------------------------

    def workers(self) -> list[Peer]:
        """Every host with role worker. Each has every scheduled job's timer; the database decides
        which one runs a period (webstack_agent/once.py), so any live one takes over."""
        return [h for h in self.hosts if "worker" in h.roles]

    def app_of(self, host: str) -> Peer | None:
        """The host whose app settings (name, source, release, database) ``host`` runs: itself when it
        is an application server, else the first application server (a worker host runs their release).
        None when there is none."""
        me = self.host(host)
        if "app" in me.roles:
            return me
        servers = self.app_servers()
        return servers[0] if servers else None

    def tier(self, host: Peer) -> int:
        """Position of the host's tier in :data:`TIERS` (``len(TIERS)`` for the rest)."""
        return next((i for i, t in enumerate(TIERS) if host.is_in(t)), len(TIERS))

    def in_tier_order(self, hosts: Iterable[Peer] | None = None) -> list[Peer]:
        """``hosts`` (default: all) sorted for rolling work: lb, app, worker, db, backup, the rest;
        inventory order within a tier."""
        return sorted(self.hosts if hosts is None else hosts, key=self.tier)


def topology(cfg: HostConfig) -> Topology:
    """The topology of the inventory ``cfg`` was loaded from."""
    return Topology(cfg.peers)

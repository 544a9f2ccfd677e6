"""The postgres role: Debian's PostgreSQL as a primary or a streaming replica.

The inventory names each cluster's primary (``postgres__primary``); every
other member of the cluster is a hot-standby replica cloned once with
``pg_basebackup`` through its own replication slot. Before changing anything,
every run checks the live cluster against the inventory (``guard``) and stops
if the inventory is stale: a routine run never demotes or clobbers a primary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyinfra import host, inventory, logger, state
from pyinfra.api import FactBase, HiddenValue, OperationError, QuoteString, StringCommand, deploy, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import postgres, server, systemd

from roles._lib import (
    PENDING_DIR,
    barrier,
    config,
    install_packages,
    owed_action,
    render,
    stdin_command,
    template_file,
    unit_file,
    validated_file,
)
from roles.base.deploy import codename
from roles.postgres import backup, certs, scram
from roles.postgres._release import VERSION, paths
from roles.postgres.facts import PgCluster, PgReplicationSlots, PgRoleVerifiers, PgStreamingStandbys, PsqlQuery
from roles.postgres.settings import PostgresSettings
from roles.registry import POSTGRES_PACKAGES
from roles.topology import topology
from webstack.inventory import HostConfig

PGPASS = "/var/lib/postgresql/.pgpass"


# Not facts.hardware.Memory: it rounds MiB where this truncates (running clusters' memory settings would move) and needs vmstat.
class MemTotalMb(FactBase):
    """Total memory of the host in MiB (from /proc/meminfo)."""

    def command(self) -> str:
        return "awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo"

    def process(self, output: Sequence[str]) -> int:
        return int("".join(output).strip())


# Not facts.postgres.PostgresDatabases: it lists no extensions, and database() reads both in this one fact.
class PgDatabases(FactBase):
    """Databases of a running server: name -> (owner, [extensions])."""

    default = dict

    def command(self) -> str:
        return (
            "runuser -u postgres -- psql -XAt -F' ' -c \"select datname, pg_get_userbyid(datdba) from pg_database "
            "where not datistemplate\" 2>/dev/null | while read -r db owner; do "
            "echo \"$db $owner $(runuser -u postgres -- psql -XAt -d \"$db\" "
            "-c 'select string_agg(extname, chr(44)) from pg_extension' 2>/dev/null </dev/null)\"; done"
        )

    def process(self, output: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
        out = {}
        for line in output:
            parts = line.split(" ")
            if len(parts) >= 2:
                exts = parts[2].split(",") if len(parts) > 2 and parts[2] else []
                out[parts[0]] = (parts[1], exts)
        return out


class PgRewindGrants(PsqlQuery):
    """Whether the replicator role may run pg_rewind against this server."""

    sql = ("select has_function_privilege('replicator', "
           "'pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)', 'execute')")

    def process(self, output: Sequence[str]) -> bool:
        return "".join(output).strip() == "t"


def slot_name(host_name: str) -> str:
    """The replication slot a replica streams through."""
    return host_name.replace("-", "_")


def psql(sql: str | StringCommand, database: str = "postgres") -> StringCommand:
    """A psql command run as the postgres OS user that fails on the first error."""
    return StringCommand("runuser", "-u", "postgres", "--", "psql", "-XAtq", "-v", "ON_ERROR_STOP=1",
                         "-d", database, "-c", QuoteString(sql) if isinstance(sql, str) else sql)


UNREACHABLE = "unreachable"
# Stops this server when a peer was promoted over it (templates/postgres/usr/local/lib/webstack/pg-watch.j2).
WATCH = "webstack-pg-watch.service"


def _cluster_state(version: str) -> dict[str, Any]:
    """PgCluster of every member of this host's cluster: None when PostgreSQL is
    not installed yet, UNREACHABLE when the host is not connected in this run."""
    out: dict[str, Any] = {}
    cfg = config()
    for name in (p.name for p in topology(cfg).cluster_of(cfg.name)):
        other = inventory.get_host(name, default=None)
        if other is None or other not in state.active_hosts:
            out[name] = UNREACHABLE
        else:
            out[name] = other.get_fact(PgCluster, version=version)
    return out


def _live(st: Any) -> dict[str, Any] | None:
    return st if isinstance(st, dict) else None


def guard(cfg: HostConfig, version: str) -> dict[str, Any]:
    """Stop the run if the live cluster contradicts the inventory; return the cluster state.

    Rules: the named primary must not be a standby; no other member may be a
    live primary of the same database system (a failover the inventory does not
    know of), unless it is a fresh, empty install waiting to be cloned.
    """
    pg = cfg.settings(PostgresSettings)
    states = _cluster_state(version)
    named = _live(states.get(pg.primary))
    hint = "run deploys/switchover.py, failover.py or rejoin.py, or correct postgres__primary"
    if named and (named["in_recovery"] or (named["standby_signal"] and not named["running"])):
        raise OperationError(
            f"stale inventory: {pg.primary} is named primary of cluster {pg.cluster} but is a standby "
            f"(timeline {named['timeline']}); {hint}"
        )
    for name, raw in states.items():
        st = _live(raw)
        if (name != pg.primary and st and named and st["system_id"] == named["system_id"]
                and not st["standby_signal"] and not st["running"]):
            raise OperationError(
                f"{name} is a former primary of cluster {pg.cluster} (stopped, not a standby); "
                f"make it a replica of {pg.primary} with deploys/rejoin.py"
            )
        if name == pg.primary or not st or not st["running"] or st["in_recovery"] is not False:
            continue
        if st["system_id"] != (named or {}).get("system_id", st["system_id"]) or (named is None and not st["user_databases"]):
            if st["user_databases"]:
                raise OperationError(
                    f"{name} runs a different PostgreSQL cluster holding {st['user_databases']} database(s); "
                    f"refusing to replace it with a copy of {pg.primary}"
                )
            continue  # a fresh install: the replica branch clones it
        newer = named is None or st["timeline"] > named["timeline"]
        raise OperationError(
            f"stale inventory: {name} is a live primary of cluster {pg.cluster} "
            f"(timeline {st['timeline']}) but the inventory names {pg.primary}"
            + (f" (timeline {named['timeline']})" if named else " (unreachable or not installed)")
            + ("; a failover happened: " if newer else "; two primaries: ") + hint
            + (f". {name} recorded its promotion ({st['promoted']}): deploys/rejoin.py --limit {' --limit '.join(states)} "
               "--data write_inventory=yes finishes it" if st.get("promoted") and newer else "")
        )
    return states


def sync_standbys(cfg: HostConfig, states: dict[str, Any], streaming: list[str]) -> list[str]:
    """The standbys a synchronous primary waits for (``postgres__synchronous``): every other member
    that can acknowledge, so a dead one never makes commits hang. Kept: members streaming now
    (``streaming``, the primary's view), standbys of this run (the run starts them) and members not
    installed yet (this run clones them). Left out: a stopped former primary waiting for its
    rejoin, and a member outside this run that does not stream (dead, or fenced after a failover).
    When none is left the primary runs asynchronously (a warning says so) until a site run after
    the rejoin finds a standby again."""
    if not cfg.settings(PostgresSettings).synchronous:
        return []
    out = []
    for peer in topology(cfg).cluster_peers(cfg.name):
        st = states.get(peer.name)
        if peer.name in streaming or st is None or (_live(st) and st["standby_signal"]):
            out.append(peer.name)
    return out


def config_context(cfg: HostConfig, memory_mb: int, standbys: list[str] | None = None) -> dict[str, Any]:
    """Template variables of conf.d/webstack.conf for a cluster member; ``standbys``: the synchronous
    standbys (default: every other member, when ``postgres__synchronous``)."""
    pg = cfg.settings(PostgresSettings)
    top = topology(cfg)
    shared = pg.shared_buffers_mb or min(memory_mb // 4, 8192)
    return {
        "cluster": pg.cluster,
        "address": cfg.address,
        "name": cfg.name,
        "is_primary": pg.primary == cfg.name,
        "primary": pg.primary,
        # pg.primary, not the inventory's: switchover and failover render the configuration to come.
        "primary_address": top.host(pg.primary).address,
        "slot": slot_name(cfg.name),
        "synchronous_standbys": (standbys if standbys is not None else
                                 [p.name for p in top.cluster_peers(cfg.name)] if pg.synchronous else []),
        "max_connections": pg.max_connections,
        "shared_buffers_mb": shared,
        "effective_cache_size_mb": pg.effective_cache_size_mb or memory_mb * 3 // 4,
        "work_mem_mb": pg.work_mem_mb,
        "maintenance_work_mem_mb": max(64, min(shared // 4, 2048)),
        "archive_command": backup.archive_command(pg),
        "archive_timeout": pg.archive_timeout_s,
        "max_slot_wal_keep_mb": pg.max_slot_wal_keep_mb,
        "wal_keep_mb": pg.wal_keep_mb,
        "restore_command": backup.restore_command(pg),
        "ssl_cert_file": certs.SERVER_CERT,
        "ssl_key_file": certs.SERVER_KEY,
        "client_tls": certs.client_options(pg.cluster),
    }


def hba_rules(cfg: HostConfig) -> list[dict[str, str]]:
    """pg_hba.conf lines: clients to their databases, cluster members for replication and rewind."""
    pg = cfg.settings(PostgresSettings)
    top = topology(cfg)
    rules = []
    for group, peer in top.database_clients(cfg.name):
        for db in pg.databases:
            rules.append({"database": db.name, "user": db.owner, "address": f"{peer.address}/32",
                          "why": f"{peer.name} ({group})"})
    for peer in top.cluster_peers(cfg.name):
        for database in ("replication", "postgres"):
            rules.append({"database": database, "user": "replicator", "address": f"{peer.address}/32",
                          "why": f"{peer.name}: {'streaming' if database == 'replication' else 'pg_rewind'}"})
    return rules


# Not postgres.role: it re-sends the password on every run (never a no-op), in clear rather than as a SCRAM verifier.
@operation()
def login_role(role: str, password: HiddenValue, replication: bool = False):
    """Create a login role, or set its password, only when needed.

    + role: role name
    + password: the password (``HiddenValue``); only a SCRAM verifier computed
      on the control machine is sent to the server
    + replication: give the REPLICATION attribute
    """
    current = host.get_fact(PgRoleVerifiers)
    plain = password.unmask()
    if role in current and scram.matches(plain, current[role]):
        host.noop(f"role {role} has the right password")
        return
    verb = "ALTER" if role in current else "CREATE"
    attrs = "LOGIN REPLICATION" if replication else "LOGIN"
    sql = f"{verb} ROLE \"{role}\" {attrs} PASSWORD '{scram.verifier(plain)}'"
    # The statement on psql's stdin: a verifier in its arguments would show in the process list.
    yield stdin_command("runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d postgres", sql + ";\n")


def run_sql(name: str, sql: str) -> OperationMeta:
    """pyinfra's ``postgres.sql`` in the postgres database, as the postgres OS user (peer authentication).

    Callers guard it with a fact (it always runs). One ``psql -c`` string runs as one
    transaction and fails on its first error, as ``ON_ERROR_STOP`` would.
    """
    return postgres.sql(name=name, sql=sql, psql_database="postgres", _sudo=True, _sudo_user="postgres")


# Not postgres.database: it manages no extensions, and a second fact to list them would slow every run.
@operation()
def database(db: str, owner: str, extensions: Sequence[str] = ()):
    """Create a database with its owner and extensions, or fix the owner.

    + db: database name
    + owner: owning role
    + extensions: extensions to create in it
    """
    current = host.get_fact(PgDatabases)
    changed = False
    if db not in current:
        yield psql(f'CREATE DATABASE "{db}" OWNER "{owner}"')
        have: list[str] = []
        changed = True
    else:
        have_owner, have = current[db]
        if have_owner != owner:
            yield psql(f'ALTER DATABASE "{db}" OWNER TO "{owner}"')
            changed = True
    for ext in extensions:
        if ext not in have:
            yield psql(f'CREATE EXTENSION IF NOT EXISTS "{ext}"', database=db)
            changed = True
    if not changed:
        host.noop(f"database {db} is as wanted")


def ensure_slots(cfg: HostConfig, unconditional: bool = False) -> None:
    """On the host being primary: a physical replication slot for every other cluster member.

    ``unconditional``: for the switchover, failover and rejoin deploys, whose earlier steps in
    the same run change the slots (a server restarted as a standby drops its own), so the
    slots seen while the run was prepared may be gone by then: the statement creates what is
    missing when it runs.
    """
    slots: dict[str, str] = {} if unconditional else host.get_fact(PgReplicationSlots)
    members = [p.name for p in topology(cfg).cluster_peers(cfg.name)]
    # A server removed from the cluster (the inventory) leaves its slot, and an unused slot keeps
    # every WAL segment from its position on: the primary's disk fills. A removed server still
    # streaming is cut off first: pg_hba (reloaded above) no longer lets it back in. The
    # termination waits (up to 10 s) for the walsender to exit, so the slot is free to drop.
    for stale in sorted(set(slots) - {slot_name(m) for m in members}):
        run_sql(name=f"Disconnect the replica of slot {stale} (no longer a member of the cluster)",
                sql=f"SELECT pg_terminate_backend(active_pid, 10000) FROM pg_replication_slots "
                    f"WHERE slot_name = '{stale}' AND active_pid IS NOT NULL")
        run_sql(name=f"Drop replication slot {stale} (no longer a member of the cluster)",
                sql=f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    f"WHERE slot_name = '{stale}' AND slot_type = 'physical' AND NOT active")
    for member in members:
        slot = slot_name(member)
        if slots.get(slot) == "lost":
            # Invalidated by max_slot_wal_keep_size: its replica cannot stream through it any more.
            # A new slot reserves WAL from now on; the replica (restore_command) fetches what it
            # missed from the archive, then streams again, without a re-clone.
            run_sql(name=f"Recreate replication slot {slot} (invalidated: {member} fell too far behind)",
                    sql=f"SELECT pg_drop_replication_slot(slot_name), pg_create_physical_replication_slot(slot_name, true) "
                        f"FROM pg_replication_slots WHERE slot_name = '{slot}' AND wal_status = 'lost' AND NOT active")
        elif slot not in slots:
            # Idempotent: a server down while the run was prepared may have the slot after all.
            run_sql(name=f"Replication slot for {member}",
                    sql=f"SELECT pg_create_physical_replication_slot('{slot}') WHERE NOT EXISTS "
                        f"(SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}')")


def reload_command(version: str, defer_restart: bool = False) -> str:
    """Reload; fail on config errors; then restart only if pending_restart says so.

    ``systemctl reload`` returns once SIGHUP is sent, before the server has read
    its files: the new load time (``pg_conf_load_time()`` of a fresh session) is
    awaited before ``pending_restart`` is read, or a busy server's stale answer
    would skip a restart that is owed. The files are validated (pg_file_settings,
    pg_hba_file_rules) before any restart: a bad value never takes a server down.
    ``defer_restart``: leave the owed marker ``restart-postgres`` instead of
    restarting (the primary restarts after its replicas, see ``apply``).
    """
    p = paths(version)
    q = "runuser -u postgres -- psql -XAt -c"
    loaded = f"{q} 'select pg_conf_load_time()'"
    restart = f"touch {PENDING_DIR}/restart-postgres" if defer_restart else f"systemctl restart {p.service}"
    # A setting waiting for the restart shows as "setting could not be applied": no error when that
    # setting is pending_restart (PostgreSQL words a rejected value the same way).
    bad = ("error is not null and not (error = 'setting could not be applied' and lower(name) in "
           "(select name from pg_settings where pending_restart))")
    return (
        f"t=$({loaded}) && systemctl reload {p.service} && n=0 && "
        f"until [ \"$({loaded})\" != \"$t\" ]; do n=$((n+1)); "
        "[ $n -le 300 ] || { echo 'the server did not reload its configuration within 30 s' >&2; exit 1; }; "
        "sleep 0.1; done && "
        f"{{ test \"$({q} \"select count(*) from pg_file_settings where {bad}\")\" = 0 || "
        f"{{ {q} \"select sourcefile, sourceline, name, error from pg_file_settings where {bad}\" >&2; "
        "exit 1; }; } && "
        f"{{ test \"$({q} 'select count(*) from pg_hba_file_rules where error is not null')\" = 0 || "
        f"{{ {q} 'select file_name, line_number, error from pg_hba_file_rules where error is not null' >&2; "
        "exit 1; }; } && "
        f"if [ \"$({q} 'select bool_or(pending_restart) from pg_settings')\" = t ]; then {restart}; fi"
    )


def clone_command(version: str, primary_address: str, slot: str, cluster: str) -> str:
    """Base-backup the primary into a new directory, then swap it in and start it as a standby.

    The fresh cluster it replaces stays intact until the copy is complete, so a
    failed clone (primary down, wrong password) leaves a working server behind.
    """
    p = paths(version)
    d, new, old = p.data, p.data + ".webstack-clone", p.data + ".webstack-old"
    return (
        f"set -e; rm -rf {new} {old}; install -d -o postgres -g postgres -m 700 {new}; "
        f"runuser -u postgres -- env PGPASSFILE={PGPASS} {p.bin}/pg_basebackup -h {primary_address} "
        f"-U replicator -D {new} -X stream -S {slot} -c fast -w -d '{certs.client_options(cluster)}' "
        f"|| {{ rm -rf {new}; exit 1; }}; "
        f"runuser -u postgres -- touch {new}/standby.signal; "
        f"systemctl stop {p.service}; mv {d} {old}; mv {new} {d}; "
        f"timeout 300 systemctl start {p.service}; rm -rf {old}"
    )


@deploy("PostgreSQL")
def apply(restoring: bool = False) -> None:
    """Install, configure and converge this cluster member (primary or replica).

    ``restoring``: deploys/restore.py is about to replace the data directory,
    so the repository is set up but no stanza or first backup is made.
    """
    cfg = config()
    pg = cfg.settings(PostgresSettings)
    release = codename()
    version = VERSION[release]
    p = paths(version)
    states = guard(cfg, version)
    is_primary = pg.primary == cfg.name

    install_packages("Install PostgreSQL", list(POSTGRES_PACKAGES))
    memory = host.get_fact(MemTotalMb)
    streaming = host.get_fact(PgStreamingStandbys) if is_primary else []
    standbys = sync_standbys(cfg, states, streaming) if is_primary else None
    if is_primary and pg.synchronous and not standbys:
        logger.warning(f"webstack: {cfg.name} runs asynchronously: no other member of cluster {pg.cluster} can "
                       "acknowledge a commit now (rejoin the former primary, then run site.py again)")
    conf = template_file(
        "postgres/etc/postgresql/main/conf.d/webstack.conf.j2", f"{p.etc}/conf.d/webstack.conf",
        owes="reload-postgres", user="postgres", group="postgres", **config_context(cfg, memory, standbys=standbys),
    )
    hba = template_file(
        "postgres/etc/postgresql/main/pg_hba.conf.j2", f"{p.etc}/pg_hba.conf",
        owes="reload-postgres", user="postgres", group="postgres", mode="640", rules=hba_rules(cfg),
    )
    # Its certificate (the configuration names it) and the CA the other members verify it with.
    certs.install_ca(cfg, pg.cluster)
    swaps = [conf, hba, *certs.install_server(cfg, pg.cluster, owes="reload-postgres")]
    validated_file(
        name="Replication password for postgres (.pgpass)", dest=PGPASS,
        content=render("postgres/var/lib/postgresql/pgpass.j2",
                       password=cfg.secret("postgres_password_replicator").unmask()),
        user="postgres", group="postgres", mode="600",
    )
    fence = template_file(
        "postgres/usr/local/lib/webstack/pg-fence.j2", "/usr/local/lib/webstack/pg-fence", mode="755",
        validate="sh -n {}", peers=[x.address for x in topology(cfg).cluster_peers(cfg.name)],
        client_tls=certs.client_options(pg.cluster),
        wait=cfg.settings(PostgresSettings).fence_wait_s,
    )
    dropin = template_file(
        "postgres/etc/systemd/system/postgresql@.service.d/webstack-fence.conf.j2",
        "/etc/systemd/system/postgresql@.service.d/webstack-fence.conf", owes="daemon-reload",
    )
    peers = [x.address for x in topology(cfg).cluster_peers(cfg.name)]
    watch = template_file("postgres/usr/local/lib/webstack/pg-watch.j2", "/usr/local/lib/webstack/pg-watch",
                          mode="755", validate="sh -n {}", owes="restart-pg-watch", peers=peers, version=version,
                          interval=2, data=p.data, client_tls=certs.client_options(pg.cluster))
    watch_unit = unit_file(WATCH, render("postgres/etc/systemd/system/webstack-pg-watch.service.j2"),
                           owes="daemon-reload")
    started = template_file("postgres/usr/local/lib/webstack/pg-started.j2", "/usr/local/lib/webstack/pg-started",
                            mode="755", validate="sh -n {}")
    owed_action("daemon-reload", "systemctl daemon-reload", [dropin, fence, watch_unit, started])
    systemd.service(name=f"{p.service} enabled", service=p.service, enabled=True, running=True)
    systemd.service(name=f"{WATCH} enabled", service=WATCH, enabled=True, running=True)
    owed_action("restart-pg-watch", f"systemctl restart {WATCH}", [watch, watch_unit])

    # The primary's work comes first in this file, so on a first run its
    # slots exist and its new configuration is live before a replica clones.
    if is_primary:
        # With replicas streaming, a restart the new settings need waits until they took theirs (below);
        # on a first deploy (none streams yet: they clone from it next) the primary restarts at once.
        reload = owed_action("reload-postgres", reload_command(version, defer_restart=bool(streaming)), swaps)
        login_role(name="Role replicator", role="replicator", replication=True,
                   password=cfg.secret("postgres_password_replicator"))
        if not host.get_fact(PgRewindGrants):
            run_sql(name="Let replicator run pg_rewind", sql=(
                "GRANT EXECUTE ON function pg_catalog.pg_ls_dir(text, boolean, boolean) TO replicator; "
                "GRANT EXECUTE ON function pg_catalog.pg_stat_file(text, boolean) TO replicator; "
                "GRANT EXECUTE ON function pg_catalog.pg_read_binary_file(text) TO replicator; "
                "GRANT EXECUTE ON function pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO replicator"
            ))
        for user in pg.users:
            login_role(name=f"Role {user}", role=user, password=cfg.secret(f"postgres_password_{user}"))
        for db in pg.databases:
            database(name=f"Database {db.name}", db=db.name, owner=db.owner, extensions=db.extensions)
        ensure_slots(cfg)
    # Every member runs this same operation: it orders the replicas' work
    # after all of the primary's (pyinfra orders operations per host).
    barrier(name="Primary ready for replicas", label=f"cluster {pg.cluster}")
    backup.apply(cfg, release, version, is_primary, restoring=restoring)
    if not is_primary:
        _replica(cfg, version, states, swaps)
    # A setting that needs a restart (max_connections...) is taken by the replicas first: a hot
    # standby must not run with less than its primary (for a decrease, restart the primary by hand
    # first). The primary's reload left the restart owed; it restarts once every replica is done.
    barrier(name="Replicas configured", label=f"cluster {pg.cluster}")
    if is_primary:
        owed_action("restart-postgres", f"if [ -e {PENDING_DIR}/restart-postgres ]; then systemctl restart {p.service}; fi",
                    [reload])


def _replica(cfg: HostConfig, version: str, states: dict[str, Any], swaps: list[Any]) -> None:
    """A replica's part of ``apply``: clone it when it holds no copy of the primary, then reload."""
    pg = cfg.settings(PostgresSettings)
    mine = _live(states.get(cfg.name))
    primary_raw = states.get(pg.primary)
    primary_state = _live(primary_raw)
    if primary_raw == UNREACHABLE:
        # Keep whatever streaming configuration exists; never clone blind.
        if not (mine and mine["standby_signal"]):
            raise OperationError(f"{cfg.name}: cannot clone a replica while the primary {pg.primary} is unreachable")
    elif not (mine and primary_state and mine["system_id"] == primary_state["system_id"]):
        if mine and mine["user_databases"]:
            raise OperationError(f"{cfg.name}: holds databases of another cluster; refusing to overwrite it")
        primary_address = topology(cfg).primary(cfg.name).address
        server.shell(name=f"Clone from {pg.primary} (pg_basebackup via slot {slot_name(cfg.name)})",
                     commands=[clone_command(version, primary_address, slot_name(cfg.name), pg.cluster)])
    owed_action("reload-postgres", reload_command(version), swaps)

"""Facts the postgres role reads from servers (all run as root, psql as postgres)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from pyinfra.api import FactBase

from roles.postgres._release import paths

# Written on a server in the same command that promotes it (switchover, failover): the inventory
# change it calls for survives the control machine's process.
PROMOTED = "/var/lib/webstack/pg-promoted"


class PgCluster(FactBase):
    """State of the Debian 'main' cluster of one PostgreSQL version.

    ``None`` when no cluster exists, else a dict: ``running`` (bool),
    ``in_recovery`` (bool, None when stopped), ``standby_signal`` (bool),
    ``system_id`` (str), ``timeline`` (int), ``state`` (pg_controldata's
    "Database cluster state"), ``user_databases`` (int, None when stopped),
    ``promoted`` (the record a switchover or failover left when it promoted this server:
    ``cluster=main from=db1 to=db2 at=... by=switchover``, or None).
    """

    def command(self, version: str) -> str:
        p = paths(version)
        sql = (
            "select pg_is_in_recovery(), "
            "case when pg_is_in_recovery() then (select timeline_id from pg_control_checkpoint()) "
            "else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int end, "
            "(select count(*) from pg_database where datname not in ('postgres', 'template0', 'template1'))"
        )
        return (
            f"D={p.data}; test -f $D/PG_VERSION || exit 0; "
            f"LC_ALL=C {p.bin}/pg_controldata $D | "
            "sed -n 's/^Database system identifier: *\\(.*\\)/system_id=\\1/p; "
            "s/^Database cluster state: *\\(.*\\)/state=\\1/p; "
            "s/^Latest checkpoint.s TimeLineID: *\\(.*\\)/checkpoint_tli=\\1/p'; "
            "test -f $D/standby.signal && echo standby_signal=1; "
            f"test -f {PROMOTED} && sed -n '1s/^/promoted=/p' {PROMOTED}; "
            f"if systemctl is-active -q {p.service}; then echo running=1; "
            f"runuser -u postgres -- psql -XAtF= -c \"{sql}\" 2>/dev/null | sed 's/^/live=/'; fi"
        )

    def process(self, output: Sequence[str]) -> dict[str, Any] | None:
        raw: dict[str, str] = {}
        for line in output:
            key, _, value = line.partition("=")
            raw[key] = value
        if "system_id" not in raw:
            return None
        live = raw.get("live", "").split("=") if raw.get("live") else None
        info: dict[str, Any] = {
            "system_id": raw["system_id"],
            "state": raw.get("state", ""),
            "standby_signal": "standby_signal" in raw,
            "running": "running" in raw,
            "in_recovery": None,
            "timeline": int(raw.get("checkpoint_tli") or 0),
            "user_databases": None,
            "promoted": raw.get("promoted") or None,
        }
        if live and len(live) == 3:
            info["in_recovery"] = live[0] == "t"
            info["timeline"] = max(info["timeline"], int(live[1]))
            info["user_databases"] = int(live[2])
        return info


class PsqlQuery(FactBase):
    """A fact that is one query run by psql as the postgres OS user (nothing when the server is down).

    The prefetch (``webstack.factprefetch``) sends all of a host's questions of these classes
    through one psql session, one ``-c`` each with a tag row before it, instead of one psql (about
    30 ms of a server's CPU) per question; each gets the rows its own command prints."""

    sql = ""
    merge_group = "psql-as-postgres"

    def command(self) -> str:
        return f"runuser -u postgres -- psql -XAt -c \"{self.sql}\" 2>/dev/null || true"

    @staticmethod
    def merged(calls: list[tuple[Any, dict[str, Any]]]) -> tuple[str, Callable[[list[str]], list[list[str]] | None]] | None:
        facts = [fact for fact, _ in calls]
        if not all(isinstance(f, PsqlQuery) and f.sql and '"' not in f.sql for f in facts):
            return None
        tag = f"wsq{uuid.uuid4().hex[:12]}"
        parts = " ".join(f"-c \"select '{tag} {n}'\" -c \"{f.sql}\"" for n, f in enumerate(facts))
        command = f"runuser -u postgres -- psql -XAt {parts} 2>/dev/null || true"

        def split(lines: list[str]) -> list[list[str]] | None:
            out: list[list[str]] = []
            for line in lines:
                if line == f"{tag} {len(out)}":
                    out.append([])
                elif out:
                    out[-1].append(line)
                elif line:
                    return None
            # no tag at all: the server did not answer; each is asked by itself as before
            return out if len(out) == len(facts) else None

        return command, split


class PgRoleVerifiers(PsqlQuery):
    """Login roles and their stored password verifiers (``SCRAM-SHA-256$...``)."""

    default = dict
    sql = "select rolname || ' ' || coalesce(rolpassword, '-') from pg_authid where rolcanlogin"

    def process(self, output: Sequence[str]) -> dict[str, str]:
        out = {}
        for line in output:
            name, _, verifier = line.partition(" ")
            out[name] = verifier
        return out


class PgReplicationSlots(PsqlQuery):
    """The physical replication slots on a running server: name -> wal_status
    (``reserved``, ``extended``, ``unreserved``, or ``lost``: invalidated by
    ``max_slot_wal_keep_size``, its replica can no longer stream through it)."""

    default = dict
    sql = ("select slot_name || ' ' || coalesce(wal_status, 'none') from pg_replication_slots "
           "where slot_type = 'physical'")

    def process(self, output: Sequence[str]) -> dict[str, str]:
        return dict(line.split(None, 1) for line in output if len(line.split()) == 2)


def primary_probe(address: str, client_tls: str) -> str:
    """Shell that prints how the PostgreSQL server at ``address`` answers, asked as the replicator:
    ``f`` = a primary, ``t`` = a standby, nothing = no answer (down, unreachable or not listening).

    A powered-off host sends nothing back, so psql alone would wait out its whole
    connect timeout (libpq's minimum is 2 s). The port is tried first: four TCP
    handshakes of 0.12 s each (a live host on the database network answers in
    milliseconds, even with PostgreSQL overloaded: the kernel answers the SYN).
    Any host that completes one gets the full authenticated question with the
    same 3 s timeout as before, so an answering primary is never missed.
    """
    return (
        "for i in 1 2 3 4; do "
        f"if timeout 0.12 bash -c 'exec 3<>/dev/tcp/{address}/5432' 2>/dev/null; then "
        "runuser -u postgres -- env PGPASSFILE=/var/lib/postgresql/.pgpass PGCONNECT_TIMEOUT=3 "
        f"psql 'host={address} user=replicator dbname=postgres {client_tls}' "
        "-XAtc 'select pg_is_in_recovery()' 2>/dev/null; break; fi; done; true"
    )


class PgStreamingStandbys(PsqlQuery):
    """application_name of every standby streaming from this server now (empty on a standby)."""

    default = list
    sql = "select application_name from pg_stat_replication where state = 'streaming'"

    def process(self, output: Sequence[str]) -> list[str]:
        return [line.strip() for line in output if line.strip()]

"""The whole stack at a glance, read from the live servers (``webstack status``; deploys/status.py).

One read-only fact per host (``HostStatus``: a shell script built from the host's
roles, run once), gathered while pyinfra prepares a ``--dry`` run: nothing on a
server changes. The report (JSON, one object per host) is written when pyinfra
exits to the file named by ``WEBSTACK_STATUS_REPORT``; ``webstack status``
prints it as one table.

Per host: pending upgrades (from the package lists the host already has; the
daily apt timer refreshes them) and how many come from the security archive,
whether a reboot is required (``/run/reboot-required`` or needrestart), the
last patch run (``/var/lib/webstack/last-patch.json``). Per role: the load
balancer holding the VIP; each PostgreSQL member's role, timeline and replay
lag; the newest backup of each kind and the WAL archive lag (on a primary with
backups); the application release; the job queue (first worker host).
"""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import FactBase

from roles._lib import config
from roles.app.settings import AppSettings
from roles.base.deploy import codename
from roles.lb.settings import LbSettings
from roles.postgres import backup
from roles.postgres._release import VERSION, paths
from roles.postgres.settings import PostgresSettings
from roles.topology import topology
from roles.worker import check as worker_check
from webstack.inventory import HostConfig
from webstack.reports import STATUS_ENV

_ROWS: dict[str, dict[str, Any]] = {}
_WRITER: list[str] = []


def status_script(cfg: HostConfig, version: str = "") -> str:
    """The shell script of ``HostStatus``: ``key=value`` lines (values are JSON where they are not words)."""
    lines = [
        # One simulation for both counts (apt loading its cache is most of a status run's cost).
        "inst=$(LC_ALL=C apt-get -s -o Debug::NoLocking=1 dist-upgrade 2>/dev/null | grep '^Inst ')",
        "echo pending=$(printf '%s' \"$inst\" | grep -c '^Inst ')",
        "echo security=$(printf '%s' \"$inst\" | grep -ci security)",
        "r=no; [ -e /run/reboot-required ] && r=yes; "
        "needrestart -b -r l 2>/dev/null | grep -Eq '^NEEDRESTART-KSTA: [23]' && r=yes; echo reboot_required=$r",
        "echo last_patch=$(cat /var/lib/webstack/last-patch.json 2>/dev/null || echo null)",
    ]
    if "lb" in cfg.roles and cfg.settings(LbSettings).vip:
        vip = cfg.settings(LbSettings).vip
        lines.append(f"ip -o addr show to {vip} | grep -q . && echo vip={vip} || echo vip=")
    if "app" in cfg.roles:
        name = cfg.settings(AppSettings).name
        lines.append(f"echo release=$(readlink /srv/{name}/current | xargs -r basename)")
        lines.append(f"echo app_active=$(systemctl is-active {name})")
    if "postgres" in cfg.roles and version:
        q = "runuser -u postgres -- psql -XAtc"
        lines.append(
            f"if {q} 'select 1' >/dev/null 2>&1; then "
            f"echo pg=$({q} \"select case when pg_is_in_recovery() then 'standby' else 'primary' end\"); "
            f"echo timeline=$({q} 'select timeline_id from pg_control_checkpoint()'); "
            # Lag: 0 when everything received is replayed (an idle primary sends nothing), else
            # the age of the last replayed transaction.
            f"echo replay_lag_s=$({q} \"select coalesce(case when pg_is_in_recovery() and "
            "pg_last_wal_receive_lsn() is distinct from pg_last_wal_replay_lsn() then "
            "extract(epoch from now() - pg_last_xact_replay_timestamp()) end, 0)::numeric(10,1)\"); "
            f"echo streaming=$({q} 'select count(*) from pg_stat_replication'); "
            f"echo wal_ready=$(ls {paths(version).data}/pg_wal/archive_status 2>/dev/null "
            "| grep -c '[.]ready$'); "
            f"echo last_archived=$({q} \"select coalesce(to_char(last_archived_time, 'YYYY-MM-DD\\\"T\\\"HH24:MI:SSOF'), '')"
            " from pg_stat_archiver\"); "
            "else echo pg=down; fi")
        pg = cfg.settings(PostgresSettings)
        if backup.enabled(pg):  # printed for the primary (webstack.reports)
            lines.append(
                f"echo backups=$(runuser -u postgres -- pgbackrest --stanza={pg.cluster} info --output=json "
                "2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin)[0].get(\"backup\", []); "
                "print(json.dumps({t: max((b[\"timestamp\"][\"stop\"] for b in d if b[\"type\"] == t), default=None) "
                "for t in (\"full\", \"diff\", \"incr\")}))' 2>/dev/null || echo null)")
    if "worker" in cfg.roles and worker_check._first_worker_in_run(cfg):
        lines.append(f"echo queue=$({worker_check._jobs(cfg, 'stats')} 2>/dev/null | tr -d '\\n' || echo null)")
    return "\n".join(lines)


class HostStatus(FactBase):
    """The host's status lines (``status_script``), parsed."""

    def command(self, script: str) -> str:
        return script

    def process(self, output: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for line in output:
            key, sep, value = line.partition("=")
            if not sep:
                continue
            value = value.strip()
            try:
                out[key] = json.loads(value) if value[:1] in "[{" or value == "null" else value
            except json.JSONDecodeError:
                out[key] = value
        return out


def collect() -> None:
    """deploys/status.py: this host's row of the report (a fact; no operation)."""
    cfg = config()
    version = VERSION[codename()] if "postgres" in cfg.roles else ""
    row = host.get_fact(HostStatus, script=status_script(cfg, version))
    row["roles"] = list(cfg.roles)
    if "postgres" in cfg.roles:
        pg = cfg.settings(PostgresSettings)
        row["cluster"], row["inventory_primary"] = pg.cluster, pg.primary
    _ROWS[cfg.name] = row
    host.noop("status collected")
    if not _WRITER and os.environ.get(STATUS_ENV):
        _WRITER.append(os.environ[STATUS_ENV])
        names = [p.name for p in topology(cfg).hosts]
        atexit.register(_write, os.environ[STATUS_ENV], names)


def _write(path: str, names: list[str]) -> None:
    Path(path).write_text(json.dumps({n: _ROWS.get(n, {"error": "not connected"}) for n in names}, indent=2) + "\n")

"""Restores from a cluster's pgBackRest repository (deploys/restore.py).

Two kinds of target, both PostgreSQL hosts of the inventory:

- **the cluster's own named primary** (``--data from`` omitted or equal to its
  cluster): a disaster restore onto a new machine, or in place. The restored
  server keeps archiving into the same stanza on a new timeline; the other
  members are then re-cloned by site.py (new machines) or rejoin.py.
- **a drill host**, the primary of a standalone cluster without backups of its
  own (``--data from=main``): a rehearsal, or a copy to fetch a dropped table
  from. The copy never archives (``--archive-mode=off``).

A target that already holds a data directory is only overwritten with
``--data confirm=<target>``; the check is made before anything is changed.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import HiddenValue, OperationError, StringCommand
from pyinfra.facts.files import File
from pyinfra.operations import python, server

from roles._lib import config, root_shell
from roles.base.deploy import codename
from roles.options import RestoreOptions
from roles.postgres import backup
from roles.postgres._release import VERSION, Paths, paths
from roles.postgres.settings import PostgresSettings
from roles.registry import backup_secrets
from roles.topology import topology
from webstack.inventory import HostConfig


class _SourceSecrets:
    """The source cluster's secrets for a drill host (read from the inventory's secrets.age)."""

    def __init__(self, inv_dir: str, cluster: str, s3: bool) -> None:
        from webstack.secrets import decrypt

        everything = decrypt(Path(inv_dir))
        wanted = backup_secrets(cluster, s3)
        missing = [k for k in wanted if k not in everything]
        if missing:
            raise OperationError(f"secret {missing[0]} is missing from {inv_dir}/secrets.age")
        self._values = {k: HiddenValue(everything[k]) for k in wanted}

    def secret(self, key: str) -> Any:
        return self._values[key]


@dataclass(frozen=True)
class RestorePlan:
    """A checked restore request: what is restored, from where, onto which layout."""

    cfg: HostConfig
    source: PostgresSettings
    source_cluster: str
    drill: bool
    release: str
    version: str
    paths: Paths
    time: str
    check_sql: str
    check_db: str


def plan(request: RestoreOptions) -> RestorePlan:
    """Check the request against the inventory and the target; raise before anything changes."""
    cfg = config()
    own = cfg.settings(PostgresSettings)
    top = topology(cfg)
    source_cluster = request.source or own.cluster
    members = top.cluster(source_cluster)
    if not members:
        raise OperationError(f"no postgres host of the inventory is in cluster {source_cluster!r}")
    source = members[0].settings(PostgresSettings)
    if not backup.enabled(source):
        raise OperationError(f"cluster {source_cluster} has no backups configured (postgres__backup_host)")
    drill = source_cluster != own.cluster
    if own.primary != cfg.name:
        raise OperationError(f"{cfg.name} is a replica of {own.primary}: restore onto the primary "
                             "(replicas are cloned from it afterwards)")
    if drill and backup.enabled(own):
        raise OperationError(f"{cfg.name} backs up cluster {own.cluster} itself: a drill target must be a "
                             "standalone server without backups of its own")
    if drill and top.cluster_peers(cfg.name):
        raise OperationError(f"cluster {own.cluster} has replicas: a drill target must be standalone")
    release = codename()
    if release != (members[0].release or release):
        raise OperationError(f"cluster {source_cluster} runs on {members[0].release}, {cfg.name} on {release}: "
                             "a restore needs the same PostgreSQL major version")
    if drill and not backup.PGBACKREST_SFTP[release] and not source.backup_s3_bucket:
        raise OperationError(f"{cfg.name} runs Debian 12 (pgBackRest 2.45, no SFTP): a drill of an SFTP repository "
                             "needs a Debian 13 drill host")
    version = VERSION[release]
    p = paths(version)
    holds_data = bool(host.get_fact(File, path=f"{p.data}/PG_VERSION"))
    if holds_data and request.confirm != cfg.name:
        raise OperationError(f"{cfg.name} already holds a PostgreSQL data directory ({p.data}); restoring "
                             f"replaces it: repeat with --data confirm={cfg.name}")
    return RestorePlan(cfg=cfg, source=source, source_cluster=source_cluster, drill=drill, release=release,
                       version=version, paths=p, time=request.time, check_sql=request.check_sql,
                       check_db=request.check_db)


def restore_unit_command(p: RestorePlan, argv: list[str]) -> str:
    """Shell that runs the restore as the transient unit ``webstack-restore-<cluster>`` and waits for it.

    A dropped SSH connection (or a dead control machine) no longer stops a long restore halfway:
    the unit goes on, and the next run of the deploy finds it running and waits for it. Whatever
    the outcome, the unit's ExecStopPost removes a drill host's repository key and passphrase and
    records the result, which the command returns (with the unit's last lines on a failure).
    """
    unit = f"webstack-restore-{p.source_cluster}"
    result = f"/run/{unit}.result"
    stop_post = [f"/bin/sh -c 'echo $$SERVICE_RESULT > {result}'"]
    if p.drill:
        stop_post.insert(0, f"/bin/rm -f {backup.KEY_FILE} {backup.CONF_DIR}/conf.d/secrets.conf")
    props = " ".join(shlex.quote(f"--property=ExecStopPost={c}") for c in stop_post)
    start = (f"rm -f {result}; systemctl reset-failed {unit} 2>/dev/null; "
             f"systemd-run --quiet --unit={unit} --wait --collect --property=Type=exec {props} {shlex.join(argv)}")
    attach = (f"echo 'a restore started earlier still runs ({unit}): waiting for it'; "
              f"while systemctl is-active -q {unit}; do sleep 2; done")
    # ExecStopPost writes the result while the unit is already "deactivating": wait for the file.
    settle = f"for i in $(seq 60); do [ -s {result} ] && break; sleep 0.5; done"
    return (f"if systemctl is-active -q {unit}; then {attach}; else {start}; fi; {settle}; "
            f"if [ \"$(cat {result} 2>/dev/null)\" = success ]; then journalctl -u {unit} --no-pager -o cat -n 1; exit 0; fi; "
            f"journalctl -u {unit} --no-pager -o cat -n 30 >&2; echo \"{unit}: $(cat {result} 2>/dev/null || "
            "echo no result)\" >&2; exit 1")


def restore(p: RestorePlan) -> None:
    """Set up access to the source repository, restore, wait for promotion, then run the check query."""
    cfg = p.cfg
    if p.drill:
        secrets = _SourceSecrets(cfg.inventory_dir, p.source_cluster, bool(p.source.backup_s3_bucket))
        backup.install_client(cfg, p.release, p.version, p.source, secrets_cfg=secrets)
    argv = [backup.SCRIPT, "restore", "--stanza", p.source_cluster, "--data", p.paths.data,
            "--service", p.paths.service]
    if p.time:
        argv += ["--time", p.time]
    if p.drill:
        argv += ["--archive-off"]
    what = f"{p.source_cluster} at {p.time or 'the latest archived WAL'}"
    server.shell(name=f"Restore {what} into {p.paths.data}", commands=[restore_unit_command(p, argv)])
    sql = p.check_sql or (
        "select 'restored: ' || now() || ', databases: ' || string_agg(datname, ',') "
        "from pg_database where not datistemplate"
    )

    def verify() -> None:
        ok, out = root_shell(host, StringCommand("runuser", "-u", "postgres", "--", "psql", "-XAt", "-d",
                                                 p.check_db, "-c", shlex.quote(sql)))
        if not ok:
            raise OperationError(f"check query failed: {out.stderr}")
        print(f"[{cfg.name}] check: {out.stdout}")

    python.call(name="Check query on the restored server", function=verify)
    if p.drill:
        # The drill host keeps no way into the source's repository between drills.
        server.shell(name=f"Remove {p.source_cluster}'s repository key and passphrase from the drill host",
                     commands=[f"rm -f {backup.KEY_FILE} {backup.CONF_DIR}/conf.d/secrets.conf"])

"""Switchover, failover and rejoin of a PostgreSQL cluster, as pyinfra deploys.

Each is run against the cluster's hosts (``--limit``) and ends by naming the
inventory change to commit (``postgres__primary``); ``--data write_inventory=yes``
writes it. Steps that must happen on one host before another are separated
by ``barrier`` operations that every member runs; steps that need values only
known while running (the old primary's last WAL position) are ``python.call``
callbacks on the control machine.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import gevent
from pyinfra import host, inventory, logger
from pyinfra.api import OperationError
from pyinfra.operations import python, server

from roles import audit
from roles._lib import barrier, config, dry_run, fault_point, options, owed_action, root_shell, template_file
from roles.base.deploy import codename
from roles.options import FailoverOptions, RejoinOptions, SwitchoverOptions
from roles.postgres import backup, certs
from roles.postgres._release import VERSION, paths
from roles.postgres.deploy import (
    PGPASS,
    UNREACHABLE,
    MemTotalMb,
    _cluster_state,
    _live,
    clone_command,
    config_context,
    ensure_slots,
    reload_command,
    slot_name,
    sync_standbys,
)
from roles.postgres.facts import PROMOTED, PgStreamingStandbys, primary_probe
from roles.postgres.settings import PostgresSettings
from roles.topology import topology
from webstack.inventory import HostConfig

# Values handed from one host's callback to another's (control machine memory), per switchover.
_SHARED: dict[str, dict[str, Any]] = {}


def _sh(target: Any, command: str, timeout: int = 120) -> str:
    """Run a command as root on ``target`` (a pyinfra Host) from a callback; return stdout."""
    ok, out = root_shell(target, command, timeout)
    if not ok:
        raise OperationError(f"{target.name}: `{command}` failed: {out.stderr.strip()}")
    return out.stdout.strip()


def _psql(target: Any, sql: str) -> str:
    return _sh(target, f"runuser -u postgres -- psql -XAt -c \"{sql}\"")


def _lsn(value: str) -> int:
    hi, lo = value.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def with_primary(cfg: HostConfig, primary: str, synchronous: bool | None = None) -> HostConfig:
    """The host's configuration as it will be once ``primary`` is the cluster's primary."""
    pg = dataclasses.replace(cfg.settings(PostgresSettings), primary=primary)
    if synchronous is not None:
        pg = dataclasses.replace(pg, synchronous=synchronous)
    return cfg.with_settings(pg)


def _configure(cfg: HostConfig, version: str, force: bool = False, standbys: list[str] | None = None):
    """Render conf.d/webstack.conf for ``cfg`` (which may name a new primary); ``standbys``: its
    synchronous standbys (default: every other member, when ``postgres__synchronous``)."""
    p = paths(version)
    return template_file(
        "postgres/etc/postgresql/main/conf.d/webstack.conf.j2", f"{p.etc}/conf.d/webstack.conf",
        owes="reload-postgres", user="postgres", group="postgres", force=force,
        **config_context(cfg, host.get_fact(MemTotalMb), standbys=standbys),
    )


def _inventory_change(cfg: HostConfig, old: str, new: str, write: bool) -> None:
    """Tell the operator the inventory line to change; write it with --data write_inventory=yes."""
    inv = Path(cfg.inventory_dir)
    candidates = [inv / "group_data" / "all.yml"]
    candidates += [inv / "group_data" / f"{g}.yml" for g in (*cfg.roles, *cfg.groups)]
    # The line may sit in any member's host file (usually the old primary's, not the caller's).
    candidates += [inv / "host_data" / f"{m.name}.yml" for m in topology(cfg).cluster_of(cfg.name)]
    pattern = re.compile(rf"^(postgres__primary:\s*)['\"]?{re.escape(old)}['\"]?(\s*(#.*)?)$", re.M)
    files = [f for f in candidates if f.exists() and pattern.search(f.read_text())]
    where = ", ".join(str(f) for f in files) or f"{inv}/group_data (postgres__primary)"
    if write:
        for f in files:
            f.write_text(pattern.sub(rf"\g<1>{new}\g<2>", f.read_text()))
        logger.warning(f"webstack: inventory updated: {where}: postgres__primary: {old} -> {new}; commit it")
    else:
        logger.warning(
            f"webstack: commit this inventory change: {where}: postgres__primary: {old} -> {new} "
            "(or rerun with --data write_inventory=yes)"
        )


def _setup() -> tuple[HostConfig, str, dict[str, Any]] | None:
    cfg = config()
    if "postgres" not in cfg.roles:
        host.noop("not a PostgreSQL host")
        return None
    version = VERSION[codename()]
    return cfg, version, _cluster_state(version)


def switchover() -> None:
    """Planned switchover with no data loss: both servers alive (deploys/switchover.py).

    The old primary is shut down cleanly (its walsender ships every committed
    transaction and waits for the standby's flush before exiting); the target
    replays up to the old primary's shutdown checkpoint, is promoted, and the
    old primary restarts as its standby on the new timeline.
    """
    setup = _setup()
    if setup is None:
        return
    cfg, version, states = setup
    request = options(SwitchoverOptions)
    old = cfg.settings(PostgresSettings).primary
    target = switchover_target(cfg, states, request.to)
    audit.note("primary", {"cluster": cfg.settings(PostgresSettings).cluster, "from": old, "to": target})
    switch(cfg, version, old, target, write_inventory=request.write_inventory, force=request.force)


def switchover_target(cfg: HostConfig, states: dict[str, Any], to: str = "") -> str:
    """The replica a switchover promotes (``to``, or the only other member), checked against the live
    cluster: the inventory's primary must be a running primary and the target its running standby."""
    old = cfg.settings(PostgresSettings).primary
    others = [p.name for p in topology(cfg).cluster_of(cfg.name) if p.name != old]
    target = to or (others[0] if len(others) == 1 else None)
    if target not in others:
        raise OperationError(f"switchover: name the new primary with --data to=HOST (one of {', '.join(others)})")
    old_st, new_st = _live(states.get(old)), _live(states.get(target))
    if not (old_st and old_st["running"] and old_st["in_recovery"] is False):
        raise OperationError(f"switchover: {old} is not a running primary (use failover.py if it is dead)")
    if not (new_st and new_st["running"] and new_st["in_recovery"] and new_st["system_id"] == old_st["system_id"]):
        raise OperationError(f"switchover: {target} is not a running standby of {old}")
    return target


def switch(cfg: HostConfig, version: str, old: str, target: str, write_inventory: bool = False,
           force: bool = False, again: bool = False, announce: bool = True) -> None:
    """The switchover's operations on every member (a no-op on the others), ``old`` -> ``target``.

    ``cfg``: this host's configuration while ``old`` is the primary. ``again``: a later
    switchover of the same run (the patch run's switch back): files are written whatever
    the facts read before the run say, since the first switchover changed them. ``announce``:
    name the inventory change to commit (the patch run switching back has none).
    """
    if host.name not in (old, target):
        host.noop("switchover does not concern this host")
        return
    cfg = with_primary(cfg, old)
    pg = cfg.settings(PostgresSettings)
    if host.name == target and announce:  # printed while preparing, so --dry shows the plan too
        logger.warning(f"webstack: plan: switchover {old} -> {target}; then postgres__primary: {old} -> {target}")
    p = paths(version)
    old_host, new_host = inventory.get_host(old), inventory.get_host(target)
    # One dict for the old primary's callback and the target's (each host prepares its own closures).
    shared = _SHARED.setdefault(f"{old} -> {target}", {})

    def stop_old_primary() -> None:
        if backup.enabled(pg) and not force:
            # A promoted standby never archives WAL it did not generate: whatever waits here
            # now would be a gap in the archive. Give asynchronous archiving 30 s to drain.
            waiting = f"ls {p.data}/pg_wal/archive_status | grep -c '[.]ready$' || true"
            deadline = time.monotonic() + 30
            while (count := int(_sh(old_host, waiting) or 0)) and time.monotonic() < deadline:
                time.sleep(1)
            if count:
                raise OperationError(f"switchover: {count} WAL segment(s) on {old} wait for the backup repository; "
                                     "promoting now would leave a gap in the archive. Fix archiving (deploys/check.py) "
                                     "or repeat with --data force=yes")
        _sh(old_host, f"systemctl stop {p.service}", timeout=600)
        control = _sh(old_host, f"LC_ALL=C {p.bin}/pg_controldata {p.data}")
        found = re.search(r"Latest checkpoint location:\s+(\S+)", control)
        if not found:
            raise OperationError(f"{old}: no checkpoint location in pg_controldata output")
        shared["checkpoint"] = found.group(1)
        logger.info(f"    [{old}] stopped cleanly at {shared['checkpoint']}")
        fault_point("switchover:old-stopped")

    def promote_target() -> None:
        if "checkpoint" not in shared:
            raise OperationError(f"{old} was not stopped: nothing to promote")
        want = _lsn(shared["checkpoint"])
        deadline = time.monotonic() + 120
        while _lsn(_psql(new_host, "select pg_last_wal_replay_lsn()")) < want:
            if time.monotonic() > deadline:
                # Nothing was promoted: the old primary is still the only one, so it takes writes again.
                _sh(old_host, f"systemctl start {p.service}", timeout=600)
                raise OperationError(f"{target} did not replay up to {shared['checkpoint']} in 120 s; "
                                     f"switchover abandoned, {old} restarted as the primary")
            time.sleep(0.2)
        _sh(new_host, promote_command(pg.cluster, old, target, "switchover"))
        if _psql(new_host, "select pg_is_in_recovery()") != "f":
            raise OperationError(f"{target} did not leave recovery")
        logger.info(f"    [{target}] promoted after replaying {shared['checkpoint']}")
        fault_point("switchover:promoted")
        # From here on the inventory must name the new primary, whatever happens next:
        # the steps below are finished by deploys/rejoin.py (or site.py) run with it.
        if announce:
            _inventory_change(cfg, old, target, write_inventory)

    if host.name == old:
        python.call(name=f"Stop writes: clean shutdown of {old}", function=stop_old_primary)
    barrier(name="Old primary stopped", label=f"switchover {old} -> {target}")
    if host.name == target:
        python.call(name=f"Promote {target} once it has replayed everything", function=promote_target)
    barrier(name="New primary promoted", label=f"switchover {old} -> {target}")

    # Only reloadable settings differ between the two roles (see webstack.conf.j2): no restart.
    # Synchronous: the new primary does not wait for the old one until it streams again (its
    # commits would hang meanwhile, for ever if the control machine died in between).
    future = with_primary(cfg, target)
    # (Other standbys still follow the old primary until repointed: none is waited for meanwhile.)
    others: list[str] | None = [] if pg.synchronous and host.name == target else None
    conf = _configure(future, version, force=again, standbys=others)
    if host.name == target:
        owed_action("reload-postgres", reload_command(version), [conf],
                    hint=f"{target} is the primary; finish with deploys/rejoin.py --limit {old} --limit {target}")
        ensure_slots(cfg, unconditional=True)
    barrier(name="New primary ready", label=f"switchover {old} -> {target}")
    if host.name == old:
        _start_as_standby(version, conf, hint=f"{target} is the primary; finish with deploys/rejoin.py "
                                              f"--limit {old} --limit {target}")
    if pg.synchronous:
        barrier(name="Old primary streams", label=f"switchover {old} -> {target}")
        if host.name == target:
            owed_action("reload-postgres", reload_command(version), [_configure(future, version, force=True)])


def _start_as_standby(version: str, conf: Any, hint: str = "") -> None:
    """Start this (stopped) server as a standby, wait until it streams, then drop the replication
    slots it kept from its time as the primary: nothing streams from a standby (no cascading), and
    an unused slot holds back WAL removal on it for ever."""
    p = paths(version)
    fail = f"echo 'not streaming after 60 s{'; ' + hint if hint else ''}' >&2; exit 1"
    drop = ("runuser -u postgres -- psql -XAtq -c \"select pg_drop_replication_slot(slot_name) "
            "from pg_replication_slots where slot_type = 'physical' and not active\" >/dev/null")
    server.shell(
        name="Start as a standby, wait for streaming, drop the slots kept from its time as primary",
        commands=[
            f"runuser -u postgres -- touch {p.data}/standby.signal && timeout 300 systemctl start {p.service} && "
            "for i in $(seq 120); do s=$(runuser -u postgres -- psql -XAtc "
            f"'select status from pg_stat_wal_receiver'); [ \"$s\" = streaming ] && {{ {drop}; exit $?; }}; "
            "sleep 0.5; done; " + fail
        ],
    )
    owed_action("reload-postgres", reload_command(version), [conf])


def promote_command(cluster: str, old: str, new: str, by: str, extra: str = "") -> str:
    """Shell run on ``new``: promote it (``pg_promote`` waits until it left recovery) and, in the
    same command, record the promotion on it (``PROMOTED``), so the inventory change it calls
    for is known even if the control machine dies right after. Prints pg_promote's answer
    (``t``) first. ``extra``: more ``-c`` statements for the same psql."""
    record = (f"install -d -m 0755 /var/lib/webstack && printf '%s\\n' \"cluster={cluster} from={old} to={new} "
              f"at=$(date -u +%Y-%m-%dT%H:%M:%SZ) by={by}\" > {PROMOTED}.new && mv {PROMOTED}.new {PROMOTED}")
    return (f"out=$(runuser -u postgres -- psql -XAt -c 'select pg_promote(true, 60)'{extra}); s=$?; "
            f"if [ $s = 0 ] && [ \"${{out%%[!tf]*}}\" = t ]; then {record}; fi; printf '%s\\n' \"$out\"; (exit $s)")


class _Probe:
    """How the old primary answers (``primary_probe``), asked from ``target`` in a greenlet."""

    FRESH_S = 2.0

    def __init__(self, target: Any, address: str, cluster: str) -> None:
        self.target, self.command = target, primary_probe(address, certs.client_options(cluster))
        self.greenlet = gevent.spawn(self._ask)

    def _ask(self) -> tuple[float, str]:
        return time.monotonic(), _sh(self.target, self.command, timeout=30)

    def answer(self) -> str:
        """The answer, asked again if the background one is stale."""
        asked_at, answer = self.greenlet.get()
        if time.monotonic() - asked_at > self.FRESH_S:
            asked_at, answer = self._ask()
        return answer


class ArchiveCheck:
    """Whether the backup archive holds anything a promoting standby lacks, asked in a greenlet
    (overlapping the failover's preparation and its question to the old primary).

    The archive's newest segment and its timeline history files come from the repository;
    at promotion time they are compared with what the standby received. A standby that
    streamed up to the old primary's death is never behind the archive (a segment is
    archived only once complete); one that had fallen behind is, and then the promotion
    asks the archive as always. Any doubt (no answer, an error) means: ask the archive.
    """

    def __init__(self, target: Any, pg: PostgresSettings) -> None:
        self.target, self.pg = target, pg
        self.greenlet = gevent.spawn(self._ask) if backup.enabled(pg) else None

    def _ask(self) -> tuple[str, list[int]] | None:
        q = f"runuser -u postgres -- pgbackrest --stanza={self.pg.cluster} --output=json"
        ok, out = root_shell(self.target, f"{q} info", 30)
        if not ok:
            return None
        archives = [a for st in json.loads(out.stdout) for a in st.get("archive", [])]
        if not archives:
            return None
        newest = max(archives, key=lambda a: a.get("max") or "")
        ok, out = root_shell(self.target, f"{q} repo-ls --filter='[.]history$' archive/{self.pg.cluster}/{newest['id']}", 30)
        if not ok:
            return None
        timelines = [int(name.split(".")[0], 16) for name in json.loads(out.stdout) if name.endswith(".history")]
        return str(newest.get("max") or ""), timelines

    def nothing_newer(self, version: str) -> bool:
        """True when the archive holds no segment past what the standby received and no timeline past
        its own (then the promotion need not ask the archive)."""
        if self.greenlet is None:
            return False
        try:
            answer = self.greenlet.get(timeout=5)
        except Exception:
            return False
        if not answer:
            return False
        newest, timelines = answer
        p = paths(version)
        ok, out = root_shell(self.target, (
            "runuser -u postgres -- psql -XAt -c \"select pg_last_wal_receive_lsn(), "
            "(select setting from pg_settings where name = 'wal_segment_size')\"; "
            f"ls {p.data}/pg_wal | sed -n 's/^\\([0-9A-F]\\{{8\\}}\\)[.]history$/\\1/p' | tail -n 1"), 30)
        if not ok or "|" not in out.stdout:
            return False
        first, *rest = out.stdout.split("\n")
        received, segment_size = first.split("|")
        if not received:
            return False
        own_timeline = int(rest[0], 16) if rest and rest[0].strip() else 1
        return archive_not_ahead(newest, timelines, received, int(segment_size), own_timeline)


def archive_not_ahead(newest: str, timelines: list[int], received: str, segment_size: int, own_timeline: int) -> bool:
    """True when the archive's newest segment (``newest``, a WAL file name, '' for none) ends before
    the segment holding LSN ``received``, and no archived timeline history is newer than the
    standby's own timeline."""
    received_segment = _lsn(received) // segment_size
    archived_segment = (int(newest[8:16], 16) * (0x100000000 // segment_size) + int(newest[16:24], 16)
                        if newest else -1)
    return archived_segment < received_segment and all(t <= own_timeline for t in timelines)


def failover() -> None:
    """Emergency failover: the primary is dead; promote this replica.

    Run with ``--limit NEW_PRIMARY`` (plus any other live replica, to repoint
    it). Refuses if the old primary answers as a running primary. The old
    primary is fenced: every member's postgresql unit runs pg-fence before
    starting, which refuses to start a primary while a peer is one.
    """
    # The old primary is usually outside --limit: it is asked over the network, from the
    # replica being promoted. The question starts first, in the background, so it overlaps
    # the preparation below; the answer is used only if it is at most 2 s old when
    # pg_promote runs (a confirmation prompt can take minutes: then it is asked again).
    # Only the replica to promote asks (every standby in --limit when none is named).
    me = config()
    named = options(FailoverOptions).to
    if "postgres" in me.roles and host.name != me.settings(PostgresSettings).primary and named in ("", host.name):
        probe = _Probe(inventory.get_host(host.name), topology(me).primary(me.name).address,
                       me.settings(PostgresSettings).cluster)
        archive = ArchiveCheck(inventory.get_host(host.name), me.settings(PostgresSettings))
    setup = _setup()
    if setup is None:
        return
    cfg, version, states = setup
    request = options(FailoverOptions)
    pg = cfg.settings(PostgresSettings)
    old = pg.primary
    if host.name == old:
        raise OperationError(f"failover: {old} is the primary being replaced; leave it out of --limit")
    target = request.to
    candidates = [m for m, st in states.items() if m != old and (_live(st) or {}).get("in_recovery")]
    if not target:
        if len(candidates) != 1:
            raise OperationError(f"failover: name the replica to promote with --data to=HOST ({', '.join(candidates)})")
        target = candidates[0]
    old_st = _live(states.get(old))
    if old_st and old_st["running"] and old_st["in_recovery"] is False:
        raise OperationError(f"failover: {old} is alive and primary; use deploys/switchover.py")
    if target not in candidates:
        raise OperationError(f"failover: {target} is not a running standby")
    audit.note("primary", {"cluster": cfg.settings(PostgresSettings).cluster, "to": target})
    new_host = inventory.get_host(target)
    if host.name == target:  # printed while preparing, so --dry shows the plan too
        logger.warning(f"webstack: plan: promote {target} unless {old} answers as a primary; "
                       f"then postgres__primary: {old} -> {target}")
    # With synchronous replication and no other standby alive, the new primary
    # would wait forever for an acknowledgement: it runs asynchronously until
    # the old primary has rejoined and a site run restores the inventory's mode.
    live_standbys = [m for m in candidates if m != target]
    degrade = pg.synchronous and not live_standbys
    future = with_primary(cfg, target, synchronous=False if degrade else None)
    # Degrading: the new configuration is written before the promotion and read right after it,
    # in the promoting command, so the first write after pg_promote does not wait for the
    # acknowledgement of a dead standby until the reload below.
    staged = _configure(future, version) if degrade else None

    def promote() -> None:
        reload = staged is not None and staged.did_change()
        if probe.answer() == "f":
            hint = "; its configuration file was rewritten for the promotion but not loaded: " \
                   "deploys/site.py puts it back" if reload else ""
            raise OperationError(f"failover: {old} is alive and primary; use deploys/switchover.py{hint}")
        # pg_promote(wait => true) answers t only once the server has left recovery.
        reload_now = " -c 'select pg_reload_conf()'" if reload else ""
        marker = f"{paths(version).data}/pg_wal/{backup.PROMOTING}"
        mark = f"runuser -u postgres -- touch {marker} && " if archive.nothing_newer(version) else ""
        out = _sh(new_host, f"{mark}{promote_command(pg.cluster, old, target, 'failover', reload_now)}; "
                            f"r=$?; rm -f {marker}; exit $r")
        if out.splitlines()[:1] != ["t"]:
            raise OperationError(f"{target} did not leave recovery within 60 s")
        logger.info(f"    [{target}] promoted; {old} is fenced by pg-fence if it comes back")
        fault_point("failover:promoted")

    if host.name == target:
        python.call(name=f"Promote {target} ({old} is {'unreachable' if states.get(old) == UNREACHABLE else 'down'})",
                    function=promote)
    barrier(name="New primary promoted", label=f"failover {old} -> {target}")

    # pyinfra reads every fact of every prepared operation before it runs the first one. The
    # steps after the promotion are therefore prepared only once it is done (operations called
    # from a callback run at once, "nested"): their facts do not delay the promotion.
    def follow() -> None:
        conf = staged or _configure(future, version)
        owed_action("reload-postgres", reload_command(version), [conf])
        if host.name == target:
            if degrade:
                logger.warning(f"webstack: {target} runs asynchronously until a replica rejoins; "
                               "then run deploys/site.py")
            ensure_slots(cfg, unconditional=True)
            _inventory_change(cfg, old, target, request.write_inventory)
            if backup.enabled(pg):
                # The old primary may have died with WAL the archive never got: point-in-time
                # recovery from a backup taken before the failover could not cross that gap.
                # A backup on the new timeline makes every later point reachable without it.
                # (The checkpoint first: until one completes, pg_control still names the old
                # timeline, and pgBackRest refuses to back up.)
                server.shell(name=f"Start a backup of {pg.cluster} on the new timeline",
                             commands=["runuser -u postgres -- psql -XAtqc checkpoint && "
                                       "systemctl start --no-block webstack-backup.service"])

    python.call(name=f"Configure for {target} as the primary, reload, slots, inventory change", function=follow)


def rejoin() -> None:
    """Make a former primary a replica of the current one, with pg_rewind (no full re-clone).

    Run with ``--limit OLD --limit NEW`` after the inventory names NEW as
    primary. ``--data reclone=yes`` replaces pg_rewind by a fresh base backup.
    """
    setup = _setup()
    if setup is None:
        return
    cfg, version, states = setup
    pg = cfg.settings(PostgresSettings)
    primary_st = _live(states.get(pg.primary))
    if not (primary_st and primary_st["running"] and primary_st["in_recovery"] is False):
        recorded = recorded_primary(pg.primary, states)
        if recorded is None:
            raise OperationError(
                f"rejoin: the inventory names {pg.primary} primary, but it is not a running primary; "
                "commit the inventory change from failover/switchover first"
            )
        # A switchover or failover died after the promotion, before the inventory changed: the
        # promoted server's own record says which member is the primary now.
        new, record = recorded
        if host.name == new:
            logger.warning(f"webstack: {new} recorded its promotion ({record}); the inventory still names {pg.primary}")
            _inventory_change(cfg, pg.primary, new, options(RejoinOptions).write_inventory and not dry_run())
        cfg = with_primary(cfg, new)
        pg = cfg.settings(PostgresSettings)
    p = paths(version)
    if host.name == pg.primary:
        # Its configuration as the primary (a switchover killed after the promotion never wrote it),
        # synchronous only with members that can acknowledge now (never the one rejoining).
        standbys = sync_standbys(cfg, states, host.get_fact(PgStreamingStandbys))
        owed_action("reload-postgres", reload_command(version), [_configure(cfg, version, standbys=standbys)])
        ensure_slots(cfg, unconditional=True)
    barrier(name="Primary has slots", label=f"rejoin to {pg.primary}")
    if host.name == pg.primary:
        return
    mine = _live(states.get(host.name))
    reclone = options(RejoinOptions).reclone
    streaming = bool(mine and mine["running"] and mine["in_recovery"])
    if streaming and not reclone:
        host.noop(f"{host.name} is already a standby")
        return
    primary_address = topology(cfg).host(pg.primary).address
    if reclone or not mine:
        # A running standby holds its slot: it stops first, so the base backup can use the slot.
        stop = [f"systemctl stop {p.service}"] if streaming else []
        server.shell(name=f"Re-clone from {pg.primary}",
                     commands=[*stop, clone_command(version, primary_address, slot_name(host.name), pg.cluster)])
        conf = _configure(cfg, version)
        owed_action("reload-postgres", reload_command(version), [conf])
        return
    python.call(name=f"Look for transactions {pg.primary} never received", function=_check_divergence,
                version=version, me=inventory.get_host(host.name), primary=inventory.get_host(pg.primary),
                primary_timeline=int((_live(states.get(pg.primary)) or {}).get("timeline") or 0),
                discard=options(RejoinOptions).discard_divergent)
    # WAL the rewind needs from before the fork may be recycled already on this server (its crash
    # recovery, run by pg_rewind first, checkpoints): with backups it is fetched from the archive.
    restore_target_wal = "--restore-target-wal " if backup.enabled(pg) else ""
    server.shell(
        name=f"pg_rewind against {pg.primary}",
        commands=[
            f"systemctl stop {p.service}; "
            f"runuser -u postgres -- env PGPASSFILE={PGPASS} {p.bin}/pg_rewind -D {p.data} "
            f"--config-file={p.etc}/postgresql.conf {restore_target_wal}"
            f"--source-server='host={primary_address} user=replicator dbname=postgres {certs.client_options(pg.cluster)}' "
            "|| { echo 'pg_rewind failed: rerun with --data reclone=yes' >&2; exit 1; }"
        ],
    )
    conf = _configure(cfg, version)
    _start_as_standby(version, conf)


def recorded_primary(named: str, states: dict[str, Any]) -> tuple[str, str] | None:
    """(member, record) of the one running primary other than ``named`` that recorded its own
    promotion (``PROMOTED``) on a timeline past ``named``'s; None when there is not exactly one."""
    old = _live(states.get(named)) or {}
    found = [(name, st["promoted"]) for name, raw in states.items() if name != named
             and (st := _live(raw)) and st["running"] and st["in_recovery"] is False
             and f" to={name} " in f" {st.get('promoted') or ''} " and st["timeline"] > old.get("timeline", 0)]
    return found[0] if len(found) == 1 else None


DIVERGENT = "/var/lib/postgresql/webstack-divergent"


def fork_point(history: str, timeline: int) -> str | None:
    """Where ``timeline`` ended, per a timeline history file (lines ``TLI<TAB>LSN<TAB>reason``);
    None when ``timeline`` is not an ancestor in it."""
    for line in history.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit() and int(fields[0]) == timeline:
            return fields[1]
    return None


def _check_divergence(version: str, me: Any, primary: Any, primary_timeline: int, discard: bool) -> None:
    """Before pg_rewind: does this former primary hold WAL past the point where the new primary's
    timeline forked from its own? Records there are what pg_rewind throws away. They are saved
    (pg_waldump's listing and the WAL segments) under DIVERGENT; committed transactions among
    them, or any doubt (WAL that cannot be read, a timeline the primary's history does not
    hold), stop the rejoin unless the operator said ``discard_divergent=yes``."""
    p = paths(version)
    _sh(me, f"systemctl stop {p.service}", timeout=600)  # a split-brain survivor may still run
    control = _sh(me, f"LC_ALL=C {p.bin}/pg_controldata {p.data}")
    found = re.search(r"Latest checkpoint's TimeLineID:\s+(\d+)", control)
    if not found:
        raise OperationError(f"{me.name}: no timeline in pg_controldata output")
    # The checkpoint's timeline lags a promotion until the next checkpoint: the newest history
    # file the server wrote itself is the timeline it was on.
    own = max([int(found.group(1))] + [int(f[:8], 16) for f in _sh(me, f"ls {p.data}/pg_wal").split()
                                       if re.fullmatch(r"[0-9A-F]{8}[.]history", f)])

    def refuse_or_warn(what: str) -> None:
        if not discard:
            raise OperationError(f"rejoin: {what}. pg_rewind could discard transactions: check first, then "
                                 "rerun with --data discard_divergent=yes")
        logger.warning(f"webstack: {what}; going on (discard_divergent=yes)")

    history = _sh(primary, f"cd {p.data}/pg_wal && f=$(ls | grep '^[0-9A-F]\\{{8\\}}[.]history$' | sort | tail -n 1); "
                           "[ -n \"$f\" ] && cat \"$f\" || true")
    fork = fork_point(history, own)
    if fork is None:
        if own == primary_timeline:
            logger.info(f"    [{me.name}] on {primary.name}'s timeline {own}: nothing diverged")
            return
        refuse_or_warn(f"{me.name} is on timeline {own}, which {primary.name}'s history (timeline "
                       f"{primary_timeline}) does not hold: it may have taken writes {primary.name} never saw")
        return
    stamp = time.strftime("%Y%m%dT%H%M%S")
    keep = f"{DIVERGENT}/{stamp}-timeline{own}"
    # Counted on the server (the listing can be long); pg_waldump's own errors are kept: only the
    # normal end of the WAL is no error.
    out = _sh(me, (
        f"install -d -m 0700 -o postgres -g postgres {keep} && cd {keep} && "
        f"runuser -u postgres -- {p.bin}/pg_waldump -p {p.data}/pg_wal -t {own} -s {fork} "
        "> waldump.txt 2> waldump.err; "
        "echo \"commits=$(grep -c 'desc: COMMIT' waldump.txt)\"; "
        "echo \"first=$(grep -o -m1 'lsn: [0-9A-F/]*' waldump.txt | cut -c6-)\"; "
        "echo \"last=$(grep -o 'lsn: [0-9A-F/]*' waldump.txt | tail -n 1 | cut -c6-)\"; "
        "echo \"error=$(tr '\\n' ' ' < waldump.err)\""), timeout=600)
    facts = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    commits, first, last, error = int(facts.get("commits") or 0), facts.get("first", ""), facts.get("last", ""), \
        facts.get("error", "")
    end_of_wal = any(x in error for x in ("invalid record length", "could not find a valid record",
                                          "invalid magic number", "record with incorrect prev-link",
                                          "contrecord is requested", "invalid resource manager ID"))
    if error.strip() and not end_of_wal:
        refuse_or_warn(f"{me.name}'s WAL past the fork point {fork} on timeline {own} cannot be read "
                       f"({error.strip()[-200:]}); what it holds is unknown")
    if not first:
        _sh(me, f"rm -rf {keep}; rmdir {DIVERGENT} 2>/dev/null || true")
        logger.info(f"    [{me.name}] no WAL past the fork point {fork} on timeline {own}")
        return
    # The segments holding the divergent records, from the fork's segment on, for the record.
    first_segment = f"{own:08X}{fork_segment(fork)}"
    segments = [f for f in _sh(me, f"ls {p.data}/pg_wal").split()
                if re.fullmatch(r"[0-9A-F]{24}", f) and f.startswith(f"{own:08X}") and f >= first_segment]
    _sh(me, f"cd {p.data}/pg_wal && cp -p {' '.join(segments)} {keep}/ && chown -R postgres:postgres {keep}"
        if segments else "true")
    what = (f"{me.name} holds WAL {first}..{last} on timeline {own}, past the point ({fork}) where {primary.name} "
            f"took over: {commits} committed transaction(s) that {primary.name} never received. "
            f"Saved in {keep} on {me.name} (pg_waldump listing and WAL segments)")
    if commits and not discard:
        raise OperationError(f"rejoin: {what}. pg_rewind would discard them: recover what you need first, "
                             "then rerun with --data discard_divergent=yes")
    logger.warning(f"webstack: {what}; pg_rewind discards them{' (discard_divergent=yes)' if commits else ''}")


def fork_segment(lsn: str, segment_size: int = 16 * 1024 * 1024) -> str:
    """The last 16 hex digits of the WAL file name holding ``lsn`` (timeline apart)."""
    n = _lsn(lsn) // segment_size
    per = 0x100000000 // segment_size
    return f"{n // per:08X}{n % per:08X}"

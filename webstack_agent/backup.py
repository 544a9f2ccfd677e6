#!/usr/bin/python3
"""webstack-backup: pgBackRest jobs of one cluster member (installed by webstack, do not edit).

    webstack-backup scheduled --stanza S     hourly timer: full / diff / incr, primary only
    webstack-backup check --stanza S [...]   thresholds: exit 1 listing every breach
    webstack-backup verify --stanza S        weekly timer: pgbackrest verify, primary only
    webstack-backup restore --stanza S ...   (root) replace the data directory with a restore
    webstack-backup stanza-create --stanza S

The postgres role writes this member's settings to ``CONFIG`` (JSON, see :class:`Config`),
from the same inventory settings it renders pgbackrest.conf from; ``check``'s thresholds
given as arguments override the file's. ``restore`` and ``verify`` need no file.

Plain Python 3 standard library (3.11 on Debian 12, 3.13 on Debian 13): it runs on the
database servers as a single file. Source: webstack_agent/backup.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

CONFIG = "/etc/pgbackrest/webstack-backup.json"
FULL_WEEKDAY = 6  # Sunday (UTC): the weekly full


class ConfigError(Exception):
    """The settings file is missing, unreadable or not for this stanza."""


@dataclass(frozen=True)
class Limits:
    """Thresholds of ``check`` (the inventory's ``postgres__backup_check_*``)."""

    max_wal_lag_s: float  # the oldest WAL segment waiting for the archive (s)
    max_age_h: float  # the newest backup of any type (h)
    max_diff_age_h: float  # the newest differential or full (h)
    max_full_age_h: float  # the newest full (h)
    max_slot_wal_mb: float = 1024  # WAL an inactive replication slot holds back (MiB)

    def args(self) -> list[str]:
        """The same thresholds as ``check`` arguments (``--max-wal-lag-s 300 ...``)."""
        return [a for f in dataclasses.fields(self) for a in (_flag(f.name), str(getattr(self, f.name)))]


@dataclass(frozen=True)
class Config:
    """What the role tells the agent about this member; the JSON in ``CONFIG``.

    ``other_member_options``: pgBackRest options naming the other members (``pg2-host``,
    ``pg2-path``...) in pgbackrest.conf; a backup or stanza-create without a streaming
    standby resets them, so it looks at the local server only (a fresh, not yet cloned
    member would otherwise count as a second primary).
    """

    stanza: str
    limits: Limits
    other_member_options: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = CONFIG) -> Config:
        try:
            raw = json.loads(text)
            limits = raw["limits"]
            names = [f.name for f in dataclasses.fields(Limits)]
            if set(raw) != {"stanza", "limits", "other_member_options"} or set(limits) != set(names):
                raise ValueError(f"keys {sorted(raw)}, limits {sorted(limits)}")
            if not all(isinstance(limits[n], (int, float)) and not isinstance(limits[n], bool) for n in names):
                raise ValueError(f"limits must be numbers: {limits}")
            options = raw["other_member_options"]
            if not isinstance(raw["stanza"], str) or not isinstance(options, list) or \
                    not all(isinstance(o, str) for o in options):
                raise ValueError("stanza and other_member_options must be strings")
            return cls(raw["stanza"], Limits(**{n: limits[n] for n in names}), tuple(options))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{where}: not a webstack-backup configuration ({e})") from e

    @classmethod
    def load(cls, stanza: str, path: str = CONFIG) -> Config:
        """The configuration at ``path``, which must be the one of ``stanza``."""
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror} (written by the webstack postgres role)") from e
        cfg = cls.from_json(text, path)
        if cfg.stanza != stanza:
            raise ConfigError(f"{path} configures stanza {cfg.stanza!r}, not {stanza!r}")
        return cfg


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _num(x: float) -> str:
    """A threshold as written in the inventory: 192, not 192.0 (arguments arrive as floats)."""
    return str(int(x)) if float(x).is_integer() else str(x)


def _day(t: float) -> int:
    return int(t // 86400)


def decide(now: float, backups: list[dict[str, Any]]) -> str:
    """The type of the next scheduled backup, from the repository's backups (pgbackrest info).

    By UTC calendar day, so points stay 24 h apart: the first run of each day takes
    a differential, the first run of a Sunday a full (or any run once the newest full
    is a week old, so a missed Sunday heals itself), every other run an incremental.
    """
    fulls = [b["timestamp"]["stop"] for b in backups if b["type"] == "full"]
    if not fulls or now - max(fulls) >= 7 * 86400:
        return "full"
    if time.gmtime(now).tm_wday == FULL_WEEKDAY and _day(max(fulls)) != _day(now):
        return "full"
    anchors = [b["timestamp"]["stop"] for b in backups if b["type"] in ("full", "diff")]
    if _day(max(anchors)) != _day(now):
        return "diff"
    return "incr"


def breaches(now: float, stanza: dict[str, Any], archiver: dict[str, Any], ready_ages: list[float],
             limits: Limits) -> list[str]:
    """Every threshold the repository state breaks (empty when all is well)."""
    out = []
    status = stanza.get("status", {})
    if status.get("code") != 0:
        out.append(f"repository status {status.get('code')}: {status.get('message')}")
    backups = stanza.get("backup", [])
    running = bool(status.get("lock", {}).get("backup", {}).get("held"))
    for label, types, limit in (("any", ("full", "diff", "incr"), limits.max_age_h),
                                ("diff or full", ("full", "diff"), limits.max_diff_age_h),
                                ("full", ("full",), limits.max_full_age_h)):
        stops = [b["timestamp"]["stop"] for b in backups if b["type"] in types]
        if not stops:
            out.append(f"no {label} backup")
        elif now - max(stops) > limit * 3600 and not (running and label == "any"):
            out.append(f"newest {label} backup is {(now - max(stops)) / 3600:.1f} h old (limit {_num(limit)} h)")
    errors = [b["label"] for b in backups if b.get("error")]
    if errors:
        out.append(f"backups with page checksum errors: {', '.join(errors)}")
    lag = max(ready_ages, default=0.0)
    if lag > limits.max_wal_lag_s:
        out.append(f"{len(ready_ages)} WAL segment(s) wait for the archive, the oldest for {lag:.0f} s "
                   f"(limit {_num(limits.max_wal_lag_s)} s)")
    if archiver.get("failing"):
        out.append(f"archive_command is failing (failed_count {archiver.get('failed_count')})")
    return out


SEGMENT = re.compile(r"([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(?![.]partial)")


def archive_gaps(names: list[str], start: str, timeline: int, pending: set[str], segment_size: int,
                 ancestors: dict[int, int] | None = None) -> list[str]:
    """Ranges of WAL segments missing from the archive between ``start`` (the segment the newest
    backup needs first) and the newest archived one: point-in-time recovery from that backup
    cannot cross them. A segment counts as archived on ``timeline``, or on an ancestor timeline
    up to the segment where that timeline ended (``ancestors``: timeline -> its last segment
    number, from the timeline history file), so a timeline switch is no gap, while what a
    former primary archived past its fork (or a sibling timeline) fills nothing; partial
    segments do not count. ``pending``: segment names still waiting in pg_wal (late, not lost)."""
    per_log = 0x100000000 // segment_size
    ancestors = ancestors or {}

    def number(name: str) -> int:
        return int(name[8:16], 16) * per_log + int(name[16:24], 16)

    present = set()
    for path in names:
        found = SEGMENT.match(path.rsplit("/", 1)[-1])
        if not found:
            continue
        tli, n = int(found.group(1), 16), number(found.group(0))
        if tli == timeline or (tli in ancestors and n <= ancestors[tli]):
            present.add(n)
    present |= {number(name) for name in pending}
    first = number(start)
    newest = max((n for n in present if n >= first), default=None)
    if newest is None:
        return []
    missing = [n for n in range(first, newest) if n not in present]
    ranges: list[list[int]] = []
    for n in missing:
        if ranges and ranges[-1][1] == n - 1:
            ranges[-1][1] = n
        else:
            ranges.append([n, n])

    def name(n: int) -> str:
        return f"{timeline:08X}{n // per_log:08X}{n % per_log:08X}"

    return [name(a) if a == b else f"{name(a)}..{name(b)}" for a, b in ranges]


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, text=True, capture_output=True)


def psql(sql: str) -> str:
    return run(["psql", "-XAt", "-d", "postgres", "-c", sql]).stdout.strip()


def in_recovery() -> bool:
    return psql("select pg_is_in_recovery()") == "t"


def info(stanza: str) -> dict[str, Any]:
    data = json.loads(run(["pgbackrest", f"--stanza={stanza}", "--output=json", "info"]).stdout or "[]")
    return data[0] if data else {}


def archiver() -> dict[str, Any]:
    row = psql("select failed_count, coalesce(last_failed_time > coalesce(last_archived_time, 'epoch'), false) "
               "from pg_stat_archiver").split("|")
    return {"failed_count": int(row[0]), "failing": row[1] == "t"}


def ready_ages(now: float) -> list[float]:
    data = psql("show data_directory")
    return [now - os.stat(p).st_mtime for p in glob.glob(f"{data}/pg_wal/archive_status/*.ready")]


def gaps(stanza: str, st: dict[str, Any]) -> list[str]:
    """``archive_gaps`` of this primary's archive, from the newest backup's first segment on."""
    backups = st.get("backup", [])
    archives = st.get("archive", [])
    if not backups or not archives:
        return []
    start = max(backups, key=lambda b: b["timestamp"]["stop"]).get("archive", {}).get("start")
    if not start:
        return []
    archive_id = max(archives, key=lambda a: a.get("max") or "")["id"]
    listing = json.loads(run(["pgbackrest", f"--stanza={stanza}", "--output=json", "repo-ls", "--recurse",
                              f"archive/{stanza}/{archive_id}"]).stdout or "{}")
    row = psql("select ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int, "
               "(select setting from pg_settings where name = 'wal_segment_size')").split("|")
    data = psql("show data_directory")
    pending = {name[:24] for name in (os.path.basename(p) for p in glob.glob(f"{data}/pg_wal/archive_status/*.ready"))
               if SEGMENT.match(name)}
    timeline, segment_size = int(row[0]), int(row[1])
    return archive_gaps(list(listing), start, timeline, pending, segment_size,
                        ancestors_of(f"{data}/pg_wal/{timeline:08X}.history", segment_size))


def ancestors_of(history_file: str, segment_size: int) -> dict[int, int]:
    """Timeline -> the number of the segment where it ended, from a timeline history file (empty on
    timeline 1, which has none)."""
    out: dict[int, int] = {}
    try:
        text = open(history_file).read()
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit() and "/" in fields[1]:
            hi, lo = fields[1].split("/")
            lsn = (int(hi, 16) << 32) + int(lo, 16)
            # The switch point is where the next record would start: a switch exactly at a segment
            # boundary ends the timeline in the segment before.
            last = (lsn - 1) // segment_size
            out[int(fields[0])] = last
    return out


def local_only(cfg: Config) -> list[str]:
    """``--reset-pgN-...`` for every option naming another member (see :class:`Config`)."""
    return [f"--reset-{option}" for option in cfg.other_member_options]


LOCK_BUSY = 50  # pgBackRest's exit code for LockAcquireError


def cmd_scheduled(args: argparse.Namespace, wait_s: float = 1800, pause: float = 5.0) -> int:
    """The scheduled backup. While another pgBackRest backup holds the stanza's lock (the timer's
    run at :05 when somebody started one by hand, or the other way round), it waits for it and
    decides the type again afterwards (two fulls back to back otherwise), for ``wait_s`` at most:
    failing at once alerted the operator for a backup that was being taken. The lock is read from
    ``pgbackrest info``; a backup that takes it in between (pgBackRest's error 50) is waited for
    the same way. One line when the wait starts, then one a minute."""
    deadline = time.monotonic() + wait_s
    started: float | None = None
    next_note = 0.0
    announced = ""
    while True:
        if in_recovery():  # checked again after a wait: a switchover may have demoted this server
            print("standby: the primary takes the backups")
            return 0
        st = info(args.stanza)
        status = st.get("status", {})
        if status.get("code") not in (0, 2):  # 2: no backup yet; anything else (99: unreachable) must not look like "empty"
            print(f"repository of {args.stanza} unusable: {status}", file=sys.stderr)
            return 1
        result = LOCK_BUSY
        if not status.get("lock", {}).get("backup", {}).get("held"):
            kind = args.type or decide(time.time(), st.get("backup", []))
            # Read the data files from a streaming standby when there is one, to spare the primary's disks
            # (pgBackRest 2.45 has no backup-standby=prefer, so the choice is made here for both releases).
            standby = psql("select count(*) from pg_stat_replication where state = 'streaming'") != "0"
            hosts = ["--backup-standby=y"] if standby else ["--backup-standby=n",
                                                            *local_only(Config.load(args.stanza, args.settings))]
            line = f"{kind} backup of {args.stanza}{' from a standby' if standby else ''}"
            if line != announced:
                print(line, flush=True)
                announced = line
            result = subprocess.call(["pgbackrest", f"--stanza={args.stanza}", f"--type={kind}", *hosts,
                                      "--log-level-console=info", "backup"])
        now = time.monotonic()
        if result != LOCK_BUSY or now + pause > deadline:
            return result
        started = now if started is None else started
        if now - started >= next_note:
            print(f"another pgBackRest backup of {args.stanza} is running: waiting for it "
                  f"({now - started:.0f} s so far)", file=sys.stderr, flush=True)
            next_note = now - started + 60
        time.sleep(pause)


def check_limits(args: argparse.Namespace) -> Limits:
    """``check``'s thresholds: each argument given, else the settings file's value."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)}
    if all(v is not None for v in given.values()):
        return Limits(**given)
    stored = Config.load(args.stanza, args.settings).limits
    return dataclasses.replace(stored, **{k: v for k, v in given.items() if v is not None})


def cmd_check(args: argparse.Namespace) -> int:
    if in_recovery():
        if args.require_primary:
            print(json.dumps({"stanza": args.stanza, "problems": ["this server is a standby: the inventory names "
                                                                   "the wrong primary (failover not committed?)"]}))
            return 1
        print("standby: the check runs on the primary")
        return 0
    limits = check_limits(args)
    now = time.time()
    ages = ready_ages(now)
    arch = archiver()
    # pgbackrest check switches WAL and waits until that segment is in the repository: for
    # archive-timeout (pgbackrest.conf) and io-timeout (pgBackRest's default), unless --timeout.
    timeouts = [] if args.timeout is None else [f"--archive-timeout={args.timeout}", f"--io-timeout={args.timeout}"]
    chk = run(["pgbackrest", f"--stanza={args.stanza}", *timeouts, "check"], check=False)
    problems = [] if chk.returncode == 0 else [f"pgbackrest check failed: {(chk.stderr or chk.stdout).strip()[-300:]}"]
    st = info(args.stanza)
    problems += breaches(now, st, arch, ages, limits)
    missing = gaps(args.stanza, st)
    if missing:
        problems.append(f"WAL archive gap: {', '.join(missing)} missing after the newest backup's start: "
                        "point-in-time recovery cannot cross it (the next backup closes it)")
    problems += slot_problems(limits)
    newest = {t: max((b["timestamp"]["stop"] for b in st.get("backup", []) if b["type"] == t), default=None)
              for t in ("full", "diff", "incr")}
    report = {"stanza": args.stanza, "unarchived_wal": len(ages), "oldest_unarchived_s": round(max(ages, default=0), 1),
              "newest_age_s": {t: (round(now - v) if v else None) for t, v in newest.items()},
              "backups": len(st.get("backup", [])), "problems": problems}
    print(json.dumps(report))
    return 1 if problems else 0


def slot_problems(limits: Limits) -> list[str]:
    """Replication slots that hold WAL for a replica that is gone too long, or that lost it."""
    out = []
    rows = psql("select slot_name, active, coalesce(wal_status, ''), "
                "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint "
                "from pg_replication_slots where slot_type = 'physical'")
    for line in rows.splitlines():
        name, active, status, held = line.split("|")
        if status == "lost":
            out.append(f"replication slot {name} was invalidated (its replica fell more than max_slot_wal_keep_size "
                       "behind): a site run recreates it and the replica catches up from the archive")
        elif active != "t" and int(held) > limits.max_slot_wal_mb * 1024 * 1024:
            out.append(f"inactive replication slot {name} holds {int(held) // 1048576} MiB of WAL "
                       f"(limit {_num(limits.max_slot_wal_mb)} MiB): is its replica down?")
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    if in_recovery():
        print("standby: verify runs on the primary")
        return 0
    return subprocess.call(["pgbackrest", f"--stanza={args.stanza}", "--log-level-console=info", "verify"])


def _empty_data_directory(path: str) -> None:
    """The data directory, created empty: postgres:postgres, mode 0700."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    owner = pwd.getpwnam("postgres")
    os.chown(path, owner.pw_uid, owner.pw_gid)
    os.chmod(path, 0o700)  # as install -d -m 700 did, also for a directory that was there


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore into the data directory; the previous one is kept until the restored server
    has finished recovery, and put back if anything before that fails."""
    data, service = args.data, args.service
    asuser = ["runuser", "-u", "postgres", "--"]
    conf = [f"--config={args.config}"] if args.config else []
    raw = subprocess.run([*asuser, "pgbackrest", *conf, f"--stanza={args.stanza}", "--output=json", "info"],
                         text=True, capture_output=True)
    stanza = (json.loads(raw.stdout or "[]") or [{}])[0]
    if stanza.get("status", {}).get("code") != 0:
        print(f"no usable backup of {args.stanza}: {stanza.get('status') or raw.stderr.strip()}", file=sys.stderr)
        return 1
    old = data + ".webstack-pre-restore"
    doomed = data + ".webstack-restored-over"  # the previous directory once a restore succeeded

    def put_back(start: bool = True) -> None:
        subprocess.call(["systemctl", "stop", service])
        shutil.rmtree(data, ignore_errors=True)
        if os.path.exists(old):
            os.rename(old, data)
            if start:
                subprocess.call(["systemctl", "start", service])

    def roll_back(why: str) -> int:
        print(f"restore failed ({why}): putting the previous data directory back", file=sys.stderr)
        put_back()
        return 1

    if os.path.lexists(doomed):
        shutil.rmtree(doomed)  # an earlier restore succeeded but was cut off while deleting it
    if os.path.exists(old):
        # An earlier restore was interrupted (its machine rebooted, its unit was killed) before it
        # finished or rolled back: finish that rollback first (the server stays stopped), then
        # start afresh.
        print(f"{old} is left by an interrupted restore: putting it back first", file=sys.stderr, flush=True)
        put_back(start=False)
    subprocess.run(["systemctl", "stop", service], check=True)
    if os.path.exists(data):
        os.rename(data, old)
    _empty_data_directory(data)

    argv = [*asuser, "pgbackrest", *conf, f"--stanza={args.stanza}", "--log-level-console=info", "--process-max=4"]
    if args.time:
        argv += ["--type=time", f"--target={args.time}", "--target-action=promote"]
    if args.archive_off:
        argv += ["--archive-mode=off"]
    started = time.time()
    if subprocess.call([*argv, "restore"]) != 0:
        return roll_back("pgbackrest restore")
    if subprocess.call(["timeout", "3600", "systemctl", "start", service]) != 0:
        return roll_back("the restored server did not start (a target past the end of the archive?)")
    deadline = time.time() + 3600
    while True:
        r = subprocess.run([*asuser, "psql", "-XAt", "-c", "select pg_is_in_recovery()"], text=True, capture_output=True)
        if r.stdout.strip() == "f":
            break
        if time.time() > deadline:
            return roll_back("recovery did not finish within an hour")
        time.sleep(0.5)
    # pgBackRest wrote the recovery target into postgresql.auto.conf; a replica cloned from
    # this server later would copy it and stop (or promote) at that target. Drop it now
    # (these settings take effect at server start only).
    subprocess.run([*asuser, "psql", "-XAtq", "-v", "ON_ERROR_STOP=1",
                    "-c", "ALTER SYSTEM RESET recovery_target_time", "-c", "ALTER SYSTEM RESET recovery_target_action",
                    "-c", "ALTER SYSTEM RESET recovery_target"], check=True)
    subprocess.run(["timeout", "600", "systemctl", "restart", service], check=True)  # recovery_* need a restart
    if os.path.lexists(old):
        os.rename(old, doomed)  # renamed first: a cut during the deletion leaves no directory to put back
        shutil.rmtree(doomed)
    print(json.dumps({"restored": args.stanza, "target": args.time or "latest", "seconds": round(time.time() - started, 1)}))
    return 0


def cmd_stanza_create(args: argparse.Namespace, tries: int = 30, pause: float = 1.0) -> int:
    """``pgbackrest stanza-create``, tried again while another pgBackRest process holds the lock:
    on a first deploy the server's archive_command (an archive-push, which fails until the stanza
    exists) can hold it at that very moment (seen on a cold deploy of the lab: error [050])."""
    command = ["pgbackrest", f"--stanza={args.stanza}", *local_only(Config.load(args.stanza, args.settings)),
               "--log-level-console=warn", "stanza-create"]
    for attempt in range(tries):
        code = subprocess.call(command)
        if code != LOCK_BUSY or attempt == tries - 1:
            return code
        print(f"stanza-create: the pgBackRest lock is held, again in {pause:.0f} s", file=sys.stderr)
        time.sleep(pause)
    return LOCK_BUSY


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="webstack-backup")
    ap.add_argument("--settings", default=CONFIG, metavar="PATH", help=f"this member's settings (default {CONFIG})")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("scheduled", "check", "verify", "restore", "stanza-create"):
        p = sub.add_parser(name)
        p.add_argument("--stanza", required=True)
    sub.choices["scheduled"].add_argument("--type", choices=["full", "diff", "incr"])
    chk = sub.choices["check"]
    for f in dataclasses.fields(Limits):
        chk.add_argument(_flag(f.name), dest=f.name, type=float, help=f"overrides the settings file's {f.name}")
    chk.add_argument("--timeout", type=int, help="seconds pgbackrest check waits for the repository "
                                                 "(default: pgbackrest.conf's archive-timeout)")
    chk.add_argument("--require-primary", action="store_true", help="fail on a standby (deploys/check.py)")
    rst = sub.choices["restore"]
    rst.add_argument("--data", required=True)
    rst.add_argument("--service", required=True)
    rst.add_argument("--config", help="pgbackrest.conf to use instead of pgBackRest's own default")
    rst.add_argument("--time", help="recovery target time, e.g. '2026-11-27 10:00:00+00'")
    rst.add_argument("--archive-off", action="store_true", help="the copy must not archive into the stanza")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    commands = {"scheduled": cmd_scheduled, "check": cmd_check, "verify": cmd_verify, "restore": cmd_restore,
                "stanza-create": cmd_stanza_create}
    try:
        return commands[args.cmd](args)
    except ConfigError as e:
        print(f"webstack-backup: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

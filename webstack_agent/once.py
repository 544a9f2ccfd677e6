#!/usr/bin/python3
"""webstack-once: run a scheduled job once per period, however many worker hosts fire its timer.

    webstack-once --job NAME --calendar SPEC --lookback SECONDS -- COMMAND...

Every worker host has the job's systemd timer, so losing a host loses no run: the
others still fire. Each run first works out the *period* it belongs to, the latest
elapse of ``SPEC`` at or before now (``systemd-analyze calendar``, UTC), then claims
``(job, period)`` in the application's database (``DATABASE_URL``) with one
``INSERT ... ON CONFLICT DO NOTHING``. The host whose insert lands runs ``COMMAND``
and records its exit status; the others log who has the period and exit 0.

Guarantees and limits:

- At most one run per period, whatever the clocks' random delays (the inventory
  check keeps ``RandomizedDelaySec`` shorter than the shortest period).
- A host that claimed a period and died mid-run leaves the period claimed and
  unfinished (visible in ``webstack_schedule_runs``): it is not run again; the next
  period runs on any live host. Jobs therefore are written to catch up on their own
  (a cleanup deletes everything old enough, not "yesterday's" rows).
- A catch-up run at boot (``Persistent=``) belongs to the latest period, and runs
  only if no other host ran it.
- No database, no run: the unit fails, and its failure alert names it.

Needs python3-psycopg2 (installed with the application). Source: webstack_agent/once.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import socket
import subprocess
import sys
import time

TABLE = """create table if not exists webstack_schedule_runs (
    job text not null, period timestamptz not null, host text not null,
    started_at timestamptz not null default now(), finished_at timestamptz, exit_code int,
    primary key (job, period))"""
STAMP = re.compile(r"\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC$", re.M)


def period(calendar: str, lookback: float, now: float) -> dt.datetime:
    """The latest elapse of ``calendar`` at or before ``now`` (epoch seconds), searched from ``lookback``
    seconds back. In the server's own time zone, as its timers fire; printed (and compared) in UTC."""
    base, latest = now - lookback - 1, None
    while True:
        out = subprocess.run(
            ["systemd-analyze", "calendar", f"--base-time=@{int(base)}", "--iterations=64", calendar],
            capture_output=True, text=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}, check=True)
        # Local times are followed by "(in UTC): ..." unless the zone is UTC: the UTC stamps are the ones.
        stamps = [dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC)
                  for s in STAMP.findall(out.stdout)]
        due = [s for s in stamps if s.timestamp() <= now]
        if due:
            latest = due[-1]
        if len(due) < len(stamps) or not stamps:
            break
        base = due[-1].timestamp()  # all 64 were due: go on from the last one
    if latest is None:
        raise SystemExit(f"webstack-once: no elapse of {calendar!r} in the last {lookback:.0f} s")
    return latest


def connect(deadline_s: float = 30.0):  # type: ignore[no-untyped-def]
    """A connection to the application's database, retried through a failover for ``deadline_s``."""
    import psycopg2

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            conn = psycopg2.connect(os.environ["DATABASE_URL"], application_name="webstack-once")
            conn.autocommit = True
            return conn
        except psycopg2.OperationalError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"webstack-once: database unreachable: {str(exc).strip()}") from None
            time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="webstack-once", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", required=True)
    parser.add_argument("--calendar", required=True)
    parser.add_argument("--lookback", type=float, required=True, help="longest period of the calendar, seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    slot = period(args.calendar, args.lookback, time.time())
    me = socket.gethostname()
    conn = connect()
    with conn.cursor() as cur:
        # Two hosts' first runs at once would race on creating the table: one at a time.
        cur.execute("select pg_advisory_lock(hashtext('webstack_schedule_runs'))")
        cur.execute(TABLE)
        cur.execute("select pg_advisory_unlock(hashtext('webstack_schedule_runs'))")
        cur.execute("insert into webstack_schedule_runs (job, period, host) values (%s, %s, %s) "
                    "on conflict do nothing returning host", (args.job, slot, me))
        if cur.fetchone() is None:
            cur.execute("select host, started_at from webstack_schedule_runs where job = %s and period = %s",
                        (args.job, slot))
            host, started = cur.fetchone()
            print(f"{args.job}: period {slot:%Y-%m-%d %H:%M:%S} already taken by {host} at {started:%H:%M:%S}",
                  flush=True)
            return 0
    print(f"{args.job}: running period {slot:%Y-%m-%d %H:%M:%S} on {me}", flush=True)
    conn.close()  # no session held open through a long job
    code = subprocess.run(command, check=False).returncode
    conn = connect()
    with conn.cursor() as cur:
        cur.execute("update webstack_schedule_runs set finished_at = now(), exit_code = %s "
                    "where job = %s and period = %s", (code, args.job, slot))
    print(f"{args.job}: period {slot:%Y-%m-%d %H:%M:%S} exited {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

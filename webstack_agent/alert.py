#!/usr/bin/python3
"""webstack-alert: mail the operator that a unit failed (installed by webstack, do not edit).

    webstack-alert --to OPERATOR [--lines N] UNIT

Run by ``webstack-alert@UNIT.service``, which the drop-in ``OnFailure=webstack-alert@%n.service``
starts when UNIT fails. systemd (252+) tells the failed unit, its result and invocation in
``$MONITOR_UNIT``, ``$MONITOR_SERVICE_RESULT``, ``$MONITOR_EXIT_CODE``, ``$MONITOR_EXIT_STATUS`` and
``$MONITOR_INVOCATION_ID``; the instance name (UNIT) is the fallback. The mail names the host and
the unit in its subject and carries the unit's last N journal lines; it goes through the local
``sendmail`` (the host's Postfix null client), which queues it while the provider is away.

Plain Python 3 standard library. Source: webstack_agent/alert.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from email.utils import formatdate

SENDMAIL = "/usr/sbin/sendmail"


def started(invocation: str, run=subprocess.run) -> str:
    """When the run ``invocation`` started, as ``@SECONDS`` for ``journalctl --since``: the time
    of systemd's first journal line about it (``INVOCATION_ID=``). Empty if the journal has none."""
    argv = ["journalctl", "--no-pager", "-q", "-o", "short-unix", f"INVOCATION_ID={invocation}"]
    first = run(argv, capture_output=True, text=True, timeout=30).stdout.split(None, 1)
    return f"@{first[0]}" if first and first[0].replace(".", "", 1).isdigit() else ""


def _query(matches: list[str], lines: int, since: str = "", run=subprocess.run) -> list[tuple[float, str]]:
    """The last ``lines`` journal entries of ``matches`` (since ``since``): (time, text) each, the
    text as ``short-unix`` prints it after the time (a message's continuation lines kept with it)."""
    argv = ["journalctl", "--no-pager", "-q", "-o", "short-unix", "-n", str(lines),
            *(["--since", since] if since else []), *matches]
    out: list[tuple[float, str]] = []
    for line in run(argv, capture_output=True, text=True, timeout=30).stdout.splitlines():
        stamp, _, text = line.partition(" ")
        try:
            out.append((float(stamp), text))
        except ValueError:
            if out and line.strip():
                out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
    return out


def _own(unit: str, invocation: str, since: str, lines: int, run=subprocess.run) -> list[tuple[float, str]]:
    """What the failed run's processes wrote. Output of a process that exited before journald looked
    it up carries no ``_SYSTEMD_INVOCATION_ID`` (journald reads that from the process's cgroup) but
    still its ``_SYSTEMD_UNIT``, which systemd names when it opens the stream: the unit's lines since
    the run started count too. Two queries, not one with ``--since`` for both: when the journal
    lost the run's first line, ``since`` is late, and must not drop lines that carry the id."""
    found = _query([f"_SYSTEMD_INVOCATION_ID={invocation}"], lines, run=run)
    return found + (_query([f"_SYSTEMD_UNIT={unit}"], lines, since, run=run) if since else [])


def wait_for_own_lines(unit: str, invocation: str, since: str, seconds: float = 6.0,
                       run=subprocess.run) -> bool:
    """Wait until the journal holds a line the failed run wrote itself. systemd starts this alert
    as soon as the unit fails, and journald may not have read the unit's last output yet: the
    mail then carried only systemd's own lines, without the error (seen in the lab, where 2 s
    once was not enough on a busy machine). A run that wrote nothing costs ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        if _own(unit, invocation, since, 1, run):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def journal(unit: str, lines: int, invocation: str = "", run=subprocess.run) -> str:
    """The unit's last ``lines`` journal lines: of the failed run (its output and systemd's words
    about it) when the invocation id is known and in the journal, else the unit's."""
    if invocation:
        since = started(invocation, run)
        if since:  # systemd logged this run: wait for its processes' lines too
            wait_for_own_lines(unit, invocation, since, run=run)
        entries = _own(unit, invocation, since, lines, run) + _query([f"INVOCATION_ID={invocation}"], lines, run=run)
        if entries:
            merged = sorted(set(entries))[-lines:]
            return "\n".join(f"{time.strftime('%Y-%m-%dT%H:%M:%S+0000', time.gmtime(t))} {text}" for t, text in merged)
    proc = run(["journalctl", "--no-pager", "-o", "short-iso", "-n", str(lines), "-u", unit],
               capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() or f"(no journal lines: {proc.stderr.strip() or 'journalctl printed nothing'})"


def message(to: str, host: str, unit: str, env: dict[str, str], log: str) -> EmailMessage:
    """The alert mail for ``unit`` failing on ``host``."""
    msg = EmailMessage()
    msg["To"] = to
    msg["Subject"] = f"[webstack] {host}: {unit} failed"
    msg["Date"] = formatdate(localtime=True)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Webstack-Host"] = host
    msg["X-Webstack-Unit"] = unit
    facts = [f"host:   {host}", f"unit:   {unit}"]
    for key, label in (("MONITOR_SERVICE_RESULT", "result"), ("MONITOR_EXIT_CODE", "exit"),
                       ("MONITOR_EXIT_STATUS", "status"), ("MONITOR_INVOCATION_ID", "run")):
        if env.get(key):
            facts.append(f"{label + ':':7} {env[key]}")
    msg.set_content("\n".join(facts) + f"\n\nsystemctl status {unit} / journalctl -u {unit} on {host}.\n"
                    f"Last journal lines:\n\n{log}\n", cte="8bit")
    return msg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="webstack-alert", description=__doc__.split("\n")[0])
    parser.add_argument("--to", required=True, help="the operator's address")
    parser.add_argument("--lines", type=int, default=30, help="journal lines to include")
    parser.add_argument("unit", help="the failed unit (the instance name of webstack-alert@.service)")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    unit = env.get("MONITOR_UNIT") or args.unit
    host = socket.gethostname()
    msg = message(args.to, host, unit, env, journal(unit, args.lines, env.get("MONITOR_INVOCATION_ID", "")))
    proc = subprocess.run([SENDMAIL, "-oi", "-t"], input=msg.as_bytes(), capture_output=True, timeout=60)
    if proc.returncode != 0:
        print(f"webstack-alert: sendmail exited {proc.returncode}: {proc.stderr.decode(errors='replace')}",
              file=sys.stderr)
        return 1
    print(f"webstack-alert: mailed {args.to}: {host}: {unit} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

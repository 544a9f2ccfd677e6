"""Detached per-machine supervisor: runs systemd-nspawn, restarts it on exit code 133 (reboot).

Started by the lab as ``python -m lab.supervisor MACHINE_DIR NETNS PRIMARY_CIDR -- NSPAWN_ARGV...``
in its own session with stdout/stderr appended to MACHINE_DIR/console.log. It writes
MACHINE_DIR/nspawn.pid for each nspawn it starts. SIGTERM: forward to nspawn (which
shuts the container down cleanly) and do not restart. Any exit code other than 133
ends supervision; the code is written to MACHINE_DIR/last-exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REBOOT_EXIT = 133


def _say(msg: str) -> None:
    print(f"[lab-supervisor {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str]) -> int:
    """Supervise one machine until it powers off or is stopped."""
    if len(argv) < 5 or argv[3] != "--":
        print("usage: python -m lab.supervisor MACHINE_DIR NETNS PRIMARY_CIDR -- NSPAWN_ARGV...",
              file=sys.stderr)
        return 2
    mdir, netns, primary, cmd = Path(argv[0]), argv[1], argv[2], argv[4:]
    nspawn_pid_file = mdir / "nspawn.pid"
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)  # nspawn: orderly shutdown via --kill-signal

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    rc = 0
    while not stopping:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        nspawn_pid_file.write_text(f"{child.pid}\n")
        if stopping:  # SIGTERM arrived while we were starting it
            child.send_signal(signal.SIGTERM)
        _say(f"started nspawn pid {child.pid}")
        rc = child.wait()
        _say(f"nspawn exited with {rc}")
        if rc != REBOOT_EXIT or stopping:
            break
        # A real reboot loses runtime addresses (e.g. a keepalived VIP), routes and firewall rules: do the same.
        from lab.net import flush_runtime_state  # local import: keep startup cheap
        removed = flush_runtime_state(netns, primary)
        if removed:
            _say(f"reboot: removed {removed}")
        _say("reboot requested (exit 133): restarting")
        time.sleep(0.2)
    try:
        nspawn_pid_file.unlink()
    except FileNotFoundError:
        pass
    (mdir / "last-exit").write_text(f"{rc}\n")
    sup = mdir / "supervisor.pid"
    try:
        if sup.read_text().strip() == str(os.getpid()):
            sup.unlink()
    except FileNotFoundError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

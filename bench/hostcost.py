"""What a lab server spends of the machine's CPU: per SSH connection, per no-change run, and idle.

    .venv/bin/python bench/hostcost.py [--hosts spare1,spare2] [--connections 60] [--runs 10] [--idle 30]

Needs the converged lab (make demo). The lab's machines share this machine's kernel, so their
processes are visible here: a machine's CPU is read from its own processes (``utime + stime +
cutime + cstime`` in ``/proc/<pid>/stat`` of every process in the machine's PID namespace, the sum
after less the sum before; a short-lived process, such as a login's ``sshd-session`` and everything
it started, is counted in the parent that reaped it). Measures, per host:

- an SSH connection as pyinfra makes one (paramiko, the lab key, user ops) running ``true``, then
  ``sudo -H -n sh -c true``: the server's CPU per connection, by process (sshd, systemd, logind...);
- a no-change ``deploys/site.py --limit <host>`` (its one prefetch command under sudo): the
  server's CPU per run;
- with ``--idle S``: every lab machine's CPU per second over S seconds with nothing run, and the
  machines' processes by name.

Writes bench/results/hostcost-<utc>.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import paramiko

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from lab.probe import MACHINES  # noqa: E402

KEY = Path("/var/lib/webstack-lab/ssh/id_ed25519")
HZ = os.sysconf("SC_CLK_TCK")


def namespaces() -> dict[str, str]:
    """PID namespace -> lab machine name (from each systemd-nspawn's child, the machine's init)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            if Path(args[0]).name != "systemd-nspawn":
                continue
            name = next(a[len("--machine="):] for a in args if a.startswith("--machine="))
            for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                found[os.readlink(f"/proc/{child}/ns/pid")] = name
        except (OSError, StopIteration):
            continue
    return found


def snapshot() -> dict[tuple[int, int], tuple[str, str, int]]:
    """(pid, start time) -> (PID namespace, process name, CPU ticks including reaped children)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ns = os.readlink(f"/proc/{pid}/ns/pid")
            stat = Path(f"/proc/{pid}/stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            out[(int(pid), int(fields[19]))] = (ns, name, sum(int(x) for x in fields[11:15]))
        except (OSError, ValueError, IndexError):
            continue
    return out


def spent(before: dict, after: dict, ns: str | None) -> dict[str, float]:
    """CPU seconds between two snapshots by process name in namespace ``ns`` (None: by namespace,
    every one): the sum after less the sum before. A process that ended in between hands its whole
    life's CPU to the parent that reaped it, so what it had used before is taken off; one that started
    in between counts from zero."""
    by: dict[str, float] = {}
    for sign, snap in ((1, after), (-1, before)):
        for space, name, ticks in snap.values():
            if ns is None or space == ns:
                key = space if ns is None else name
                by[key] = by.get(key, 0.0) + sign * ticks / HZ
    return by


def connect(address: str, command: str) -> None:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(address, username="ops", key_filename=str(KEY), allow_agent=False, look_for_keys=False)
    try:
        _, out, _ = client.exec_command(command)
        out.read()
        if out.channel.recv_exit_status() != 0:
            sys.exit(f"{address}: {command!r} failed")
    finally:
        client.close()


def measure(ns: str, times: int, action) -> dict:
    action()  # warm: the user's manager, caches
    time.sleep(1)
    before = snapshot()
    for _ in range(times):
        action()
    time.sleep(1.5)  # reaped and accounted
    by = spent(before, snapshot(), ns)
    total = sum(by.values())
    top = {k: round(v / times * 1000, 1) for k, v in sorted(by.items(), key=lambda x: -x[1]) if v / times >= 0.0005}
    return {"ms": round(total / times * 1000, 1), "by_process_ms": top}


def host_row(name: str, machine: dict, ns: str, args: argparse.Namespace) -> dict:
    address = machine["address"]
    pyinfra = [str(ROOT / ".venv/bin/pyinfra"), "-y", "inventories/lab.py", "deploys/site.py", "--limit", name]

    def site() -> None:
        done = subprocess.run(pyinfra, cwd=ROOT, capture_output=True, text=True)
        output = done.stdout + done.stderr  # pyinfra prints to stderr
        total = next((line for line in output.splitlines() if "Grand total" in line), "")
        if done.returncode or total.split()[3:4] != ["-"]:
            sys.exit(f"the no-change run failed or changed something:\n{output[-3000:]}")

    return {"release": machine["release"],
            "connection_true": measure(ns, args.connections, lambda: connect(address, "true")),
            "connection_sudo_true": measure(ns, args.connections, lambda: connect(address, "sudo -H -n sh -c true")),
            "no_change_run": measure(ns, args.runs, site)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", default="spare1,spare2", help="lab hosts to measure (comma-separated)")
    parser.add_argument("--connections", type=int, default=60)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--idle", type=float, default=0, help="seconds of idle measurement of every machine")
    args = parser.parse_args()
    spaces = {name: ns for ns, name in namespaces().items()}
    result: dict = {"hosts": {}}
    for name in args.hosts.split(","):
        if name not in spaces or name not in MACHINES:
            sys.exit(f"{name} is not a running lab machine (make demo)")
        row = host_row(name, MACHINES[name], spaces[name], args)
        result["hosts"][name] = row
        print(f"{name} ({row['release']}): connection + true {row['connection_true']['ms']} ms, "
              f"+ sudo {row['connection_sudo_true']['ms']} ms, a no-change site run {row['no_change_run']['ms']} ms "
              f"of the server's CPU")
        for what in ("connection_sudo_true", "no_change_run"):
            print(f"  {what}: " + ", ".join(f"{k} {v}" for k, v in row[what]["by_process_ms"].items()))
    if args.idle:
        names = namespaces()
        before = snapshot()
        time.sleep(args.idle)
        after = snapshot()
        idle: dict[str, float] = {}
        for ns, v in spent(before, after, None).items():
            label = names.get(ns, "(this machine)" if ns == os.readlink("/proc/self/ns/pid") else ns)
            idle[label] = idle.get(label, 0.0) + v / args.idle * 1000
        idle = {k: round(v, 1) for k, v in sorted(idle.items(), key=lambda x: -x[1])}
        processes: dict[str, float] = {}
        for ns in names:
            for name, v in spent(before, after, ns).items():
                processes[name] = processes.get(name, 0.0) + v / args.idle * 1000
        top = {k: round(v, 1) for k, v in sorted(processes.items(), key=lambda x: -x[1])[:12]}
        result["idle_ms_per_s"], result["idle_ms_per_s_by_process"] = idle, top
        print("idle, ms of CPU per second: " + ", ".join(f"{k} {v}" for k, v in idle.items()))
        print("  by process, all machines: " + ", ".join(f"{k} {v}" for k, v in top.items()))
    out = report.write("hostcost", result)
    print(f"written: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

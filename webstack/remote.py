"""Commands across servers from the control machine: ``webstack logs`` and ``webstack exec``.

    webstack logs inventories/<env> <host-or-group> [--unit U] [--since T] [-n N] [-f]
    webstack exec inventories/<env> <host> -- CMD [ARG...]

Both reach the servers the way pyinfra does (the inventory's SSH user, key,
known hosts and each host's ``base__ssh_port``), with the OpenSSH client, and
run their command under sudo.

``logs`` merges the journals of a unit on every host of the target, each line
prefixed with its host: without ``-f`` the last ``N`` lines of each (or those
since ``--since``), merged in time order; with ``-f`` every new line as it comes,
from all hosts at once. The unit defaults to the application (``app__name``) on
application servers and its workers (``<app>-worker@*``) on worker hosts.

``exec`` runs a command as the application's user, in its current release, with
its environment file, through ``systemd-run`` on the host: the secrets in the
environment never appear in a command line or in this command's output (unless the
command prints them). Interactive (a terminal, e.g. ``python3`` for a console) when
this command's input is one.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from webstack.errors import ConfigError


@dataclass(frozen=True)
class Target:
    name: str
    address: str
    port: int
    user: str
    key: str
    known_hosts: str
    app: str  # the application this host runs or works for ("" if none)
    roles: tuple[str, ...]


def targets(inv: Path, wanted: str) -> list[Target]:
    """The hosts of ``wanted`` (a host, role or group name); refused, with the names that exist, otherwise."""
    from webstack.catalog import discover
    from webstack.inventory import _hosts, load

    catalog = discover()

    configs = load(inv)
    ssh, _ = _hosts(inv)
    names = {c.name for c in configs}
    groups = sorted({g for c in configs for g in (*c.roles, *c.groups)})
    chosen = [c for c in configs if wanted in ("all", c.name, *c.roles, *c.groups)]
    if not chosen:
        raise ConfigError(str(inv / "hosts.yml"), wanted,
                          f"no such host or group (hosts: {', '.join(sorted(names))}; groups: {', '.join(groups)})")
    out = []
    for c in chosen:
        out.append(Target(c.name, c.address, catalog.ssh_port(c), str(ssh.get("user", "root")),
                          str(ssh.get("key", "")), str(ssh.get("known_hosts", "")),
                          catalog.app_name(c), c.roles))
    return out


def ssh_argv(t: Target, command: str, tty: bool = False) -> list[str]:
    argv = ["ssh", "-q", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", str(t.port)]
    if t.key:
        argv += ["-i", t.key, "-o", "IdentitiesOnly=yes"]
    if t.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={t.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
    argv += ["-t"] if tty else ["-T"]
    sudo = "" if t.user == "root" else "sudo -n "
    return [*argv, f"{t.user}@{t.address}", sudo + command]


def journal_command(t: Target, unit: str, since: str, lines: int, follow: bool) -> str:
    units = [unit] if unit else ([t.app] if "app" in t.roles else []) + (
        [f"{t.app}-worker@*"] if "worker" in t.roles else [])
    if not units:
        raise ConfigError(t.name, "--unit", "this host runs no application: name the unit with --unit")
    args = ["journalctl", "--no-pager", "-q", "-o", "short-iso-precise"]
    args += [x for u in units for x in ("-u", u)]
    args += ["--since", since] if since else ["-n", str(lines)]
    args += ["-f"] if follow else []
    return shlex.join(args)


def logs(inv: Path, wanted: str, unit: str = "", since: str = "", lines: int = 50, follow: bool = False) -> int:
    chosen = targets(inv, wanted)
    width = max(len(t.name) for t in chosen)
    procs = [(t, subprocess.Popen(ssh_argv(t, journal_command(t, unit, since, lines, follow)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1))
             for t in chosen]
    lock = threading.Lock()
    collected: list[tuple[str, str]] = []

    def pump(t: Target, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if follow:
                with lock:
                    print(f"{t.name:<{width}} | {line}", flush=True)
            else:
                collected.append((line, t.name))

    threads = [threading.Thread(target=pump, args=(t, p), daemon=True) for t, p in procs]
    for th in threads:
        th.start()
    failed = 0
    try:
        for (t, proc), th in zip(procs, threads, strict=True):
            proc.wait()
            th.join()
            if proc.returncode != 0:
                failed += 1
                err = proc.stderr.read().strip() if proc.stderr else ""
                print(f"webstack: {t.name}: journalctl failed ({proc.returncode}) {err[-300:]}", file=sys.stderr)
    except KeyboardInterrupt:
        for _, proc in procs:
            proc.terminate()
        return 130
    # short-iso-precise starts with the time, so a sort merges the hosts in time order (all in UTC).
    for line, name in sorted(collected, key=lambda x: x[0][:26]):
        print(f"{name:<{width}} | {line}")
    return 1 if failed else 0


def exec_command(t: Target, command: list[str], tty: bool) -> str:
    if not t.app:
        raise ConfigError(t.name, "exec", "this host runs no application (roles: " + ", ".join(t.roles) + ")")
    a = t.app
    return shlex.join([
        "systemd-run", "--quiet", "--wait", "--collect", "--pty" if tty else "--pipe",
        "-p", f"User={a}", "-p", f"Group={a}", "-p", f"EnvironmentFile=/etc/webstack/{a}.env",
        "-p", f"WorkingDirectory=/srv/{a}/current", "-E", f"PYTHONPATH=/srv/{a}/current", "--", *command])


def run_exec(inv: Path, name: str, command: list[str]) -> int:
    chosen = targets(inv, name)
    if len(chosen) != 1 or chosen[0].name != name:
        raise ConfigError(str(inv / "hosts.yml"), name, "exec runs on one host: name a host, not a group")
    if not command:
        raise ConfigError(name, "exec", "no command given (webstack exec INVENTORY HOST -- CMD ...)")
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    return subprocess.call(ssh_argv(chosen[0], exec_command(chosen[0], command, tty), tty=tty))

"""Command line: python -m lab {up,down,destroy,status,ssh,exec,poweroff,start,stop,partition,heal}."""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from lab import machine as mach
from lab import net
from lab.config import Fleet, Machine, fleet_path, load_fleet
from lab.image import ensure_image
from lab.util import (
    KNOWN_HOSTS,
    REPO_ROOT,
    SSH_KEY,
    STATE_DIR,
    LabError,
    check_kernel_features,
    log,
    require_root,
    run,
    write_atomic,
)

INVENTORY = REPO_ROOT / "inventories" / "lab" / "hosts.yml"


@contextmanager
def lab_lock() -> Iterator[None]:
    """Serialise commands that change the lab (one at a time on this control machine)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another lab command is running; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _flow(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(items) + "]"


def render_inventory(fleet: Fleet) -> str:
    """inventories/lab/hosts.yml content for fleet."""
    try:
        src = fleet.path.relative_to(REPO_ROOT)
    except ValueError:
        src = fleet.path
    lines = [
        f"# Written by `python -m lab up` from {src}. Do not edit: edit {src}.",
        "ssh:",
        "  user: ops",
        f"  key: {SSH_KEY}",
        f"  known_hosts: {KNOWN_HOSTS}",
        "hosts:",
    ]
    for m in fleet.standing:
        lines.append(f"  {m.name}: {{address: {m.address}, release: {m.release}, "
                     f"roles: {_flow(m.roles)}, groups: {_flow(m.groups)}}}")
    return "\n".join(lines) + "\n"


def _wait_all(machines: list[Machine], timeout: float = 120.0) -> dict[str, tuple[float, str] | str]:
    """Wait for SSH on all machines concurrently; name -> (seconds, systemd state) or error text."""
    results: dict[str, tuple[float, str] | str] = {}

    def one(m: Machine) -> None:
        try:
            results[m.name] = mach.wait_ssh(m, timeout)
        except LabError as exc:
            results[m.name] = str(exc)

    with ThreadPoolExecutor(max_workers=max(1, len(machines))) as ex:
        list(ex.map(one, machines))
    return results


def _start_machines(fleet: Fleet, machines: list[Machine], mtu: int) -> dict[str, str]:
    """Make sure networking is in place and boot those not running; name -> action taken."""
    actions: dict[str, str] = {}
    for m in machines:
        running = mach.state(m.name) == "running"
        net.ensure_machine_net(fleet, m, mtu)
        if running:
            actions[m.name] = "already running"
            continue
        net.kill_netns_pids(m.name)  # orphans of a dead session must not share the disk
        removed = net.flush_extra_addrs(m.name, f"{m.address}/{fleet.prefixlen}")
        created = mach.ensure_root(fleet, m)
        mach.boot(fleet, m)
        actions[m.name] = "created+booted" if created else "booted"
        if removed:
            actions[m.name] += f" (flushed stale {', '.join(removed)})"
    return actions


def _report(fleet: Fleet, machines: list[Machine], actions: dict[str, str],
            waits: dict[str, tuple[float, str] | str]) -> bool:
    good = True
    for m in machines:
        w = waits.get(m.name)
        if isinstance(w, tuple):
            ready = f"ssh ok after {w[0]:.1f}s, {w[1]}"
        else:
            ready, good = "FAILED", False
        pid = mach.nspawn_pid(m.name) or "-"
        print(f"{m.name:<10} {m.address:<12} {m.release:<9} pid={pid!s:<8} "
              f"{actions.get(m.name, ''):<16} {ready}")
    for m in machines:
        w = waits.get(m.name)
        if not isinstance(w, tuple):
            print(f"\n{m.name}: {w}", file=sys.stderr)
    return good


def _boot(fleet: Fleet, machines: list) -> tuple:
    """Images, keys, bridge, then start the machines and wait for each (caller holds the lab lock)."""
    for release in sorted({m.release for m in machines}):
        ensure_image(release)
    mach.ensure_ssh_keypair()
    mtu = net.uplink_mtu()
    net.ensure_bridge(fleet, mtu)
    actions = _start_machines(fleet, machines, mtu)
    mach.write_known_hosts(fleet)
    return actions, _wait_all(machines)


def cmd_up(fleet: Fleet, args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    machines = fleet.select(args.names)
    check_kernel_features()
    with lab_lock():
        actions, waits = _boot(fleet, machines)
        for m in machines:
            mach.harvest_apt(m.name)
        changed = write_atomic(INVENTORY, render_inventory(fleet))
    good = _report(fleet, machines, actions, waits)
    print(f"inventory {INVENTORY.relative_to(REPO_ROOT)} {'written' if changed else 'unchanged'}")
    print(f"up: {len(machines)} machines in {time.monotonic() - t0:.1f}s")
    return 0 if good else 1


def cmd_down(fleet: Fleet, args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    with lab_lock():
        names = sorted({m.name for m in fleet.machines} | set(mach.lab_machine_names()))
        mach.stop_many(names)
        for name in names:
            n = mach.harvest_apt(name)
            if n:
                log(f"{name}: kept {n} downloaded .deb(s) in the shared apt pool")
            net.remove_machine_net(name)
            if mach.mdir(name).exists():
                mach.destroy(name)
        for veth in net.lab_veths():
            run(["ip", "link", "delete", veth], check=False)
        net.remove_bridge_and_tables(fleet)
        if KNOWN_HOSTS.exists():
            write_atomic(KNOWN_HOSTS, "")
    print(f"down: removed {len(names)} machines, bridge {fleet.bridge}, nft tables "
          f"in {time.monotonic() - t0:.1f}s (base images and apt pool kept)")
    return 0


def cmd_destroy(fleet: Fleet, args: argparse.Namespace) -> int:
    """Stop the named machines and remove their disks and links (`up` boots them fresh)."""
    with lab_lock():
        names = [m.name for m in fleet.select(args.names)]
        mach.stop_many(names)
        for name in names:
            mach.harvest_apt(name)
            net.remove_machine_net(name)
            if mach.mdir(name).exists():
                mach.destroy(name)
    print(f"destroyed: {' '.join(names)}")
    return 0


def cmd_status(fleet: Fleet, args: argparse.Namespace) -> int:
    for m in fleet.select(args.names):
        st = mach.state(m.name)
        if st == "running" and not net.link_is_up(m):
            st = "running(link down)"
        pid = mach.nspawn_pid(m.name)
        sup = mach.supervisor_pid(m.name)
        print(f"{m.name:<10} {st:<18} {m.address:<12} {m.release:<9} "
              f"pid={pid or '-'} supervisor={sup or '-'}")
    parts = net.partitions()
    if parts:
        print("partitions: " + ", ".join(f"{a}<->{b}" for a, b in parts))
    return 0


def cmd_ssh(fleet: Fleet, args: argparse.Namespace) -> int:
    m = fleet.get(args.name)
    user = mach.login_user(m)
    command = list(args.command)
    if user != "root" and command:
        # Onboarded: the admin user, with sudo around the whole remote command line.
        command = ["sudo", "-n", "sh", "-c", shlex.quote(" ".join(command))]
    argv = mach.ssh_base_argv(batch=args.cmd_name == "exec") + [f"{user}@{m.address}", *command]
    os.execvp(argv[0], argv)
    return 127  # not reached


def cmd_poweroff(fleet: Fleet, args: argparse.Namespace) -> int:
    with lab_lock():
        for m in fleet.select(args.names):
            # Kill first: with the link going down first, keepalived would see it and
            # drop its VIP cleanly, which a real power cut does not allow.
            mach.kill_hard(m.name)              # power cut: SIGKILL, no clean shutdown
            net.set_link(m, up=False)           # cable pulled: a VIP in its netns stops answering ARP
            removed = net.flush_extra_addrs(m.name, f"{m.address}/{fleet.prefixlen}")
            if mach.mdir(m.name).exists():
                (mach.mdir(m.name) / "powered-off").touch()
            extra = f" (removed {', '.join(removed)})" if removed else ""
            print(f"{m.name}: powered off, link down{extra}")
    return 0


def cmd_start(fleet: Fleet, args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    machines = fleet.select(args.names)
    check_kernel_features()
    with lab_lock():
        actions, waits = _boot(fleet, machines)
    good = _report(fleet, machines, actions, waits)
    print(f"start: {time.monotonic() - t0:.1f}s")
    return 0 if good else 1


def cmd_stop(fleet: Fleet, args: argparse.Namespace) -> int:
    with lab_lock():
        names = [m.name for m in fleet.select(args.names)]
        mach.stop_many(names)
    print(f"stopped: {' '.join(names)}")
    return 0


def cmd_partition(fleet: Fleet, args: argparse.Namespace) -> int:
    a = fleet.get(args.a)
    b = None if args.b == net.CONTROL else fleet.get(args.b)
    if b is not None and a.name == b.name:
        raise LabError("partition needs two different machines")
    with lab_lock():
        added = net.partition(a, b)
    print(f"partition {a.name} <-> {b.name if b else net.CONTROL}: {'added' if added else 'already present'}")
    return 0


def cmd_heal(fleet: Fleet, args: argparse.Namespace) -> int:
    with lab_lock():
        n = net.heal()
    print(f"heal: removed {n} partition(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    p.add_argument("--fleet", help="fleet file (default: $WEBSTACK_LAB_FLEET or lab/fleet.yml)")
    sub = p.add_subparsers(dest="cmd_name", required=True, metavar="COMMAND")
    commands = (  # name, how many machine names, help, function
        ("up", "*", "build images if needed, boot machines, wait for SSH, write inventory", cmd_up),
        ("down", None, "remove every machine, mount, netns, veth, bridge and nft table", cmd_down),
        ("destroy", "+", "stop machines and remove their disks (up boots them fresh)", cmd_destroy),
        ("status", "*", "one line per machine", cmd_status),
        ("poweroff", "+", "simulated power loss: SIGKILL + link down + drop extra addresses", cmd_poweroff),
        ("start", "+", "link up and boot a stopped/powered-off machine, wait for SSH", cmd_start),
        ("stop", "+", "clean shutdown of machines (disk kept)", cmd_stop),
    )
    for name, nargs, hlp, func in commands:
        s = sub.add_parser(name, help=hlp)
        if nargs:
            s.add_argument("names", nargs=nargs, metavar="NAME")
        s.set_defaults(func=func)
    for name, hlp in (("ssh", "ssh into a machine as root"),
                      ("exec", "run a command in a machine over ssh (non-interactive)")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("name", metavar="NAME")
        s.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD")
        s.set_defaults(func=cmd_ssh)
    s = sub.add_parser("partition", help="drop all traffic between two machines (B: a machine or 'control')")
    s.add_argument("a", metavar="A")
    s.add_argument("b", metavar="B")
    s.set_defaults(func=cmd_partition)
    s = sub.add_parser("heal", help="remove all partitions")
    s.set_defaults(func=cmd_heal)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        require_root()
        fleet = load_fleet(fleet_path(args.fleet))
        return int(args.func(fleet, args))
    except LabError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 0

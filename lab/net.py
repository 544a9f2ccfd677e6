"""Lab networking: bridge, NAT, per-machine netns + veth, partitions (nftables bridge table)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from lab.config import Fleet, Machine
from lab.util import LabError, ok, run

NAT_TABLE = "webstack_lab_nat"          # table ip webstack_lab_nat
PARTITION_TABLE = "webstack_lab"        # table bridge webstack_lab
NETNS_DIR = Path("/run/netns")


def uplink_mtu() -> int:
    """MTU of the interface carrying the default route (1500 if unknown)."""
    cp = run(["ip", "-j", "route", "show", "default"], check=False)
    try:
        dev = json.loads(cp.stdout or "[]")[0]["dev"]
        return int(Path(f"/sys/class/net/{dev}/mtu").read_text())
    except (IndexError, KeyError, ValueError, OSError):
        return 1500


def link_exists(name: str, netns: str | None = None) -> bool:
    """True if a link exists (on the host, or inside netns)."""
    argv = ["ip"] + (["-n", netns] if netns else []) + ["link", "show", "dev", name]
    return ok(argv)


def netns_exists(name: str) -> bool:
    """True if /run/netns/NAME exists and is a usable (mounted) namespace."""
    return ok(["ip", "netns", "exec", name, "true"]) if (NETNS_DIR / name).exists() else False


def ensure_bridge(fleet: Fleet, mtu: int) -> None:
    """Create/repair the bridge with the gateway address, enable forwarding and NAT."""
    br = fleet.bridge
    if not link_exists(br):
        run(["ip", "link", "add", br, "type", "bridge"])
    run(["ip", "link", "set", br, "mtu", str(mtu), "up"])
    cidr = f"{fleet.gateway}/{fleet.prefixlen}"
    addrs = json.loads(run(["ip", "-j", "addr", "show", "dev", br]).stdout or "[]")
    have = {f"{a['local']}/{a['prefixlen']}" for i in addrs for a in i.get("addr_info", [])
            if a.get("family") == "inet"}
    if cidr not in have:
        run(["ip", "addr", "add", cidr, "dev", br])
    fwd = Path("/proc/sys/net/ipv4/ip_forward")
    if fwd.read_text().strip() != "1":
        fwd.write_text("1\n")
    ensure_nat(fleet)


def ensure_nat(fleet: Fleet) -> None:
    """Masquerade the lab subnet going out of anything but the bridge (idempotent)."""
    if ok(["nft", "list", "table", "ip", NAT_TABLE]):
        return
    sub = str(fleet.subnet)
    ruleset = (
        f"table ip {NAT_TABLE} {{\n"
        f"  chain postrouting {{\n"
        f"    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    ip saddr {sub} ip daddr != {sub} oifname != \"{fleet.bridge}\" masquerade\n"
        f"  }}\n"
        f"}}\n"
    )
    run(["nft", "-f", "-"], input=ruleset)


def ensure_machine_net(fleet: Fleet, m: Machine, mtu: int) -> None:
    """Create/repair netns NAME with host0 (address, default route) and vw-NAME on the bridge, link up."""
    if not netns_exists(m.name):
        if (NETNS_DIR / m.name).exists():  # stale file without a namespace behind it
            run(["ip", "netns", "delete", m.name], check=False)
        run(["ip", "netns", "add", m.name])
    if not link_exists("host0", m.name):
        if link_exists(m.veth):
            run(["ip", "link", "delete", m.veth])
        run(["ip", "link", "add", m.veth, "mtu", str(mtu), "type", "veth",
             "peer", "name", "host0", "mtu", str(mtu), "netns", m.name])
    elif not link_exists(m.veth):
        # host0 exists but its peer is not our vw-NAME: recreate the pair.
        run(["ip", "-n", m.name, "link", "delete", "host0"])
        run(["ip", "link", "add", m.veth, "mtu", str(mtu), "type", "veth",
             "peer", "name", "host0", "mtu", str(mtu), "netns", m.name])
    run(["ip", "link", "set", m.veth, "master", fleet.bridge, "mtu", str(mtu), "up"])
    run(["ip", "-n", m.name, "link", "set", "lo", "up"])
    run(["ip", "-n", m.name, "link", "set", "host0", "mtu", str(mtu), "up"])
    cidr = f"{m.address}/{fleet.prefixlen}"
    if cidr not in machine_addrs(m.name):
        run(["ip", "-n", m.name, "addr", "add", cidr, "dev", "host0"])
    run(["ip", "-n", m.name, "route", "replace", "default", "via", fleet.gateway, "dev", "host0"])


def machine_addrs(netns: str) -> list[str]:
    """IPv4/global IPv6 addresses (CIDR) on host0 inside netns."""
    cp = run(["ip", "-j", "-n", netns, "addr", "show", "dev", "host0"], check=False)
    out = []
    for iface in json.loads(cp.stdout or "[]") if cp.returncode == 0 else []:
        for a in iface.get("addr_info", []):
            if a.get("family") == "inet" or (a.get("family") == "inet6" and a.get("scope") == "global"):
                out.append(f"{a['local']}/{a['prefixlen']}")
    return out


def flush_extra_addrs(netns: str, primary: str) -> list[str]:
    """Delete every address on host0 except primary (CIDR); return what was removed."""
    removed = []
    for cidr in machine_addrs(netns):
        if cidr != primary:
            run(["ip", "-n", netns, "addr", "del", cidr, "dev", "host0"], check=False)
            removed.append(cidr)
    return removed


def flush_runtime_state(netns: str, primary: str) -> list[str]:
    """What a real reboot loses and the machine's network namespace (kept across the lab's reboots)
    would not: addresses added at run time (a keepalived VIP), routes added at run time in the
    local table (a VIP's drain on lo), and the nftables ruleset (the boot loads it again).
    Returns what was removed."""
    removed = flush_extra_addrs(netns, primary)
    out = run(["ip", "-n", netns, "route", "show", "table", "local", "dev", "lo"], check=False).stdout
    for line in out.splitlines():
        if line.startswith("local ") and "proto kernel" not in line:
            target = line.split()[1]
            run(["ip", "-n", netns, "route", "del", "local", target, "dev", "lo", "table", "local"], check=False)
            removed.append(f"route local {target} dev lo")
    run(["ip", "netns", "exec", netns, "nft", "flush", "ruleset"], check=False)
    return removed


def set_link(m: Machine, up: bool) -> None:
    """Set the host-side veth of m up or down (down = cable pulled)."""
    if link_exists(m.veth):
        run(["ip", "link", "set", m.veth, "up" if up else "down"])


def link_is_up(m: Machine) -> bool:
    """True if the host-side veth is administratively up."""
    try:
        flags = int(Path(f"/sys/class/net/{m.veth}/flags").read_text(), 16)
    except (OSError, ValueError):
        return False
    return bool(flags & 0x1)


def netns_pids(netns: str) -> list[int]:
    """Pids of all processes living in netns (i.e. the machine's processes)."""
    if not (NETNS_DIR / netns).exists():
        return []
    cp = run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in cp.stdout.split()] if cp.returncode == 0 else []


def kill_netns_pids(netns: str, timeout: float = 5.0) -> None:
    """SIGKILL every process in netns and wait until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in netns_pids(netns) if p != os.getpid()]
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise LabError(f"processes in netns {netns} survive SIGKILL: {pids}")
        time.sleep(0.1)


def remove_machine_net(name: str) -> None:
    """Kill leftovers in netns NAME, delete it and the host veth (works if half gone)."""
    kill_netns_pids(name)
    if (NETNS_DIR / name).exists():
        run(["ip", "netns", "delete", name], check=False)
    veth = f"vw-{name}"
    if link_exists(veth):
        run(["ip", "link", "delete", veth], check=False)


def lab_veths() -> list[str]:
    """Host links named vw-* (ours)."""
    return sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith("vw-"))


def remove_bridge_and_tables(fleet: Fleet) -> None:
    """Delete the bridge and both nft tables (missing ones are fine)."""
    if link_exists(fleet.bridge):
        run(["ip", "link", "delete", fleet.bridge], check=False)
    run(["nft", "delete", "table", "ip", NAT_TABLE], check=False)
    run(["nft", "delete", "table", "bridge", PARTITION_TABLE], check=False)


# --- partitions -----------------------------------------------------------------------

def _partition_comment(a: str, b: str) -> str:
    return f"partition {a} {b}"


def partitions() -> list[tuple[str, str]]:
    """Current partitions as (a, b) pairs with a < b."""
    cp = run(["nft", "-j", "list", "table", "bridge", PARTITION_TABLE], check=False)
    if cp.returncode != 0:
        return []
    pairs = set()
    for item in json.loads(cp.stdout).get("nftables", []):
        rule = item.get("rule")
        if rule and str(rule.get("comment", "")).startswith("partition "):
            _, a, b = rule["comment"].split()
            pairs.add(tuple(sorted((a, b))))
    return sorted(pairs)  # type: ignore[arg-type]


CONTROL = "control"  # the control machine (the bridge's own address), as a partition end


def partition(a: Machine, b: Machine | None) -> bool:
    """Drop all frames between a and b, both directions; b None: between a and the control
    machine (so SSH from here fails too). False if already partitioned."""
    key = tuple(sorted((a.name, b.name if b else CONTROL)))
    if key in partitions():
        return False
    note = _partition_comment(*key)
    if b is None:
        # The control machine's own traffic enters and leaves the bridge through its input and output hooks.
        chains = (f"  chain input {{\n    type filter hook input priority 0; policy accept;\n"
                  f"    iifname \"{a.veth}\" drop comment \"{note}\"\n  }}\n"
                  f"  chain output {{\n    type filter hook output priority 0; policy accept;\n"
                  f"    oifname \"{a.veth}\" drop comment \"{note}\"\n  }}\n")
    else:
        chains = (f"  chain forward {{\n    type filter hook forward priority 0; policy accept;\n"
                  f"    iifname \"{a.veth}\" oifname \"{b.veth}\" drop comment \"{note}\"\n"
                  f"    iifname \"{b.veth}\" oifname \"{a.veth}\" drop comment \"{note}\"\n  }}\n")
    run(["nft", "-f", "-"], input=f"table bridge {PARTITION_TABLE} {{\n{chains}}}\n")
    return True


def heal() -> int:
    """Remove all partitions; return how many there were."""
    n = len(partitions())
    run(["nft", "delete", "table", "bridge", PARTITION_TABLE], check=False)
    return n

"""The monthly patch run: every host of the run, tier by tier, one at a time, under live traffic.

    pyinfra inventories/<env>.py deploys/patch.py [--limit ...] [--data from=HOST] [--data switch_back=no] [--dry]

Order (``Topology.in_tier_order``): load balancers (the one not holding the VIP
first; the holder's keepalived is stopped so the VIP moves before it is
touched), application servers (drained from every load balancer, put back
after their health check), workers (their units stopped, which lets each
process finish its current job; scheduled jobs run on the other worker hosts),
database clusters (each replica; then a switchover to the first replica, the
old primary as a standby, and a switchover back unless ``switch_back=no``),
backup hosts and the rest.

On each host: ``apt-get update`` (while the plan is made, so ``--dry`` lists the
real pending upgrades), ``apt-get dist-upgrade`` (pyinfra's ``apt.dist_upgrade``),
then the reboot decision: an upgraded kernel, libc, OpenSSL or systemd package,
``/run/reboot-required``, or needrestart's kernel status. Without a reboot,
``needrestart -r a`` restarts the daemons still using replaced libraries (the
base role keeps needrestart to listing during unattended upgrades). Then the
host's health checks (its roles': nginx answers, the application serves its
release, workers run, PostgreSQL streams or takes writes) for up to 180 s.

The first host that fails (upgrade, reboot, health) stops the run: it stays out
of rotation (drained, keepalived stopped, workers stopped), every later
operation of every host is skipped (``_if``), and the error names the command
that resumes the run from that host. Each host keeps its report in
/var/lib/webstack/last-patch.json; the run prints a table and writes them all as
JSON (``--data report=FILE``, default ``patch-report.json``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pyinfra import host, inventory, logger, state
from pyinfra.api import FactBase, OperationError, deploy
from pyinfra.api.host import Host
from pyinfra.operations import apt, python, server, systemd

from roles._lib import barrier, config, options, owed_action, peer_fact, root_shell
from roles.app.settings import AppSettings
from roles.base.deploy import codename
from roles.lb.deploy import VIP_DRAIN_TABLE, VIP_DRAIN_UNIT, nginx_site
from roles.lb.settings import LbSettings
from roles.options import PatchOptions
from roles.postgres import orchestrate
from roles.postgres._release import VERSION, paths
from roles.postgres.deploy import guard
from roles.postgres.settings import PostgresSettings
from roles.topology import topology
from roles.worker import deploy as worker
from roles.worker.settings import WorkerSettings
from webstack.inventory import HostConfig

REPORT_ON_HOST = "/var/lib/webstack/last-patch.json"
# Upgrading one of these means the running system still uses the old code until a reboot.
REBOOT_PACKAGES = re.compile(r"^(linux-image-.*|libc6|libc-bin|libssl\d.*|openssl|systemd|libsystemd\d.*|dbus)$")
_INST = re.compile(r"^Inst (\S+) (?:\[(\S+)\] )?\((\S+)")


class PendingUpgrades(FactBase):
    """Packages ``apt-get dist-upgrade`` would upgrade or install: [{package, from, to}].

    Refreshes the package lists first (``apt-get update``, tried again for a minute: it fails at
    once while apt-daily.service refreshes them), so the answer is today's.
    """

    default = list

    def command(self) -> str:
        return ("for i in 1 2 3 4 5 6 7; do apt-get -qq update >/dev/null 2>&1 && break; "
                "[ $i = 7 ] && { echo 'E: apt-get update failed'; break; }; sleep 10; done; "
                "LC_ALL=C apt-get -s -o Debug::NoLocking=1 dist-upgrade")

    def process(self, output: Sequence[str]) -> list[dict[str, str]]:
        out = []
        for line in output:
            found = _INST.match(line)
            if found:
                out.append({"package": found.group(1), "from": found.group(2) or "", "to": found.group(3)})
        return out


class VipHeld(FactBase):
    """Whether this host holds ``vip`` now."""

    def command(self, vip: str) -> str:
        return f"ip -o addr show to {vip} | grep -q . && echo yes || echo no"

    def process(self, output: Sequence[str]) -> bool:
        return "".join(output).strip() == "yes"


@dataclass(frozen=True)
class Step:
    """One host of the patch run and what surrounds its patching."""

    host: str
    tier: str
    holds_vip: bool = False  # a load balancer holding its pair's VIP: keepalived stops first
    vip: str = ""  # a load balancer's pair VIP (the peers wait until they can take it)
    drain: bool = False  # an application server with another one to take its requests
    primary_of: str = ""  # a cluster's primary: switchover to ``switch_to`` first
    switch_to: str = ""


@dataclass
class Report:
    """What happened on one host (the table and JSON of the run)."""

    host: str
    tier: str
    upgraded: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    rebooted: bool = False
    reboot_reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    health: str = "not run"
    finished: str = ""


# Control machine memory shared by every host's operations (one process, one run).
_REPORTS: dict[str, Report] = {}
_STARTED: dict[str, float] = {}
_PRINTED: list[str] = []


def reboot_reasons(upgraded: Sequence[str], needrestart: str = "", required: bool = False) -> list[str]:
    """Why a host needs a reboot after its upgrade (empty: it does not)."""
    reasons = [f"{name} upgraded" for name in upgraded if REBOOT_PACKAGES.match(name)]
    kernel = re.search(r"^NEEDRESTART-KSTA: (\d)", needrestart, re.M)
    if kernel and int(kernel.group(1)) > 1:
        reasons.append("needrestart: the running kernel is not the newest installed")
    if required:
        reasons.append("/run/reboot-required")
    return reasons


def restart_candidates(needrestart: str) -> list[str]:
    """Services needrestart's batch output (``-b``) lists as using replaced libraries."""
    return sorted(set(re.findall(r"^NEEDRESTART-SVC: (\S+)", needrestart, re.M)))


def worker_units(cfg: HostConfig) -> list[str]:
    """The worker units of a worker host."""
    name = worker.app_settings(cfg).name
    return [f"{name}-worker@{i}.service" for i in range(1, cfg.settings(WorkerSettings).processes + 1)]


def vrrp_ready(within: int) -> str:
    """A shell check: keepalived runs here and its instance has left INIT/FAULT for BACKUP or MASTER,
    i.e. it can take the VIP at once (keepalived's own journal lines since the unit's last start);
    tried every 0.5 s for up to ``within`` seconds."""
    last = ("journalctl -b -q -o cat -u keepalived | grep -E "
            "'Starting Keepalived|Stopping|Entering [A-Z]+ STATE|VRRP_Script\\(.*\\) failed' | tail -n 1")
    return (f"for i in $(seq {within * 2}); do systemctl is-active -q keepalived && "
            f"{last} | grep -qE 'Entering (BACKUP|MASTER) STATE' && exit 0; sleep 0.5; done; exit 1")


PRE_DRAIN_S = 3  # at most, for the VIP's open connections to finish before the VIP moves


def pre_drain(vip: str) -> str:
    """A shell step on the VIP holder before a planned move: new connections to the VIP are dropped
    (lb-notify's drain table, taken over by the drain when keepalived stops; removed after 60 s by a
    timer should the move not follow), then up to ``PRE_DRAIN_S`` s for the connections open on the
    VIP to finish. A request whose packets are still on their way when the peer announces the VIP
    is lost (one sign-up in a lab patch run: started 13 ms before keepalived stopped, on a busy
    machine, not done 0.15 s later); a new one waits for its SYN to be sent again, to the new
    holder."""
    table, unit = VIP_DRAIN_TABLE, VIP_DRAIN_UNIT
    return (f"nft add table {table} && "
            f"nft add chain {table} input '{{ type filter hook input priority filter - 1; policy accept; }}' && "
            f"nft flush chain {table} input && nft add rule {table} input ip daddr {vip} ct state new drop && "
            f"{{ systemctl stop --no-block {unit}.timer 2>/dev/null; "
            f"systemd-run --quiet --no-block --collect --unit {unit} --on-active=60 "
            f"nft delete table {table} || true; }}; "
            f"for i in $(seq {PRE_DRAIN_S * 10}); do ss -Htn state established src {vip} | grep -q . || exit 0; "
            "sleep 0.1; done; exit 0")


def health_commands(cfg: HostConfig, version: str = "", vrrp: bool = False) -> list[tuple[str, str]]:
    """(what, shell check) for the host's roles, all to pass within the run's ``health_timeout``
    (``vrrp``: a load balancer of a VIP pair whose keepalived runs during the check)."""
    checks = [("systemd running", "systemctl is-system-running --wait >/dev/null; "
                                  "s=$(systemctl is-system-running); [ \"$s\" = running ] || [ \"$s\" = degraded ]")]
    if "lb" in cfg.roles:
        checks.append(("nginx answers", "systemctl is-active -q nginx && "
                                        "curl -fsk -o /dev/null https://127.0.0.1/lb-health"))
        if vrrp:  # a backup in FAULT (its rise count) cannot take the VIP when the holder stops next
            checks.append(("keepalived can take the VIP", vrrp_ready(1)))
    if "app" in cfg.roles:
        app = cfg.settings(AppSettings)
        checks.append((f"{app.name} serves its release", (
            "python3 -c \"import os, sys, urllib.request as u; "
            f"r = u.urlopen('http://127.0.0.1:{app.port}{app.health_path}', timeout=5); "
            f"sys.exit(0 if r.headers.get('X-Release') == os.path.basename(os.path.realpath('/srv/{app.name}/current')) "
            "else 1)\"")))
    if "worker" in cfg.roles:
        checks.append(("workers running", f"systemctl is-active -q {' '.join(worker_units(cfg))}"))
    if "postgres" in cfg.roles and version:
        p = paths(version)
        q = "runuser -u postgres -- psql -XAtc"
        checks.append(("PostgreSQL streams or takes writes", (
            f"systemctl is-active -q {p.service} && "
            f"if [ \"$({q} 'select pg_is_in_recovery()')\" = t ]; then "
            f"[ \"$({q} 'select status from pg_stat_wal_receiver')\" = streaming ]; "
            f"else [ \"$({q} 'select not pg_is_in_recovery()')\" = t ]; fi")))
    if "mailprovider" in cfg.roles:
        checks.append(("postfix and dovecot", "systemctl is-active -q postfix dovecot"))
    return checks


def plan(cfg: HostConfig, start_from: str = "") -> list[Step]:
    """The steps of the run, the same on every host: hosts of the run in tier order, load balancers
    holding a VIP last in their tier, each cluster's replicas before its primary. Refuses (on every
    host, before anything is touched) when a cluster's live primary is not the inventory's."""
    top = topology(cfg)
    active = {h.name for h in state.active_hosts} if state.active_hosts else {h.name for h in inventory}
    hosts = [p for p in top.in_tier_order() if p.name in active]
    steps: list[Step] = []
    app_servers = [p for p in top.app_servers() if p.name in active]
    for peer in hosts:
        tier = next((t for t in ("lb", "app", "worker", "postgres", "backup") if peer.is_in(t)), "other")
        holds, vip = False, peer.settings(LbSettings).vip if tier == "lb" else ""
        if vip:
            holds = bool(peer_fact(peer.name, VipHeld, vip=vip))
        primary_of = switch_to = ""
        if tier == "postgres":
            pg = peer.settings(PostgresSettings)
            if pg.primary == peer.name:
                replicas = [m.name for m in top.cluster_of(peer.name) if m.name != peer.name and m.name in active]
                primary_of, switch_to = pg.cluster, (replicas[0] if replicas else "")
        steps.append(Step(peer.name, tier, holds_vip=holds, vip=vip, drain=tier == "app" and len(app_servers) > 1,
                          primary_of=primary_of, switch_to=switch_to))
    # Load balancers: the VIP holders last; databases: each cluster's primary after its replicas.
    steps.sort(key=lambda s: (("lb", "app", "worker", "postgres", "backup", "other").index(s.tier),
                              s.holds_vip, bool(s.primary_of)))
    names = [s.host for s in steps]
    if start_from:
        if start_from not in names:
            raise OperationError(f"patch: --data from={start_from}: not a host of this run ({', '.join(names)})")
        steps = steps[names.index(start_from):]
    return steps


def _stopped(steps: Sequence[Step]) -> bool:
    """Whether a host of the plan failed (the run touches nothing further)."""
    names = {s.host for s in steps}
    return any(h.name in names for h in state.failed_hosts)


def _sh(target: Host, command: str, timeout: int = 600) -> str:
    ok, out = root_shell(target, command, timeout)
    if not ok:
        raise OperationError(f"{target.name}: `{command[:80]}` failed: {out.stderr.strip()[-500:]}")
    return str(out.stdout)


def _reboot(target: Host, timeout_s: int = 600) -> None:
    """Reboot and wait until SSH answers from the new boot.

    Hand-written rather than ``server.reboot``: that compares uptimes, and a
    container (the lab) shows its host's uptime; the boot id changes on every boot.
    """
    boot_id = _sh(target, "cat /proc/sys/kernel/random/boot_id").strip()
    root_shell(target, "( sleep 1 && systemctl reboot ) </dev/null >/dev/null 2>&1 &", 30)
    time.sleep(3)
    target.disconnect()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(1)
        try:  # the old boot may still answer, and drop the session while shutting down
            target.connect(show_errors=False)
            if target.connected:
                ok, out = root_shell(target, "cat /proc/sys/kernel/random/boot_id", 30)
                if ok and out.stdout.strip() and out.stdout.strip() != boot_id:
                    return
        except Exception as exc:  # noqa: BLE001 - any SSH error here means: not back yet
            logger.info(f"{target.name}: not back yet ({type(exc).__name__}: {exc})")
        target.disconnect()
    raise OperationError(f"{target.name}: did not come back within {timeout_s} s of the reboot")


def _wait_healthy(target: Host, checks: Sequence[tuple[str, str]], timeout_s: int) -> None:
    deadline = time.monotonic() + timeout_s
    for what, command in checks:
        while True:
            ok, out = root_shell(target, command, 60)
            if ok:
                break
            if time.monotonic() > deadline:
                raise OperationError(f"{target.name}: unhealthy after patching: {what} "
                                     f"(`{command[:100]}`) still fails after {timeout_s} s")
            time.sleep(2)


def _finish(cfg: HostConfig, step: Step, version: str, upgraded: list[str], health_timeout: int,
            always: bool) -> Callable[[], None]:
    """The callback after the upgrade: reboot or restart, health, report."""

    def run() -> None:
        target = inventory.get_host(cfg.name)
        report = _REPORTS.setdefault(cfg.name, Report(cfg.name, step.tier))
        report.upgraded = upgraded
        try:
            nr = _sh(target, "needrestart -b -r l 2>/dev/null || true")
            required = _sh(target, "test -e /run/reboot-required && echo yes || true").strip() == "yes"
            report.reboot_reasons = reboot_reasons(upgraded, nr, required) + (["always_reboot"] if always else [])
            if report.reboot_reasons:
                _reboot(target)
                report.rebooted = True
            else:
                services = restart_candidates(nr)
                if services:
                    _sh(target, "needrestart -b -r a >/dev/null")
                    report.restarted = services
            if step.tier == "worker":  # stopped before the upgrade; a reboot started them already
                _sh(target, f"systemctl start {' '.join(worker_units(cfg))}")
            vrrp = bool(step.vip) and not step.holds_vip  # the holder's keepalived starts after the check
            _wait_healthy(target, health_commands(cfg, version, vrrp), health_timeout)
            report.health = "ok"
        except Exception as exc:
            report.health = f"failed: {exc}"
            raise OperationError(
                f"{exc}\n    The patch run stopped at {cfg.name}, which stays out of rotation; no later host was "
                f"touched. Fix it, then resume with: pyinfra <inventory> deploys/patch.py --data from={cfg.name}"
            ) from exc
        finally:
            report.seconds = round(time.monotonic() - _STARTED.get(cfg.name, time.monotonic()), 1)
            report.finished = datetime.now(UTC).isoformat(timespec="seconds")
            root_shell(target, f"install -d -m 755 /var/lib/webstack && cat > {REPORT_ON_HOST} <<'EOF'\n"
                               f"{json.dumps(asdict(report))}\nEOF", 30)

    return run


def _patch_me(cfg: HostConfig, step: Step, version: str, health_timeout: int, always_reboot: bool) -> None:
    """On the host being patched: upgrade, then reboot or restart, health (fails the host when unhealthy)."""
    pending = host.get_fact(PendingUpgrades)
    upgraded = sorted({p["package"] for p in pending})

    def started() -> None:
        _STARTED[cfg.name] = time.monotonic()
        _REPORTS[cfg.name] = Report(cfg.name, step.tier)

    python.call(name=f"Patch {cfg.name}: {len(upgraded)} package(s) to upgrade", function=started)
    apt.dist_upgrade(name=f"Upgrade {len(upgraded)} package(s)")
    python.call(name="Reboot or restart what the upgrade needs, then wait until healthy",
                function=_finish(cfg, step, version, upgraded, health_timeout, always_reboot))


def _print_report(report_file: str, steps: Sequence[Step]) -> Callable[[], None]:
    def run() -> None:
        if _PRINTED:
            return
        _PRINTED.append(report_file)
        rows = [_REPORTS[s.host] for s in steps if s.host in _REPORTS]
        head = f"{'host':10} {'tier':9} {'upgraded':>8} {'restarted':>9} {'rebooted':8} {'seconds':>7}  health"
        lines = [head] + [
            f"{r.host:10} {r.tier:9} {len(r.upgraded):8d} {len(r.restarted):9d} {('yes' if r.rebooted else 'no'):8} "
            f"{r.seconds:7.1f}  {r.health}" for r in rows]
        skipped = [s.host for s in steps if s.host not in _REPORTS]
        if skipped:
            lines.append(f"not touched: {', '.join(skipped)}")
        logger.warning("webstack: patch run\n" + "\n".join(lines))
        Path(report_file).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        logger.warning(f"webstack: patch report written to {report_file}")

    return run


def run() -> None:
    """deploys/patch.py: the whole run, as every host of it sees it."""
    cfg = config()
    request = options(PatchOptions)
    steps = plan(cfg, request.start_from)
    me = next((s for s in steps if s.host == cfg.name), None)
    version = ""
    if "postgres" in cfg.roles:
        # The live cluster must match the inventory (a failover it does not know of, two primaries):
        # a refusal on any host stops the whole run before anything is touched.
        version = VERSION[codename()]
        guard(cfg, version)
    if me is not None:
        pending = host.get_fact(PendingUpgrades)
        reboot = reboot_reasons([p["package"] for p in pending])
        logger.warning(f"webstack: plan: {cfg.name} ({me.tier}): {len(pending)} upgrade(s)"
                       + (f": {', '.join(p['package'] for p in pending)}" if pending else "")
                       + (f"; reboots ({', '.join(reboot)})" if reboot else "; no reboot expected"))
    else:
        host.noop("not in this patch run")

    def go() -> bool:
        return not _stopped(steps)

    distro = codename() if "lb" in cfg.roles else ""
    drained = list(cfg.settings(LbSettings).drained) if "lb" in cfg.roles else []
    for step in host.loop(steps):
        _one(cfg=cfg, step=step, version=version, drained=drained, distro=distro, switch_back=request.switch_back,
             health_timeout=request.health_timeout, always_reboot=request.always_reboot, _if=[go])
    barrier(name="Patch run finished", label="patch")
    # On every host still in the run (any may have failed); the first to get there prints.
    python.call(name="Patch report", function=_print_report(request.report, steps))


@deploy("Patch step")
def _one(cfg: HostConfig, step: Step, version: str, drained: list[str], distro: str, switch_back: bool,
         health_timeout: int, always_reboot: bool) -> None:
    """Every host's operations for one step: out of service, patch, back (``version``: this host's
    PostgreSQL version, if it has one)."""
    label = f"patch {step.host}"
    lb_here = "lb" in cfg.roles
    # Before: take the host out of service.
    if lb_here and step.drain:
        site = nginx_site(cfg, distro, [*drained, step.host], force=True, name=f"Drain {step.host}")
        owed_action("reload-nginx", "nginx -t -q && systemctl reload nginx", [site])
    pair_peer = step.holds_vip and cfg.name != step.host and lb_here and cfg.settings(LbSettings).vip == step.vip
    if pair_peer:  # the holder stops only once a peer can take the VIP at once (not in FAULT, not starting)
        server.shell(name=f"Wait until keepalived here can take the VIP from {step.host}", commands=[vrrp_ready(60)])
    if step.holds_vip:
        barrier(name=f"A peer can take the VIP from {step.host}", label=label)
    if cfg.name == step.host and step.holds_vip:
        server.shell(name=f"No new connection to the VIP here; the open ones finish ({PRE_DRAIN_S} s at most)",
                     commands=[pre_drain(step.vip)])
        systemd.service(name="Stop keepalived: the VIP moves to the peer", service="keepalived", running=False)
        server.shell(name="Wait until the VIP has left", commands=[
            f"for i in $(seq 50); do ip -o addr show to {step.vip} | grep -q . || exit 0; sleep 0.2; done; exit 1"])
    if cfg.name == step.host and step.tier == "worker":
        name = worker.app_settings(cfg).name
        server.shell(name="Stop the workers (each finishes its current job)",
                     commands=[f"systemctl stop '{name}-worker@*.service'"])
    if step.primary_of and step.switch_to:
        orchestrate.switch(cfg, version, step.host, step.switch_to, write_inventory=not switch_back,
                           announce=not switch_back)
    barrier(name=f"{step.host} out of service", label=label)
    # The host itself.
    if cfg.name == step.host:
        _patch_me(cfg=cfg, step=step, version=version, health_timeout=health_timeout, always_reboot=always_reboot)
    barrier(name=f"{step.host} patched", label=label)
    # After: back into service.
    if step.primary_of and step.switch_to and switch_back:
        orchestrate.switch(cfg, version, step.switch_to, step.host,
                           again=True, announce=False)
    if cfg.name == step.host and step.holds_vip:
        systemd.service(name="Start keepalived", service="keepalived", running=True)
        server.shell(name="Wait until keepalived here is BACKUP or MASTER", commands=[vrrp_ready(60)])
    if lb_here and step.drain:
        site = nginx_site(cfg, distro, drained, force=True, name=f"Put {step.host} back")
        owed_action("reload-nginx", "nginx -t -q && systemctl reload nginx", [site])
    barrier(name=f"{step.host} back in service", label=label)

"""The move from stage 1 (web, app and database on one server) to the full stack, under load.

Shared by ``tests/integration/test_growth.py`` (asserts) and ``bench/growth.py`` (figures). It uses
the lab's on-demand machines grow1-grow5 (``lab/fleet.yml``), booted fresh, and an inventory of its
own, written step by step as an operator would edit ``hosts.yml`` and ``group_data/``:

1. **stage 1**: grow1 alone runs the load balancer (TLS), the application and PostgreSQL
   (cluster ``grow``); ``webstack onboard``.
2. **replicas and backups**: grow3 and grow4 join cluster ``grow`` and grow5 becomes its off-site
   backup host; ``webstack onboard`` (the new servers as root, grow1 as the admin user): the
   replicas clone from grow1, WAL archiving and the first full backup start.
3. **the data moves**: ``deploys/switchover.py --data to=grow3``: grow3 is the primary, grow1
   streams from it.
4. **the web tier**: grow1 leaves the cluster (its slot is dropped on grow3, its replication
   access removed) and keeps the load balancer and the application, now with a worker; grow2
   joins as the second load balancer, application server and worker; the pair shares a floating
   IP (keepalived). ``webstack onboard``.
5. ``deploys/site.py`` again: changes nothing.

A client requests pages and another signs up (writes) every 0.2 s through grow1's own address
(the address DNS names at stage 1) from before step 2 to the end; then both run through the new
floating IP.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lab.probe import ADDRESS, ON_DEMAND, SignupClient, SteadyClient, host
from tests.integration.conftest import BIN, ROOT, Run, deploy, lab, run, wait_for
from webstack import secrets, tls

GROW_VIP = "10.77.0.101"
NAMES = sorted(ON_DEMAND)  # grow1 ... grow5
STAGE1 = {"grow1": (["lb", "app", "postgres"], ["db", "pg_grow"])}
REPLICAS = {**STAGE1,
            "grow3": (["postgres"], ["db", "pg_grow"]),
            "grow4": (["postgres"], ["db", "pg_grow"]),
            "grow5": (["backup"], [])}
FULL = {"grow1": (["lb", "app", "worker"], []),
        "grow2": (["lb", "app", "worker"], []),
        **{n: REPLICAS[n] for n in ("grow3", "grow4", "grow5")}}


@dataclass
class Growth:
    """What happened: each step's run, the clients' records, and the timings."""

    inventory: Path
    runs: dict[str, Run] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)  # step -> monotonic start, end
    pages: SteadyClient | None = None
    signups: SignupClient | None = None
    vip_pages: SteadyClient | None = None
    vip_signups: SignupClient | None = None

    def step(self, name: str, *args: str) -> Run:
        start = time.monotonic()
        if args[0] == "onboard":
            result = run(str(BIN / "webstack"), "onboard", str(self.inventory.with_suffix("")), *args[1:])
        else:
            result = deploy(self.inventory, *args)
        self.runs[name] = result
        self.seconds[name] = time.monotonic() - start
        self.spans[name] = (start, time.monotonic())
        return result

    def during(self, t: float) -> str:
        """The step running at monotonic time ``t`` (a client's record)."""
        return next((name for name, (a, b) in self.spans.items() if a <= t <= b), "between steps")


def write_inventory(inv_dir: Path, hosts: dict[str, tuple[list[str], list[str]]], primary: str,
                    backups: bool, vip: bool) -> None:
    """hosts.yml and group_data as the operator would write them for this step."""
    lab_inv = ROOT / "inventories" / "lab"
    ssh = yaml.safe_load((lab_inv / "hosts.yml").read_text())["ssh"]
    lines = ["ssh:", *(f"  {k}: {v}" for k, v in ssh.items()), "hosts:"]
    for name, (roles, groups) in hosts.items():
        lines.append(f"  {name}: {{address: {ADDRESS[name]}, release: {ON_DEMAND[name]['release']}, "
                     f"roles: [{', '.join(roles)}], groups: [{', '.join(groups)}]}}")
    (inv_dir / "hosts.yml").write_text("\n".join(lines) + "\n")
    gd = inv_dir / "group_data"
    pg = ["postgres__cluster: grow", f"postgres__primary: {primary}"]
    if backups:
        pg.append("postgres__backup_host: grow5")
    (gd / "pg_grow.yml").write_text("\n".join(pg) + "\n")
    lb = ['lb__server_names: ["www.webstack.test", "webstack.test"]']
    if vip:
        lb += [f"lb__vip: {GROW_VIP}", "lb__vip_prefix: 24", "lb__vrrp_id: 52"]
    (gd / "lb.yml").write_text("\n".join(lb) + "\n")
    worker = gd / "worker.yml"  # group data only once a host has the role (a file for no host is refused)
    if any("worker" in roles for roles, _ in hosts.values()):
        worker.write_text("worker__processes: 1\n")
    else:
        worker.unlink(missing_ok=True)
    run(str(BIN / "python"), "-m", "webstack.labsecrets", str(inv_dir))  # secrets the step adds (cluster grow's backups)


def new_inventory(tmp: Path) -> Path:
    """An inventory of its own under tmp, named lab (the lab's secrets and their key), with the lab's
    CA and its base, app and database settings (no mail relay: the lab's stand-in provider belongs to
    the lab inventory)."""
    lab_inv = ROOT / "inventories" / "lab"
    inv_dir = tmp / "inventories" / "lab"
    (inv_dir / "group_data").mkdir(parents=True)
    for name in ("ca.crt", "secrets.recipients"):
        shutil.copy(lab_inv / name, inv_dir / name)
    # The clients check the certificate against the address they connect to: grow1's (stage 1's
    # DNS) and the new floating IP. The rest (the backup secrets of cluster grow) are generated
    # by the lab's secrets tool as each step's inventory asks for them (``secrets_for``).
    data = secrets.decrypt(lab_inv)
    data["tls_key"], data["tls_cert"] = tls.issue(data["lab_ca_key"], data["lab_ca_cert"], ["www.webstack.test"],
                                                  [GROW_VIP, ADDRESS["grow1"], ADDRESS["grow2"]])
    secrets.encrypt(inv_dir, data)
    for name in ("app.yml", "db.yml"):
        shutil.copy(lab_inv / "group_data" / name, inv_dir / "group_data" / name)
    base = yaml.safe_load((lab_inv / "group_data" / "all.yml").read_text())
    keep = {k: v for k, v in base.items() if k in ("base__admin_users", "base__admin_networks", "base__ntp_servers")}
    (inv_dir / "group_data" / "all.yml").write_text(yaml.safe_dump(keep))
    (inv_dir / "host_data").mkdir()
    (inv_dir / "host_data" / "grow1.yml").write_text("lb__priority: 150   # grow1 normally holds the VIP\n")
    shutil.copy(ROOT / "inventories" / "lab.py", tmp / "inventories" / "lab.py")
    return tmp / "inventories" / "lab.py"


def grow(tmp: Path) -> Growth:
    """Boot grow1-grow5 fresh and walk stage 1 -> full stack; the clients are stopped on return."""
    lab("destroy", *NAMES)  # fresh servers, whatever an earlier run left on them
    lab("up", *NAMES)
    inv = new_inventory(tmp)
    g = Growth(inv)
    inv_dir = inv.with_suffix("")
    grow1 = ADDRESS["grow1"]

    write_inventory(inv_dir, STAGE1, "grow1", backups=False, vip=False)
    g.step("stage 1", "onboard")
    with SteadyClient(interval=0.05, limit=3000, timeout=5.0, address=grow1) as pages, \
            SignupClient(interval=0.2, limit=3000, address=grow1) as signups:
        g.pages, g.signups = pages, signups
        wait_for(lambda: len(signups.acknowledged()) >= 5, 30, "sign-ups on grow1 never got going")
        write_inventory(inv_dir, REPLICAS, "grow1", backups=True, vip=False)
        g.step("replicas and backups", "onboard")
        g.step("switchover", "switchover", "--limit", "pg_grow", "--data", "to=grow3", "--data", "write_inventory=yes")
        write_inventory(inv_dir, FULL, "grow3", backups=True, vip=True)
        g.step("web tier", "onboard")
        g.step("again", "site")
        after = len(signups.results)
        wait_for(lambda: len(signups.results) > after + 10, 30, "no sign-ups after the last step")
    with SteadyClient(interval=0.05, limit=60, timeout=5.0, address=GROW_VIP) as vip_pages, \
            SignupClient(interval=0.2, limit=60, address=GROW_VIP) as vip_signups:
        g.vip_pages, g.vip_signups = vip_pages, vip_signups
        wait_for(lambda: len(vip_signups.results) >= 20 and len(vip_pages.served_by()) >= 2, 60,
                 "the floating IP did not serve both application servers")
    return g


def stored_signups(primary: str, tag: str) -> set[str]:
    out = host(primary).check_output(
        f"runuser -u postgres -- psql -XAt -d app -c \"select email from signups where email like '{tag}-%'\"")
    return set(out.splitlines())


def write_pause(signups: SignupClient) -> float:
    """The slowest acknowledged sign-up (seconds): how long a write waited at worst."""
    return max((r[1] for r in signups.results if r[2]), default=0.0)

"""The monthly patch run on the lab under live traffic: pages and sign-ups through the VIP, every
host upgraded (and rebooted when the upgrade needs it) one at a time, nothing failed, nothing lost.

Runs after the other tiers' tests (conftest orders it just before the backup tests), since it
reboots machines.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lab.probe import SignupClient, SteadyClient, host, vip_holder
from roles.patch import vrrp_ready
from tests.integration.conftest import BIN, MACHINES, drained_on, inventory_copy, run, wait_for

pytestmark = pytest.mark.lab
APPS = sorted(n for n, m in MACHINES.items() if "app" in m["roles"])
LBS = sorted(n for n, m in MACHINES.items() if "lb" in m["roles"])


def patch(*args: str, check: bool = True, inventory: str = "inventories/lab.py"):
    return run(str(BIN / "pyinfra"), "-y", inventory, "deploys/patch.py", *args, check=check, timeout=3000)


def pending(name: str) -> list[str]:
    out = host(name).check_output("apt-get -qq update >/dev/null 2>&1; LC_ALL=C apt-get -s dist-upgrade | grep '^Inst ' || true")
    return [line.split()[1] for line in out.splitlines()]


def report_of(name: str) -> dict | None:
    out = host(name).run("cat /var/lib/webstack/last-patch.json")
    return json.loads(out.stdout) if out.rc == 0 else None


def test_unhealthy_host_stops_the_run_and_stays_out(converged, tmp_path):
    """app1's application is stopped (a health check that fails after patching): the run stops at app1,
    app1 stays drained from both load balancers, app2 is not touched; the resume command finishes."""
    before = report_of(APPS[1])
    host(APPS[0]).check_output("systemctl stop webapp")
    report = tmp_path / "report.json"
    result = patch("--limit", "lb", "--limit", "web", "--data", f"from={APPS[0]}", "--data", "health_timeout=10",
                   "--data", f"report={report}", check=False)
    try:
        assert result.returncode != 0
        assert f"The patch run stopped at {APPS[0]}" in result.output
        assert f"deploys/patch.py --data from={APPS[0]}" in result.output
        assert all(drained_on(lb, APPS[0]) for lb in LBS)
        assert report_of(APPS[1]) == before  # not touched
        rows = {r["host"]: r for r in json.loads(report.read_text())}
        assert rows[APPS[0]]["health"].startswith("failed") and APPS[1] not in rows
        assert f"not touched: {APPS[1]}" in result.output
    finally:
        host(APPS[0]).check_output("systemctl start webapp")
    patch("--limit", "lb", "--limit", "web", "--data", f"from={APPS[0]}", "--data", f"report={report}")
    assert not any(drained_on(lb, APPS[0]) for lb in LBS)
    assert report_of(APPS[0])["health"] == "ok" and report_of(APPS[1])["health"] == "ok"


def test_misuse_is_refused_before_anything_is_touched(converged, tmp_path):
    inv = inventory_copy(tmp_path)
    group = inv.parent / "lab" / "group_data" / "pg_main.yml"
    group.write_text(group.read_text().replace("postgres__primary: db1", "postgres__primary: db2"))
    before = {n: report_of(n) for n in ("lb1", "lb2", "db1", "db2")}
    result = patch(check=False, inventory=str(inv))
    assert result.returncode != 0 and "stale inventory" in result.output
    assert {n: report_of(n) for n in before} == before
    bad = patch("--data", "from=nosuchhost", check=False)
    assert bad.returncode != 0 and "from=nosuchhost" in bad.output


def test_full_patch_run_under_load_fails_no_request_and_loses_no_row(converged, tmp_path):
    report = tmp_path / "report.json"
    # Pages as a browser loads them: a GET reset by a VIP move in flight is sent once more (counted).
    with SteadyClient(interval=0.05, limit=3000, timeout=5.0, retry_reset=True) as pages, SignupClient() as signups:
        wait_for(lambda: len(signups.acknowledged()) >= 5, 30, "sign-ups never got going")
        started = time.monotonic()
        out = patch("--data", f"report={report}").output
        took = time.monotonic() - started
    rows = json.loads(report.read_text())
    print(out[-4000:])
    latencies = sorted(r[1] for r in signups.results)
    print(f"patch run {took:.0f} s; {len(pages.results)} page requests, {len(pages.failures())} failed "
          f"({pages.resets} reset by a VIP move and sent again); "
          f"{len(signups.results)} sign-ups, {len(signups.failures())} failed, slowest {latencies[-1]:.2f} s, "
          f"p99 {latencies[int(len(latencies) * 0.99)]:.2f} s")
    print(signups.explain())
    for r in rows:
        print(f"  {r['host']:8} {r['tier']:8} {len(r['upgraded']):3} upgraded, rebooted={r['rebooted']}, "
              f"{r['seconds']:.0f} s, {r['health']}")
    assert {r["host"] for r in rows} == set(MACHINES)
    assert all(r["health"] == "ok" for r in rows)
    assert pages.failures() == [] and len(pages.results) > 100
    assert signups.failures() == [] and len(signups.results) > 20, signups.explain()
    # Every acknowledged sign-up is in the database (the primary is the inventory's again).
    emails = host("db1").check_output(
        f"runuser -u postgres -- psql -XAt -d app -c \"select email from signups where email like '{signups.tag}-%'\"")
    assert signups.acknowledged() <= set(emails.splitlines())
    # Nothing is left to upgrade.
    with ThreadPoolExecutor(len(MACHINES)) as pool:
        left = dict(zip(MACHINES, pool.map(pending, MACHINES), strict=True))
    assert {name: pkgs for name, pkgs in left.items() if pkgs} == {}


def test_vip_holder_waits_until_its_peer_can_take_the_vip(converged, tmp_path):
    """lb2's nginx is stopped, so its keepalived is in FAULT and could not take the VIP: patching lb1
    (the holder) waits until lb2 is BACKUP again before it stops lb1's keepalived; no request fails."""
    holder, peer = "lb1", "lb2"
    assert vip_holder(LBS) == holder
    host(peer).check_output("systemctl stop nginx")
    try:
        wait_for(lambda: host(peer).run(vrrp_ready(1)).rc != 0, 15, f"{peer}'s keepalived never left BACKUP")
        # The VIP moves twice (to lb2, back to lb1): a GET reset by a move in flight is sent once more,
        # as a browser does (counted: at most one per move); a VIP that nobody held would fail it again.
        with SteadyClient(interval=0.05, limit=600, timeout=5.0, retry_reset=True) as pages, \
                ThreadPoolExecutor(1) as pool:
            run_ = pool.submit(patch, "--limit", "lb", "--data", f"from={holder}",
                               "--data", f"report={tmp_path / 'report.json'}")
            time.sleep(8)  # the run is waiting for lb2 meanwhile, with the VIP still on lb1
            assert vip_holder(LBS) == holder
            host(peer).check_output("systemctl start nginx")
            out = run_.result().output
    finally:
        host(peer).run("systemctl start nginx")
    assert f"Wait until keepalived here can take the VIP from {holder}" in out
    assert pages.failures() == [] and len(pages.results) > 100 and pages.resets <= 2
    wait_for(lambda: vip_holder(LBS) == holder, 30, "the VIP did not come back to lb1")

"""Day-2 views of the lab: `webstack drift` (what site would change, with diffs, secrets masked) and
`webstack status` (the live stack in one table). Manual edits are made on real servers."""

from __future__ import annotations

import json

import pytest

from lab.probe import SteadyClient, host, vip_holder
from tests.integration.conftest import BIN, MACHINES, ROOT, deploy, inventory_copy, run, site, wait_for

pytestmark = pytest.mark.lab
INV = "inventories/lab"


def webstack(*args: str, check: bool = False):
    return run(str(BIN / "webstack"), *args, check=check, timeout=900)


def secret_values() -> list[str]:
    from webstack.secrets import decrypt

    values = [str(v) for v in decrypt(ROOT / INV).values()]
    return [line for v in values for line in v.splitlines() if len(line.strip()) >= 12 and "-----" not in line]


def test_drift_shows_manual_edits_with_diffs_and_masks_secrets(converged, tmp_path):
    # The lab starts converged (the session's last site run changed nothing). Three manual changes:
    # an sshd setting, the TLS key file and the application's secrets file, and a stopped nginx on
    # the load balancer not holding the VIP.
    lbs = sorted(n for n, m in MACHINES.items() if "lb" in m["roles"])
    spare_lb = next(n for n in lbs if n != vip_holder(lbs))
    host("app2").check_output("sed -i 's/^MaxAuthTries 3$/MaxAuthTries 6/' /etc/ssh/sshd_config")
    host("app1").check_output("echo 'DEBUG=1' >> /etc/webstack/webapp.env")
    host(spare_lb).check_output("echo '# tampered' >> /etc/nginx/tls/webstack.key && systemctl stop nginx")
    try:
        report_file = tmp_path / "drift.json"
        drift = webstack("drift", INV, "--json", str(report_file))
        out = drift.output
        assert drift.returncode == 1, out[-3000:]
        assert "-MaxAuthTries 6" in out and "+MaxAuthTries 3" in out
        assert "-DEBUG=1" in out and "*MASKED*" in out
        assert "-# tampered" in out and "BEGIN PRIVATE KEY" not in out
        report = json.loads(report_file.read_text())
        assert any("nginx running" in c for c in report[spare_lb]["changes"])
        assert report["db1"]["changes"] == [] and report["app2"]["files"][0]["path"] == "/etc/ssh/sshd_config"
        for value in secret_values():
            assert value not in out, "a secret value is in the drift output"
    finally:
        site()
    after = webstack("drift", INV)
    assert after.returncode == 0, after.output[-3000:]
    assert after.output.count("no drift") == len(MACHINES)


def test_status_is_one_table_from_the_live_servers(converged, tmp_path):
    report_file = tmp_path / "status.json"
    result = webstack("status", INV, "--json", str(report_file), check=True)
    report = json.loads(report_file.read_text())
    print(result.output)
    assert set(report) == set(MACHINES)
    assert report["lb1"]["vip"] and not report["lb2"]["vip"]
    assert report["db1"]["pg"] == "primary" and report["db2"]["pg"] == "standby"
    assert report["db3"]["pg"] == "primary" and report["db4"]["pg"] == "standby"
    assert float(report["db2"]["replay_lag_s"]) >= 0 and int(report["db1"]["streaming"]) == 1
    assert report["app1"]["release"] == report["app2"]["release"] and report["app1"]["app_active"] == "active"
    assert report["db1"]["backups"]["full"], "cluster main has a full backup"
    queue = next(r["queue"] for r in report.values() if isinstance(r.get("queue"), dict))
    assert {"ready", "dead"} <= set(queue)
    assert all(str(r["pending"]).isdigit() and r["reboot_required"] in ("yes", "no") for r in report.values())
    assert "holds VIP" in result.output and "main primary" in result.output and "job queue" in result.output


def test_reports_refuse_a_bad_inventory_before_connecting(tmp_path):
    inv = tmp_path / "lab"
    import shutil

    shutil.copytree(ROOT / INV, inv)
    (inv / "group_data" / "lb.yml").write_text((inv / "group_data" / "lb.yml").read_text() + "lb__no_such_key: 1\n")
    shutil.copy(ROOT / "inventories" / "lab.py", tmp_path / "lab.py")
    result = webstack("drift", str(inv))
    assert result.returncode == 2 and "lb__no_such_key" in result.output and "lb.yml" in result.output
    assert "Connecting" not in result.output and "Loading" not in result.output


def test_onboard_a_spare_as_app_server_under_load_then_remove_it(converged, tmp_path):
    """spare1 joins as a third application server (inventory change + site) while a client sends
    requests through the VIP; then the committed inventory (without it) is applied again. No request
    fails, and afterwards nothing of spare1 remains in the load balancers, pg_hba or the firewalls."""
    inv = inventory_copy(tmp_path)
    hosts = inv.parent / "lab" / "hosts.yml"
    text = hosts.read_text()
    line = next(x for x in text.splitlines() if x.strip().startswith("spare1:"))
    hosts.write_text(text.replace(line, line.replace("roles: []", "roles: [app]").replace("groups: [spare]", "groups: [web]")))
    address = MACHINES["spare1"]["address"]
    lbs = sorted(n for n, m in MACHINES.items() if "lb" in m["roles"])
    with SteadyClient(interval=0.05, limit=1200, timeout=5.0) as client:
        added = deploy(inv, "site")
        wait_for(lambda: "spare1" in client.served_by(), 30, "spare1 never answered through the VIP")
        served = len([r for r in client.results if r[1] and r[2].endswith("spare1")])
        removed = site()
        after = len(client.results)
        wait_for(lambda: len(client.results) > after + 40, 30, "no requests after the removal")
    assert "Drain spare1" in added.output  # it joined drained, then was put in once healthy
    assert client.failures() == [], client.failures()[:5]
    assert served > 0 and len(client.results) > 100
    assert not any(r[1] and r[2].endswith("spare1") for r in client.results[after:])
    for lb in lbs:
        assert address not in host(lb).check_output("cat /etc/nginx/sites-enabled/webstack.conf")
    assert address not in host("db1").check_output("cat /etc/postgresql/17/main/pg_hba.conf")
    assert address not in host("db1").check_output("nft list ruleset")
    assert removed.totals()["error"] == "-"


def test_removing_the_load_balancer_holding_the_vip_is_refused(converged, tmp_path):
    """lb1 holds the VIP and is taken out of the inventory: site on lb2 refuses (lb1's keepalived
    would keep the address while lb2 claims it too) and says how to hand the VIP over; lb2's
    keepalived configuration, which would drop lb1 as a peer, is left as it was."""
    lbs = sorted(n for n, m in MACHINES.items() if "lb" in m["roles"])
    holder = vip_holder(lbs)
    other = next(n for n in lbs if n != holder)
    inv = inventory_copy(tmp_path)
    hosts = inv.parent / "lab" / "hosts.yml"
    hosts.write_text("\n".join(x for x in hosts.read_text().splitlines() if not x.strip().startswith(f"{holder}:")) + "\n")
    (inv.parent / "lab" / "host_data" / f"{holder}.yml").unlink(missing_ok=True)
    before = host(other).check_output("cat /etc/keepalived/keepalived.conf")
    refused = deploy(inv, "site", "--limit", other, check=False)
    assert refused.returncode != 0
    assert "no load balancer of the inventory holds it" in refused.output and "systemctl stop keepalived" in refused.output
    assert host(other).check_output("cat /etc/keepalived/keepalived.conf") == before
    assert MACHINES[holder]["address"] in before


SNOOP = r"""end=$(( $(date +%s) + 300 ))
while [ "$(date +%s)" -lt "$end" ] && [ ! -e /tmp/snoop-stop ]; do
    for f in /proc/[0-9]*/cmdline; do tr '\000' ' ' < "$f" 2>/dev/null; echo; done
    find /tmp /var/tmp /dev/shm /etc/webstack /etc/pgbackrest /var/lib/postgresql /srv /root -maxdepth 4 \
        -type f -readable -size -256k ! -path '/tmp/snoop*' -exec cat {} + 2>/dev/null
    sleep 0.02
done | awk '!seen[$0]++' > /var/tmp/snoop-seen/all
"""


def test_a_rotated_password_is_never_readable_by_another_local_user(converged, tmp_path):
    """An unprivileged user on a database server and an application server reads every process's
    arguments and every file it can in the temporary and target directories, over and over, while
    the application's database password is rotated (new SCRAM verifier on db1, new environment file
    on the application servers). It never sees the password or the verifier."""
    inv = inventory_copy(tmp_path)
    new = "rotated-" + __import__("secrets").token_hex(16)
    done = __import__("subprocess").run([str(BIN / "webstack"), "secrets", "set", str(inv.parent / "lab"),
                                         "postgres_password_app"], input=new, text=True, capture_output=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    watched = ("db1", "app1")
    for name in watched:
        h = host(name)
        h.check_output("id snoop >/dev/null 2>&1 || useradd --system --shell /usr/sbin/nologin snoop; "
                       "rm -rf /var/tmp/snoop-seen /tmp/snoop-stop; install -d -o snoop -m 700 /var/tmp/snoop-seen")
        h.check_output(f"cat > /var/tmp/snoop.sh <<'EOF'\n{SNOOP}EOF\nchmod 755 /var/tmp/snoop.sh")
        h.check_output("systemctl stop snoop 2>/dev/null; systemctl reset-failed snoop 2>/dev/null; "
                       "systemd-run --unit=snoop --uid=snoop --collect sh /var/tmp/snoop.sh")
    try:
        out = deploy(inv, "site", "--limit", "db1", "--limit", "app", "--limit", "worker").output
        assert "Role app" in out
        verifier = host("db1").check_output(
            "runuser -u postgres -- psql -XAtc \"select rolpassword from pg_authid where rolname = 'app'\"")
        assert verifier.startswith("SCRAM-SHA-256$")
    finally:
        for name in watched:
            host(name).run("touch /tmp/snoop-stop")
    for name in watched:
        h = host(name)
        wait_for(lambda h=h: h.run("systemctl is-active -q snoop").rc != 0, 30, f"the snoop on {name} did not stop")
        seen = h.check_output("wc -c < /var/tmp/snoop-seen/all")
        assert int(seen) > 1000, f"the snoop on {name} saw nothing: the test proves nothing"
        for needle in (new, verifier.split("$", 2)[-1]):
            found = h.run(f"grep -c -F -e {needle!r} /var/tmp/snoop-seen/all")
            assert found.stdout.strip() == "0", f"an unprivileged user on {name} read a secret"
    # Back to the committed password.
    site("--limit", "db1", "--limit", "app", "--limit", "worker")


def test_drift_of_every_kind_is_found_and_fixed_with_facts_prefetched(converged, tmp_path):
    """Issue 14's condition on the prefetch (one command per host for every fact): a changed file,
    package, unit, user, sysctl, PostgreSQL role and setting are still found and fixed by the next
    site run, which read them through the prefetch; the run after changes nothing."""
    from roles.postgres.scram import matches
    from webstack.inventory import load

    spare, db = host("spare1"), host("db1")
    conf = db.check_output("ls /etc/postgresql/*/main/conf.d/webstack.conf")
    psql = "runuser -u postgres -- psql -XAtc"
    shell = spare.check_output("getent passwd ops").split(":")[6]
    verifier = f"{psql} \"select rolpassword from pg_authid where rolname = 'app'\""
    spare.check_output("sed -i 's/^MaxAuthTries 3$/MaxAuthTries 6/' /etc/ssh/sshd_config")
    spare.check_output("DEBIAN_FRONTEND=noninteractive apt-get remove -y -q needrestart >/dev/null")
    spare.check_output("systemctl disable --now postfix")
    spare.check_output("usermod -s /bin/sh ops")
    spare.check_output("sysctl -qw net.ipv4.conf.all.accept_redirects=1")
    db.check_output(f"{psql} \"alter role app password 'drifted-password'\"")
    assert matches("drifted-password", db.check_output(verifier))
    db.check_output(f"echo \"work_mem = '7MB'\" >> {conf} && {psql} 'select pg_reload_conf()'")
    wait_for(lambda: db.check_output(f"{psql} 'show work_mem'") == "7MB", 10, "the drifted setting live")
    stats = tmp_path / "facts.json"
    fixed = run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/site.py",
                env={"WEBSTACK_FACT_STATS": str(stats)})
    prefetched = json.loads(stats.read_text())
    assert prefetched["spare1"]["prefetched"] > 20 and prefetched["db1"]["prefetched"] > 40, prefetched
    assert fixed.totals()["changed"] not in ("-", "0"), fixed.output[-3000:]
    assert spare.check_output("grep -c '^MaxAuthTries 3$' /etc/ssh/sshd_config") == "1"
    assert spare.package("needrestart").is_installed
    assert spare.service("postfix").is_enabled and spare.service("postfix").is_running
    assert spare.check_output("getent passwd ops").split(":")[6] == shell != "/bin/sh"
    assert spare.check_output("sysctl -n net.ipv4.conf.all.accept_redirects") == "0"
    secret = next(c for c in load(ROOT / INV) if c.name == "db1").secret("postgres_password_app").unmask()
    assert matches(secret, db.check_output(verifier)) and not matches("drifted-password", db.check_output(verifier))
    assert "7MB" not in db.check_output(f"cat {conf}")
    wait_for(lambda: db.check_output(f"{psql} 'show work_mem'") != "7MB", 10, "the setting back")
    assert site().totals()["changed"] == "-"

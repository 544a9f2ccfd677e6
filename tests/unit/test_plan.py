"""Whole deploys prepared as the pyinfra CLI does (tests/unit/simulate.py): order across hosts and roles."""

from __future__ import annotations

import re

import pytest

from tests.unit.simulate import plan


def steps(text: str) -> dict[str, int]:
    """Operation name -> the step it runs in."""
    out, step = {}, -1
    for line in text.splitlines():
        if line.startswith("-- step "):
            step = int(line.split()[-1])
        elif line.startswith("== "):
            for name in line[3:].split(" / "):
                out[name] = step
    return out


@pytest.fixture(scope="module")
def site() -> str:
    return plan("site")


def test_site_prepares_every_host_without_error(site):
    hosts = set(re.findall(r"^  \[(\S+)\]", site, re.M))
    assert len(hosts) == 15
    assert not re.search(r"^    error ", site, re.M)


def test_no_operation_is_shared_by_two_roles(site):
    # pyinfra matches operations across hosts by call-stack lines; site.py calls each role from its own line.
    for line in (x for x in site.splitlines() if x.startswith("== ")):
        deploys = {name.split(" | ")[0] for name in line[3:].split(" / ") if " | " in name}
        assert len(deploys) <= 1, line


def test_backup_accounts_exist_before_a_stanza_is_created(site):
    at = steps(site)
    assert at["Backup host | Key of pgbr-main (from 10.77.0.31, 10.77.0.32, 10.77.0.71)"] \
        < at["PostgreSQL | Stanza main in the repository"]
    assert at["PostgreSQL | Primary ready for replicas"] < at["PostgreSQL | Configure /etc/pgbackrest/pgbackrest.conf"]


def test_rolling_step_drains_switches_and_puts_back_one_server_at_a_time(site):
    at = steps(site)
    order = [f"Rolling step | {n}" for n in (
        "Drain app1 (release, configuration)", "app1 drained", "app1 switched",
        "Put app1 back", "app1 back in rotation", "Drain app2 (release, configuration)", "app2 back in rotation")]
    assert [at[n] for n in order] == sorted(at[n] for n in order)


def test_a_drain_that_would_empty_the_rotation_is_refused():
    refused = plan("rollout", group_data={"lb": "lb__drained: [app2]"})
    assert refused.startswith("refused: lb") and "draining app1 would leave no application server in rotation" in refused


def test_restore_onto_a_drill_host_wants_confirmation():
    refused = plan("restore", {"from": "main"}, ["drill1", "backup1"])
    assert refused.startswith("refused: drill1 already holds a PostgreSQL data directory")
    done = plan("restore", {"from": "main", "confirm": "drill1"}, ["drill1", "backup1"])
    assert "== Restore main at the latest archived WAL into /var/lib/postgresql/17/main" in done
    assert "--archive-off" in done
    # Every operation of the backup host runs before the restored host touches the repository.
    order = steps(done)
    barrier = order["Backup host converged"]
    assert all(step < barrier for name, step in order.items() if name.startswith(("Backup host | ", "Base | ")))
    assert all(step > barrier for name, step in order.items() if name.startswith("PostgreSQL | "))


def test_sql_runs_as_the_postgres_os_user(site):
    # pyinfra's postgres.sql connects by peer authentication: as root, psql would be refused.
    lines = [x.strip() for x in site.splitlines()
             if "pg_create_physical_replication_slot" in x or "pg_drop_replication_slot" in x or "GRANT EXECUTE" in x]
    # db1's stale slot dropped, db2's invalidated one recreated (the others exist), three primaries'
    # (db1, db3, drill1) pg_rewind grants
    assert len(lines) == 5
    assert any("wal_status = '\"'\"'lost'\"'\"'" in x and "pg_create_physical_replication_slot" in x for x in lines), lines
    assert all(x.startswith("as postgres: run psql -d postgres -Ac ") for x in lines), lines


@pytest.fixture(scope="module")
def patch_run() -> str:
    return plan("patch")


def test_patch_run_goes_tier_by_tier_one_host_at_a_time(patch_run):
    order = steps(patch_run)
    patched = {name.removeprefix("Patch step | Patch ").split(":")[0]: step
               for name, step in order.items() if name.startswith("Patch step | Patch ")}
    hosts = sorted(patched, key=patched.get)
    # Load balancers (the VIP holder last), application servers, workers, database replicas before
    # their primaries, the rest.
    assert hosts[:2] == ["lb2", "lb1"]
    assert hosts[2:4] == ["app1", "app2"] and hosts[4:6] == ["worker1", "worker2"]
    assert hosts.index("db2") < hosts.index("db1") and hosts.index("db4") < hosts.index("db3")
    assert hosts.index("db1") < hosts.index("backup1") and hosts[-2:] == ["spare1", "spare2"]
    # The holder gives the VIP away before it is touched; an application server is drained from the
    # load balancers before and put back after; a primary is switched over before.
    assert order["Patch step | Stop keepalived: the VIP moves to the peer"] < patched["lb1"]
    # ... only once its peer can take the VIP (lb2, just rebooted, may still be in FAULT), and it
    # waits until its own keepalived is ready again before the next host.
    assert order["Patch step | Wait until keepalived here can take the VIP from lb1"] < order[
        "Patch step | Stop keepalived: the VIP moves to the peer"]
    assert patched["lb1"] < order["Patch step | Wait until keepalived here is BACKUP or MASTER"] < order[
        "Patch step | Drain app1"]
    assert order["Patch step | Drain app1"] < patched["app1"] < order["Patch step | Put app1 back"]
    assert order["Patch step | Stop writes: clean shutdown of db1"] < patched["db1"]
    assert order["Patch step | Promote db2 once it has replayed everything"] < patched["db1"]
    assert patched["db2"] < order["Patch step | Stop writes: clean shutdown of db1"]


def test_patch_run_switches_back_and_prints_the_plan(patch_run):
    # db1 is patched as a standby, then the cluster switches back to the inventory's primary.
    assert "Promote db1 once it has replayed everything" in patch_run
    assert "Promote db3 once it has replayed everything" in patch_run
    assert "DEBIAN_FRONTEND=noninteractive apt-get -y" in patch_run and "dist-upgrade" in patch_run


def test_site_drops_the_slot_of_a_removed_member_and_keeps_the_others(site):
    assert "Drop replication slot db9 (no longer a member of the cluster)" in site
    assert "Disconnect the replica of slot db9" in site
    assert "Drop replication slot db2" not in site and "Drop replication slot db4" not in site
    assert "Replication slot for db2" not in site and "Replication slot for db4" not in site


def test_an_owed_action_is_recorded_before_the_file_is_swapped(site):
    # A run cut off between the two must not lose the reload (validated_file, both kinds of swap).
    swaps = [x.strip() for x in site.splitlines() if "/var/lib/webstack/pending/" in x and ".webstack-new" in x]
    assert any("sshd_config" in x for x in swaps) and any("webstack.conf" in x for x in swaps)
    for line in swaps:
        touch = line.index("touch /var/lib/webstack/pending/")
        assert touch < line.index("mv -f "), line


def test_maintenance_on_writes_the_include_on_the_load_balancers_only():
    on = plan("maintenance", {"state": "on", "retry_after": "120", "message": 'Back at "5" $soon <b>'})
    assert on.count("/etc/nginx/webstack-maintenance/on.conf.webstack-new") >= 2  # lb1 and lb2
    assert "set $webstack_retry_after 120;" in on and "return 503" in on
    assert 'Back at &quot;5&quot; &#36;soon &lt;b&gt;' in on  # nothing nginx or the browser would interpret
    maintenance_ops = on.split("== Audit trail")[0]
    assert "[app1]" not in maintenance_ops and "[db1]" not in maintenance_ops
    off = plan("maintenance", {"state": "off"})
    assert "Maintenance | maintenance is off" not in off  # a noop: only the directory and an owed reload
    assert "webstack-maintenance/on.conf" not in off.split("== Maintenance | Maintenance directory")[1]
    assert plan("maintenance", {"state": "maybe"}).startswith("refused: maintenance: --data state=on or state=off")


def test_migrations_run_once_before_the_first_switch(site):
    at = steps(site)
    migrations = [n for n in at if n.startswith("Rolling step | Migrate the database for release ")]
    assert len(migrations) == 1 and site.count("systemd-run --quiet --wait --collect --pipe --unit=webapp-migrate-") == 1
    switches = [step for n, step in at.items() if n.startswith("Rolling step | Switch current -> ")]
    assert at[migrations[0]] < min(switches)
    assert "-p EnvironmentFile=/etc/webstack/webapp.env" in site and "sh -c 'python3 -m migrate'" in site


def test_no_secret_is_in_a_command_or_a_readable_upload(site):
    """Every secret reaches the servers on a command's stdin (files created 0600 under umask 077,
    chpasswd -e, psql reading its statement): none is in a command line (readable by every local user
    in /proc/*/cmdline) or in a file uploaded through a world-readable temp file."""
    from tests.unit.simulate import _fixed_secrets

    for name, value in _fixed_secrets().items():
        if name.endswith("_cert"):  # a certificate is public
            continue
        lines = [line.strip() for line in value.strip().splitlines() if len(line.strip()) >= 12 and "-----" not in line]
        for line in lines[:3]:
            assert line not in site, f"secret {name} appears in the site plan"
    assert "usermod -p" not in site


def test_a_fresh_host_installs_all_its_packages_in_one_apt_transaction(site):
    # The simulated fleet has no package installed: the base role's one apt-get holds every role's
    # packages, and no role runs an apt-get install of its own after it.
    installs: dict[str, list[str]] = {}
    host = ""
    for line in site.splitlines():
        if line.startswith("  ["):
            host = line.strip()[1:-1]
        elif "apt-get" in line and " install " in line:
            installs.setdefault(host, []).append(line.split(" install ", 1)[1])
    assert len(installs) == 15
    assert {h: len(v) for h, v in installs.items() if len(v) != 1} == {}
    packages = {h: set(v[0].split()) for h, v in installs.items()}
    assert {"postgresql", "pgbackrest", "sshfs", "postfix"} <= packages["db3"]  # Debian 12: the repository over sshfs
    assert "sshfs" not in packages["db1"] and "pgbackrest" in packages["db1"]
    assert {"nginx", "keepalived", "curl"} <= packages["lb1"] and "postgresql" not in packages["lb1"]
    assert {"dovecot-core", "postfix-pcre"} <= packages["mail1"] and "libsasl2-modules" not in packages["mail1"]
    assert {"gunicorn", "python3-psycopg2"} <= packages["app1"] and "rsync" in packages["backup1"]

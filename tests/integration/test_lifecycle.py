"""Application lifecycle commands on the lab: `webstack logs` across servers and `webstack exec`."""

from __future__ import annotations

import getpass
import json
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from lab.probe import SignupClient, SteadyClient, host, https
from tests.integration.conftest import BIN, MACHINES, ROOT, drained_on, inventory_copy, release_of, run, site
from webstack.inventory import load

pytestmark = pytest.mark.lab
APPS = sorted(n for n, m in MACHINES.items() if "app" in m["roles"])
LBS = sorted(n for n, m in MACHINES.items() if "lb" in m["roles"])
WORKERS = sorted(n for n, m in MACHINES.items() if "worker" in m["roles"])


def webstack(*args: str, check: bool = True):
    return run(str(BIN / "python"), "-m", "webstack.cli", *args, check=check, timeout=120)


def test_logs_of_both_app_servers_merge_within_a_second(converged):
    proc = subprocess.Popen([str(BIN / "python"), "-m", "webstack.cli", "logs", "inventories/lab", "app", "-f", "-n", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    seen: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        tag, sent = uuid.uuid4().hex[:8], {}
        time.sleep(3)  # both SSH sessions up and following
        for i in range(30):
            sent[f"logs-{tag}-{i}"] = time.monotonic()
            assert https(f"/app?logs-{tag}-{i}")[0] == 200
            time.sleep(0.05)
        time.sleep(3)
    finally:
        proc.terminate()
        proc.wait(10)
    delays: dict[str, list[float]] = {}
    for at, line in seen:
        name, _, rest = line.partition(" | ")
        for key, t in sent.items():
            if f"GET /app?{key} " in rest:
                delays.setdefault(name.strip(), []).append(at - t)
    assert sorted(delays) == APPS, seen[-5:]
    assert sum(len(v) for v in delays.values()) == len(sent)  # each request once, from the server it reached
    worst = max(max(v) for v in delays.values())
    print(f"logs -f: {len(sent)} requests, worst delay from request to merged line {worst:.3f} s")
    assert worst < 1.0


def test_exec_runs_as_the_app_in_its_release_and_environment(converged):
    out = webstack("exec", "inventories/lab", APPS[0], "--", "sh", "-c",
                   'id -un; pwd -P; test -n "$SECRET_KEY" && echo secret-key-set; python3 -c "import app; print(app.RELEASE)"')
    lines = out.output.split()
    current = https("/healthz")[1]["x-release"]
    assert lines[:3] == ["webapp", f"/srv/webapp/releases/{current}", "secret-key-set"], out.output
    assert lines[-1] == current
    key = next(c for c in load(ROOT / "inventories" / "lab") if c.name == APPS[0]).secret("app_secret_key").unmask()
    assert key not in out.output
    # An exit status comes back; a group or an unknown name is refused with the names there are.
    assert webstack("exec", "inventories/lab", APPS[0], "--", "false", check=False).returncode == 1
    group = webstack("exec", "inventories/lab", "app", "--", "true", check=False)
    assert group.returncode == 2 and "exec runs on one host" in group.output
    unknown = webstack("logs", "inventories/lab", "nosuch", check=False)
    assert unknown.returncode == 2 and "nosuch: no such host or group (hosts: app1, app2," in unknown.output


def maintenance(*args: str):
    return run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/maintenance.py", *args)


def status_on(lb: str, path: str) -> str:
    return host(lb).check_output("curl -sk -o /dev/null -w '%{http_code}' "
                                 f"--resolve www.webstack.test:443:127.0.0.1 https://www.webstack.test{path}")


def test_maintenance_mode_answers_503_keeps_the_marketing_site_and_survives_a_site_run(converged):
    try:
        maintenance("--data", "state=on", "--data", "retry_after=120")
        status, headers, body = https("/app")
        assert status == 503 and headers["retry-after"] == "120" and b"Down for maintenance" in body
        assert headers["strict-transport-security"].startswith("max-age=")  # the site's headers still
        assert https("/")[0] == 200 and https("/pricing")[0] == 200  # the marketing site is served
        assert {lb: status_on(lb, "/app") for lb in LBS} == {lb: "503" for lb in LBS}
        assert {lb: status_on(lb, "/lb-health") for lb in LBS} == {lb: "200" for lb in LBS}
        assert maintenance("--data", "state=on", "--data", "retry_after=120").totals()["changed"] == "-"
        site()  # site leaves maintenance mode alone
        assert https("/app")[0] == 503
    finally:
        maintenance("--data", "state=off")
    status, headers, _ = https("/app")
    assert status == 200 and "retry-after" not in headers
    assert maintenance("--data", "state=off").totals()["changed"] == "-"


def release_with(tmp_path: Path, name: str, migration: str, sql: str, app_edit: tuple[str, str] | None = None) -> Path:
    """A copy of the demo app with one more migration file (and an edit of app.py)."""
    src = tmp_path / name
    shutil.copytree(ROOT / "examples" / "demoapp", src)
    (src / "migrations" / migration).write_text(sql)
    if app_edit:
        text = (src / "app.py").read_text()
        assert app_edit[0] in text
        (src / "app.py").write_text(text.replace(*app_edit))
    return src


def inventory_with(tmp_path: Path, app_yml: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    inv = inventory_copy(tmp_path)
    with open(inv.parent / "lab" / "group_data" / "app.yml", "a") as f:
        f.write(app_yml)
    return inv


def primary_sql(statement: str) -> str:
    return host("db1").check_output(f"runuser -u postgres -- psql -XAt -d app -c \"{statement}\"")


def migrate_units(release: str) -> dict[str, int]:
    """Hosts whose journal has the migration unit of ``release`` (count of its start lines)."""
    out = {}
    for name in [*APPS, *WORKERS]:
        n = host(name).check_output(f"journalctl -q -o cat -u webapp-migrate-{release} | grep -c '^Started ' || true")
        if int(n or 0):
            out[name] = int(n)
    return out


def test_a_release_with_a_migration_rolls_out_under_load_migrated_once(converged, tmp_path):
    new = release_with(tmp_path, "demoapp-plan", "003_signups_plan.sql",
                       "alter table signups add column if not exists plan text;\n",
                       ('"insert into signups (email, served_by, source) values (%s, %s, %s) returning id",\n'
                        '                        (email, HOST, source))',
                        '"insert into signups (email, served_by, source, plan) values (%s, %s, %s, %s) returning id",\n'
                        '                        (email, HOST, source, "free"))'))
    inv = inventory_with(tmp_path, f"app__source: {new}\n")
    with SteadyClient(interval=0.02, limit=300) as pages, SignupClient() as signups:
        out = run(str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollout.py", "--limit", "web")
    release = release_of(APPS[0])
    assert {a: release_of(a) for a in APPS} == {a: release for a in APPS}
    assert "Migrate the database for release" in out.output
    assert out.output.index("Migrate the database for release") < out.output.index(f"Drain {APPS[0]}")
    assert migrate_units(release) == {APPS[0]: 1}  # once, on the first server, before it was drained
    assert primary_sql("select count(*) from schema_migrations where version = '003_signups_plan'") == "1"
    assert pages.failures() == [] and len(pages.results) > 100
    assert signups.failures() == [] and len(signups.results) > 10
    tag = signups.tag
    # Sign-ups the new release took have the new column set; none was lost.
    emails = primary_sql(f"select email from signups where email like '{tag}-%'").splitlines()
    assert signups.acknowledged() <= set(emails)
    assert int(primary_sql(f"select count(*) from signups where email like '{tag}-%' and plan = 'free'")) > 0
    # The same rollout again: nothing to do, no migration.
    again = run(str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollout.py", "--limit", "web")
    assert "Migrate the database" not in again.output and again.totals()["changed"] == "-"
    # Rolling back leaves the schema as it is; the old release serves (the column is nullable).
    back = run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/rollout.py", "--limit", "web")
    assert "Switch current ->" in back.output
    assert primary_sql("select count(*) from information_schema.columns where column_name = 'plan'") == "1"
    assert https("/app")[0] == 200


def test_a_failing_migration_switches_no_server(converged, tmp_path):
    bad = release_with(tmp_path, "demoapp-badmig", "003_broken.sql", "select 1/0;\n")
    inv = inventory_with(tmp_path, f"app__source: {bad}\n")
    before = {a: release_of(a) for a in APPS}
    with SteadyClient(interval=0.02, limit=300) as pages:
        out = run(str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollout.py", "--limit", "web", check=False)
    assert out.returncode != 0
    assert "migration 003_broken.sql failed: division by zero" in out.output
    assert "no server was switched" in out.output
    assert {a: release_of(a) for a in APPS} == before
    assert not any(drained_on(lb, a) for lb in LBS for a in APPS)  # migrated before any drain: all in rotation
    assert pages.failures() == [] and len(pages.results) > 50
    assert primary_sql("select count(*) from schema_migrations where version = '003_broken'") == "0"


def test_rollout_hooks_run_on_the_control_machine_and_a_failing_pre_hook_stops_it(converged, tmp_path):
    before = release_of(APPS[0])
    log = tmp_path / "hooks.log"
    new = release_with(tmp_path, "demoapp-hooked", "003_nothing.sql", "select 1;\n")
    hooks = (f"app__pre_rollout_hook: 'echo pre $WEBSTACK_RELEASE $WEBSTACK_PREVIOUS_RELEASE $WEBSTACK_INVENTORY "
             f"$WEBSTACK_DEPLOY >> {log}'\n"
             f"app__post_rollout_hook: 'echo post $WEBSTACK_RELEASE >> {log}'\n")
    refused = run(str(BIN / "pyinfra"), "-y", str(inventory_with(tmp_path / "a", f"app__source: {new}\n"
                                                              "app__pre_rollout_hook: 'echo no >&2; exit 3'\n")),
                  "deploys/rollout.py", "--limit", "web", check=False)
    assert refused.returncode != 0 and "the pre-rollout hook `echo no >&2; exit 3` exited 3" in refused.output
    assert {a: release_of(a) for a in APPS} == {a: before for a in APPS}
    run(str(BIN / "pyinfra"), "-y", str(inventory_with(tmp_path / "b", f"app__source: {new}\n" + hooks)),
        "deploys/rollout.py", "--limit", "web")
    release = release_of(APPS[0])
    assert release != before
    assert log.read_text().splitlines() == [f"pre {release} {before} lab rollout", f"post {release}"]
    run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/rollout.py", "--limit", "web")  # back


def test_audit_trail_lists_switchover_and_rollouts_failed_included(converged, tmp_path):
    """Runs of this module (the migration rollouts before it, one failed) and a switchover and back,
    merged from the control machine and the servers: commit, operator, login, what changed."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    inv = inventory_copy(tmp_path)
    for to in ("db2", "db1"):
        run(str(BIN / "pyinfra"), "-y", str(inv), "deploys/switchover.py", "--limit", "pg_main",
            "--data", f"to={to}", "--data", "write_inventory=yes")
    report = tmp_path / "audit.json"
    out = webstack("audit", "inventories/lab", "--json", str(report))
    print(out.output[:3000])
    runs = json.loads(report.read_text())
    switch = [r for r in runs if r["deploy"] == "switchover" and r["notes"].get("primary", {}).get("to") == "db2"][0]
    assert switch["commit"] == commit and switch["operator"] == getpass.getuser() and switch["login"] == "ops"
    assert switch["outcome"] == "ok" and {"db1", "db2"} <= set(switch["hosts"])
    assert switch["options"] == {"to": "db2", "write_inventory": "yes"}
    assert runs.index(switch) > 0 and runs[0]["deploy"] == "switchover"  # newest first: the switch back
    rollouts = [r for r in runs if r["deploy"] == "rollout"]
    ok = [r for r in rollouts if r["outcome"] == "ok" and r["notes"].get("releases")]
    failed = [r for r in rollouts if r["outcome"] == "failed"]
    assert ok and set(ok[0]["notes"]["releases"]) == set(APPS) and APPS[0] in ok[0]["hosts"]
    assert failed and failed[0]["hosts_failed"] == [APPS[0]]
    # On the server: the switchover's own line, readable by root and adm only.
    line = host("db2").check_output(f"grep -F '\"run\": \"{switch['run']}\"' /var/log/webstack/audit.log")
    assert json.loads(line)["host"] == "db2"
    assert host("db2").check_output("stat -c '%a %U:%G' /var/log/webstack/audit.log") == "640 root:adm"

"""Application lifecycle commands on the lab: `webstack logs` across servers and `webstack exec`."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid

import pytest

from lab.probe import host, https
from tests.integration.conftest import BIN, MACHINES, ROOT, run, site
from webstack.inventory import load

pytestmark = pytest.mark.lab
APPS = sorted(n for n, m in MACHINES.items() if "app" in m["roles"])
LBS = sorted(n for n, m in MACHINES.items() if "lb" in m["roles"])


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

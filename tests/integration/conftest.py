"""Integration tests against the lab: real Debian machines reached over SSH.

The session starts from freshly built machines (``lab down`` + ``lab up``;
set WEBSTACK_REUSE_LAB=1 to keep the running lab), checks them as fresh
servers, onboards them, converges twice, and records each run's output for
the tests to assert on.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from lab import probe
from lab.probe import KEY, KNOWN_HOSTS, MACHINES, ROOT

BIN = Path(sys.executable).parent
RELEASES = sorted({m["release"] for m in MACHINES.values()})


@dataclass
class Run:
    """One CLI run: its exit code and everything it printed."""

    args: list[str]
    returncode: int
    output: str
    seconds: float

    def totals(self) -> dict[str, str]:
        """pyinfra's 'Grand total' row: hosts, changed, errors, unchanged ('-' for none)."""
        line = next(x for x in self.output.splitlines() if x.strip().startswith("Grand total"))
        cols = re.split(r"\s{2,}|\s+", line.strip().replace("Grand total", "").strip())
        return dict(zip(("hosts", "changed", "error", "no_change"), cols, strict=True))


# WEBSTACK_TEST_TRACE=FILE: every CLI run, wait and lab command of 0.5 s or more is appended to FILE
# with the test that made it (where a slow test spends its time; bench/README.md).
_TRACE = os.environ.get("WEBSTACK_TEST_TRACE")
_CURRENT_TEST = ["session"]


def trace(kind: str, what: str, start: float) -> None:
    seconds = time.monotonic() - start
    if _TRACE and seconds >= 0.5:
        with open(_TRACE, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {seconds:7.1f} {kind:5} {_CURRENT_TEST[0]} {' '.join(what.split())[:160]}\n")


if _TRACE:
    import testinfra.backend.ssh

    _ssh_run = testinfra.backend.ssh.SshBackend.run

    def _traced_ssh_run(self, command, *args, **kwargs):
        start = time.monotonic()
        try:
            return _ssh_run(self, command, *args, **kwargs)
        finally:
            trace("ssh", f"{self.host.name}: {command}", start)

    testinfra.backend.ssh.SshBackend.run = _traced_ssh_run


def run(*args: str, check: bool = True, timeout: int = 1200, env: dict[str, str] | None = None) -> Run:
    """Run a command from the repository root; ``env``: variables added to this process's environment."""
    start = time.monotonic()
    proc = subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)
    trace("run", " ".join(Path(a).name if a.startswith("/") else a for a in args), start)
    result = Run(list(args), proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start)
    if check and proc.returncode != 0:
        errors = [line for line in result.output.splitlines()
                  if "rror" in line or "ERROR" in line or "refus" in line or "failed" in line][:40]
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n" + "\n".join(errors)
                             + f"\n...\n{result.output[-3000:]}")
    return result


def lab(*args: str, check: bool = True) -> Run:
    return run(str(BIN / "python"), "-m", "lab", *args, check=check)


def site(*extra: str, check: bool = True, env: dict[str, str] | None = None) -> Run:
    return run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/site.py", *extra, check=check, env=env)


def ssh_login(address: str, user: str, **kwargs) -> None:
    """Open and close an SSH session, raising paramiko's error when refused."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(KNOWN_HOSTS))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(address, username=user, timeout=10, allow_agent=False, look_for_keys=False, **kwargs)
    finally:
        client.close()


def inventory_copy(tmp_path: Path, app_settings: str = "") -> Path:
    """A copy of the lab inventory the operational deploys may rewrite (--data write_inventory=yes);
    ``app_settings``: YAML lines appended to its group_data/app.yml."""
    inv = tmp_path / "inventories"
    inv.mkdir()
    shutil.copytree(ROOT / "inventories" / "lab", inv / "lab")
    shutil.copy(ROOT / "inventories" / "lab.py", inv / "lab.py")
    if app_settings:
        with open(inv / "lab" / "group_data" / "app.yml", "a") as f:
            f.write(app_settings)
    return inv / "lab.py"


def deploy(inventory: Path, name: str, *args: str, check: bool = True, env: dict[str, str] | None = None):
    return run(str(BIN / "pyinfra"), "-y", str(inventory), f"deploys/{name}.py", *args, check=check, env=env)


def wait_for(predicate, seconds: float, what: str) -> None:
    start = time.monotonic()
    deadline = start + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    trace("wait", what, start)


# Units whose journal a failed test keeps (globs, as journalctl -u takes them).
JOURNAL_UNITS = ("postgresql*", "pgbackrest*", "webstack*", "keepalived*", "nginx*", "app*", "webapp*", "postfix*", "ssh*")
SERVER_LOGS = ("/var/log/postgresql", "/var/log/pgbackrest")


def _journal(name: str, since: float) -> str:
    """The journal of the units above on one machine since ``since`` (epoch), over OpenSSH."""
    units = " ".join(f"-u '{u}'" for u in JOURNAL_UNITS)
    argv = ["ssh", "-F", str(probe.SSH_CONFIG), "-o", "ConnectTimeout=3", f"ops@{MACHINES[name]['address']}",
            f"sudo journalctl --no-pager -o short-precise --since @{int(since)} {units} | tail -n 150; "
            # PostgreSQL on Debian logs to files, not to the journal.
            f"sudo find {' '.join(SERVER_LOGS)} -name '*.log' -newermt @{int(since)} -exec tail -v -n 60 {{}} + 2>/dev/null"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=20)
    except subprocess.TimeoutExpired:
        return "(no answer in 20 s)"
    return proc.stdout.strip() or f"(nothing; ssh exit {proc.returncode}: {proc.stderr.strip()[-200:]})"


_STARTED = pytest.StashKey[float]()
_SESSION_START = time.time()
_KEPT_SETUP: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    item.stash[_STARTED] = time.time()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _CURRENT_TEST[0] = item.nodeid.split("::")[-1]
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed lab test keeps the journal of the units involved on every machine that answers,
    from the test's start: the evidence is gone once a later test powers machines off."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed or "lab" not in item.keywords or report.when not in ("setup", "call"):
        return
    if report.when == "setup":  # a fixture (the lab, the converge): kept once, from the session's start
        if _KEPT_SETUP:
            return
        _KEPT_SETUP.append(item.nodeid)
    since = item.stash.get(_STARTED, _SESSION_START) - 5
    with ThreadPoolExecutor(len(MACHINES)) as pool:
        journals = dict(zip(MACHINES, pool.map(lambda n: _journal(n, since), MACHINES), strict=True))
    keep = Path("/var/lib/webstack-lab/failures") / re.sub(r"[^\w.-]+", "_", item.nodeid)
    keep.mkdir(parents=True, exist_ok=True)
    for name, text in journals.items():
        (keep / f"{name}.journal").write_text(text + "\n")
        report.sections.append((f"journal and logs of {name} since the test started", text))


def pytest_collection_modifyitems(items):
    """The backup tests run last: the final one destroys a whole cluster and restores it elsewhere.
    Before them the patch run, which reboots machines."""
    items.sort(key=lambda item: (item.module.__name__.endswith("test_backup"), item.module.__name__.endswith("test_patch")))


@pytest.fixture(scope="session")
def converged() -> dict[str, object]:
    """Fresh lab → checks as fresh servers → onboarding (site as root) → site again as the admin user."""
    if os.environ.get("WEBSTACK_REUSE_LAB") != "1":
        lab("down")
    up = lab("up")
    run(str(BIN / "python"), "-m", "webstack.labsecrets", "inventories/lab")
    fresh: dict[str, dict[str, bool]] = {}
    for name, machine in MACHINES.items():
        state = {}
        for user in ("root", "ops"):
            try:
                ssh_login(machine["address"], user, key_filename=str(KEY))
                state[user] = True
            except paramiko.AuthenticationException:
                state[user] = False
        fresh[name] = state
    # Onboarding applies site.py to every fresh server (as root); applying it again as the admin user
    # must change nothing.
    onboard = run(str(BIN / "webstack"), "onboard", "inventories/lab")
    again = site()
    return {"up": up, "fresh": fresh, "onboard": onboard, "again": again}


@pytest.fixture(scope="session")
def lab_ready() -> None:
    """The lab's bridge, keys and secrets, for a test that brings its own machines and inventory
    (on-demand machines): the standing machines are booted, not onboarded or converged."""
    lab("up")
    run(str(BIN / "python"), "-m", "webstack.labsecrets", "inventories/lab")


host_for = probe.host


@pytest.fixture(params=sorted(MACHINES), scope="session")
def machine(request, converged):
    return request.param


@pytest.fixture(params=RELEASES, scope="session")
def release_machine(request, converged):
    """One machine per Debian release (from lab/fleet.yml)."""
    return next(n for n, m in MACHINES.items() if m["release"] == request.param)


def drained_on(lb: str, app: str) -> bool:
    """Whether ``app`` is marked down in ``lb``'s nginx site (drained)."""
    from lab.probe import host

    conf = host(lb).check_output("cat /etc/nginx/sites-enabled/webstack.conf")
    return any(line.strip().endswith(f"# {app}") and " down;" in line for line in conf.splitlines())


def release_of(app: str) -> str:
    """The release an application server's ``current`` link points at."""
    from lab.probe import host

    return host(app).check_output("basename $(readlink /srv/webapp/current)")

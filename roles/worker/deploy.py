"""The worker role: the application's background job processes and its scheduled jobs.

A worker host runs the release the application servers run (the same content-hashed
tarball, see roles/app/deploy.py), under ``<app>-worker@1..N`` (``jobs.py work``:
a PostgreSQL queue, see examples/demoapp/README.md). Releases and restarts reach
worker hosts in the rolling step (roles/app/rolling.py), one host at a time and
before the application servers, so a job a new release enqueues is run by code that
knows it. A restart is graceful: SIGTERM lets the current job finish within
``worker__stop_timeout``.

Scheduled jobs get a systemd timer on *every* worker host; webstack-once
(webstack_agent/once.py) lets exactly one of them run each period, so a lost host
loses no run. Application servers never get timers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase, OperationError, deploy
from pyinfra.facts.files import FindFiles
from pyinfra.operations import files, server, systemd

import webstack_agent.once as once_agent
from roles._lib import alert_on_failure, config, install_packages, inventory_file, owed_action, render, unit_file, validated_file
from roles.app.deploy import env_content
from roles.app.settings import AppSettings
from roles.registry import ROLES
from roles.topology import topology
from roles.worker.settings import ScheduledJob, WorkerSettings, calendar_gaps
from webstack.inventory import HostConfig

ONCE = "/usr/local/lib/webstack/webstack-once"
JOB_PREFIX = "webstack-job-"


def app_settings(cfg: HostConfig) -> AppSettings:
    """The application this worker host runs (its own app settings, else the first app server's)."""
    peer = topology(cfg).app_of(cfg.name)
    if peer is None:
        raise OperationError(f"{cfg.name}: a worker host needs an application server in the inventory")
    return peer.settings(AppSettings)


def ca_file(cfg: HostConfig) -> str:
    """Where the provider's CA lands on the server ("" = the system store)."""
    return f"/etc/webstack/{app_settings(cfg).name}-smtp-ca.pem" if cfg.settings(WorkerSettings).smtp_ca else ""


def worker_env(cfg: HostConfig) -> str:
    """The workers' own environment file (no secret in it: the SMTP password is a file of its own)."""
    return render("worker/etc/webstack/worker.env.j2", w=cfg.settings(WorkerSettings), name=app_settings(cfg).name,
                  ca_file=ca_file(cfg))


def unit_content(cfg: HostConfig) -> str:
    return render("worker/etc/systemd/system/worker@.service.j2", name=app_settings(cfg).name,
                  stop_timeout=cfg.settings(WorkerSettings).stop_timeout)


def smtp_password(cfg: HostConfig) -> str:
    w = cfg.settings(WorkerSettings)
    return cfg.secret(f"smtp_password_{w.smtp_user}").unmask() + "\n" if w.smtp_user else ""


def exec_word(text: str) -> str:
    """``text`` as one double-quoted word of a unit's ExecStart, as systemd parses it: C escapes
    (backslash, quote) and its own expansions (``%`` specifiers, ``$VAR``) escaped, so ``sh -c``
    receives the command exactly as the inventory wrote it."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def job_units(cfg: HostConfig, job: ScheduledJob) -> tuple[str, str]:
    """(service, timer) unit files of a scheduled job."""
    verdict = calendar_gaps(job.schedule)
    longest = verdict[2] if verdict and verdict[2] != float("inf") else 31 * 86400
    # A power of two above the longest period: the same number whatever the deploy date (DST shifts
    # a weekly period by an hour), so the unit does not change from one run to the next.
    lookback = 2 ** math.ceil(math.log2(longest * 1.1))
    context = {"name": app_settings(cfg).name, "job": job, "once": ONCE, "lookback": lookback,
               "calendar": exec_word(job.schedule), "command": exec_word(job.command)}
    return (render("worker/etc/systemd/system/job.service.j2", **context),
            render("worker/etc/systemd/system/job.timer.j2", **context))


class WorkerUnits(FactBase):
    """Instance numbers of ``<app>-worker@N.service``: (active ones, enabled ones)."""

    @staticmethod
    def default() -> dict[str, list[int]]:
        return {"active": [], "enabled": []}

    def command(self, app: str) -> str:
        return (f"systemctl list-units --plain --no-legend --state=active '{app}-worker@*.service' | "
                "sed -n 's/^[^@]*@\\([0-9]*\\)[.]service.*/active=\\1/p'; "
                f"ls /etc/systemd/system/multi-user.target.wants/ 2>/dev/null | "
                f"sed -n 's/^{app}-worker@\\([0-9]*\\)[.]service$/enabled=\\1/p'")

    def process(self, output: Sequence[str]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {"active": [], "enabled": []}
        for line in output:
            key, _, value = line.partition("=")
            if key in out and value.isdigit():
                out[key].append(int(value))
        return {k: sorted(v) for k, v in out.items()}


@deploy("Worker")
def apply() -> None:
    """What a worker host needs besides its release: packages, user, the once-per-period runner,
    the scheduled jobs' timers. Releases, environment and worker units: the rolling step."""
    cfg = config()
    app = app_settings(cfg)
    w = cfg.settings(WorkerSettings)
    install_packages("Install the application's Debian packages", ROLES["worker"].packages(cfg))
    server.user(name=f"Service user {app.name}", user=app.name, system=True, home=f"/srv/{app.name}",
                shell="/usr/sbin/nologin")
    files.directory(name="Release directory", path=f"/srv/{app.name}/releases", user="root", group="root", mode="755")
    files.directory(name="/etc/webstack", path="/etc/webstack", mode="755")
    files.directory(name="/usr/local/lib/webstack", path="/usr/local/lib/webstack", mode="755")
    files.put(name=f"Install {ONCE}", src=once_agent.__file__, dest=ONCE, mode="755")
    if w.smtp_ca:
        files.put(name="CA of the mail provider", src=str(inventory_file(cfg, "worker__smtp_ca", w.smtp_ca)),
                  dest=ca_file(cfg), mode="644")

    swaps = []
    wanted = set()
    for job in w.scheduled_jobs:
        service, timer = job_units(cfg, job)
        unit = f"{JOB_PREFIX}{job.name}"
        wanted.update({f"{unit}.service", f"{unit}.timer"})
        swaps.append(validated_file(name=f"Unit {unit}.service", dest=f"/etc/systemd/system/{unit}.service",
                                    content=service, owes="daemon-reload"))
        swaps.append(validated_file(name=f"Unit {unit}.timer", dest=f"/etc/systemd/system/{unit}.timer",
                                    content=timer, owes="daemon-reload"))
    present = host.get_fact(FindFiles, path="/etc/systemd/system", quote_path=True, maxdepth=1,
                            fname=f"{JOB_PREFIX}*") or []
    stale = sorted(Path(p).name for p in present if Path(p).name not in wanted)
    for name in stale:
        if name.endswith(".timer"):
            server.shell(name=f"Stop the timer of a removed job: {name}",
                         commands=[f"systemctl disable --now {name} 2>/dev/null || true"])
        swaps.append(files.file(name=f"Remove {name}", path=f"/etc/systemd/system/{name}", present=False))
    owed_action("daemon-reload", "systemctl daemon-reload", swaps)
    alert_on_failure(f"{app.name}-worker@.service", *(f"{JOB_PREFIX}{j.name}.service" for j in w.scheduled_jobs))
    for job in w.scheduled_jobs:
        systemd.service(name=f"Timer {JOB_PREFIX}{job.name}", service=f"{JOB_PREFIX}{job.name}.timer",
                        running=True, enabled=True)


def switch(cfg: HostConfig, release: str, reasons: Sequence[str], migrate: bool = False) -> None:
    """On the worker host being changed (rolling step): files, release (``migrate``: the database
    migrations first, see roles.app.deploy.use_release), graceful restart, all running."""
    from roles.app.deploy import AppState, prune_releases, use_release

    app = app_settings(cfg)
    w = cfg.settings(WorkerSettings)
    name = app.name
    current = host.get_fact(AppState, app=name)
    # A change to any of them is owed a restart (the plan saw it: reasons "configuration").
    validated_file(name="Environment file (secrets)", dest=f"/etc/webstack/{name}.env",
                   content=env_content(cfg), mode="640", group=name, owes="restart-worker")
    validated_file(name="Worker environment file", dest=f"/etc/webstack/{name}-worker.env",
                   content=worker_env(cfg), mode="640", group=name, owes="restart-worker")
    validated_file(name="SMTP password (secret)", dest=f"/etc/webstack/{name}-smtp.password",
                   content=smtp_password(cfg), mode="640", group=name, owes="restart-worker")
    unit = unit_file(f"{name}-worker@.service", unit_content(cfg), owes="restart-worker",
                     instance=f"{name}-worker@1.service")
    owed_action("daemon-reload", "systemctl daemon-reload", [unit])
    use_release(cfg, app, release, current, migrate=migrate)
    instances = " ".join(f"{name}-worker@{i}" for i in range(1, w.processes + 1))
    units = host.get_fact(WorkerUnits, app=name)
    extra = [i for i in sorted({*units["active"], *units["enabled"]}) if i > w.processes]
    if extra:
        server.shell(name=f"Stop workers beyond {w.processes}", commands=[
            "systemctl disable --now " + " ".join(f"{name}-worker@{i}" for i in extra)])
    # Graceful: SIGTERM, the current job finishes (TimeoutStopSec), then the new release starts.
    restart = bool({"release", "configuration", "owed restart"} & set(reasons))
    server.shell(name=f"{'Restart' if restart else 'Start'} {w.processes} worker(s) of {name}", commands=[
        f"systemctl reset-failed {instances} 2>/dev/null; "
        f"systemctl enable -q {instances} && systemctl {'restart' if restart else 'start'} {instances}"
        f" && rm -f /var/lib/webstack/pending/restart-worker"
    ])
    server.shell(name="Wait until every worker runs", commands=[
        f"for i in $(seq 40); do n=0; for u in {instances}; do systemctl is-active -q $u || n=1; done; "
        "[ $n = 0 ] && exit 0; sleep 0.25; done; "
        f"systemctl --no-pager status {instances} >&2; exit 1"
    ])
    prune_releases(app, release, current)


def wanted_files(cfg: HostConfig) -> dict[str, str]:
    """Path -> content of the files whose change needs a worker restart (the rolling plan compares them)."""
    name = app_settings(cfg).name
    return {f"/etc/webstack/{name}.env": env_content(cfg),
            f"/etc/webstack/{name}-worker.env": worker_env(cfg),
            f"/etc/webstack/{name}-smtp.password": smtp_password(cfg),
            f"/etc/systemd/system/{name}-worker@.service": unit_content(cfg)}

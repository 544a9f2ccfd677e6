"""Checks of the job queue (deploys/check.py) and the dead-letter commands (deploys/jobs.py)."""

from __future__ import annotations

import json
import shlex

from pyinfra import host, logger
from pyinfra.api import OperationError
from pyinfra.operations import python

from roles._lib import config, options, root_shell
from roles.options import JobsOptions
from roles.topology import topology
from roles.worker.deploy import app_settings
from roles.worker.settings import WorkerSettings
from webstack.inventory import HostConfig


def _jobs(cfg: HostConfig, args: str) -> str:
    """``jobs.py ARGS`` of the current release, run by systemd as the application user with the
    environment file read as the units read it (a shell would expand a ``$`` in a password)."""
    name = app_settings(cfg).name
    return (f"systemd-run --quiet --wait --pipe --collect --uid={name} --gid={name} "
            f"-p EnvironmentFile=/etc/webstack/{name}.env -p WorkingDirectory=/srv/{name}/current "
            f"/usr/bin/python3 jobs.py {args}")


def _first_worker_in_run(cfg: HostConfig) -> bool:
    """One worker host answers for the queue (it is one queue in the database, however many hosts)."""
    from pyinfra import inventory, state

    for peer in topology(cfg).workers():
        other = inventory.get_host(peer.name, default=None)
        if other is not None and other in state.active_hosts:
            return peer.name == cfg.name
    return False


def queue() -> None:
    """Fail when the queue is deeper, older or has more dead letters than ``worker__max_*`` allow."""
    cfg = config()
    if "worker" not in cfg.roles or not _first_worker_in_run(cfg):
        host.noop("the queue is checked from the first worker host of the run")
        return
    w = cfg.settings(WorkerSettings)

    def report() -> None:
        ok, out = root_shell(host, _jobs(cfg, "stats"))
        if not ok:
            raise OperationError(f"{cfg.name}: jobs.py stats failed: {out.stderr}")
        stats = json.loads(out.stdout)
        age = float(stats.get("oldest_ready_age") or 0)
        logger.info(f"    [{cfg.name}] queue: {stats['ready']} ready, {stats['waiting']} waiting for a retry, {stats['running']} "
                  f"running, {stats['dead']} dead; oldest ready job waited {age:.1f} s")
        breaches = []
        if stats["ready"] > w.max_queue_depth:
            breaches.append(f"{stats['ready']} jobs ready (worker__max_queue_depth {w.max_queue_depth})")
        if age > w.max_queue_age:
            breaches.append(f"oldest ready job waited {age:.0f} s (worker__max_queue_age {w.max_queue_age})")
        if stats["dead"] > w.max_dead:
            breaches.append(f"{stats['dead']} dead-lettered jobs (worker__max_dead {w.max_dead}); "
                            "list them: deploys/jobs.py, re-queue: --data requeue=ID")
        if breaches:
            raise OperationError(f"{cfg.name}: queue: " + "; ".join(breaches))

    python.call(name="Job queue within thresholds", function=report)


def dead_letters() -> None:
    """List the dead-lettered jobs; with ``--data requeue=ID`` (or ``all``) put them back in the queue."""
    cfg = config()
    if "worker" not in cfg.roles or not _first_worker_in_run(cfg):
        host.noop("dead letters are handled from the first worker host of the run")
        return
    requeue = options(JobsOptions).requeue

    def run() -> None:
        if requeue:
            target = "--all" if requeue == "all" else " ".join(shlex.quote(i) for i in requeue.split(","))
            ok, out = root_shell(host, _jobs(cfg, f"requeue {target}"))
            if not ok:
                raise OperationError(f"{cfg.name}: requeue failed: {out.stderr}")
            logger.info(f"    [{cfg.name}] re-queued: {out.stdout.strip() or requeue}")
        ok, out = root_shell(host, _jobs(cfg, "dead"))
        if not ok:
            raise OperationError(f"{cfg.name}: jobs.py dead failed: {out.stderr}")
        lines = [line for line in out.stdout.splitlines() if line.strip()]
        logger.info(f"    [{cfg.name}] {len(lines)} dead-lettered job(s)")
        for line in lines:
            logger.info(f"    [{cfg.name}] {line}")

    python.call(name="Re-queue and list dead-lettered jobs" if requeue else "List dead-lettered jobs", function=run)

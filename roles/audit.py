"""The deploy audit trail: who ran which deploy, from which commit, what it changed, how it ended.

Every deploy that changes servers ends with ``audit.record("<deploy>")``:

- on each server where an operation of the run changed something, a JSON line is appended to
  ``/var/log/webstack/audit.log`` (0640 root:adm) by the run's last operation there;
- on the control machine, when pyinfra exits, one JSON line for the whole run (every host it
  changed, every host that failed, ``outcome`` ok or failed) is appended to
  ``~/.local/state/webstack/audit/<inventory>.jsonl``.

Both carry the same ``run`` id, the time, the deploy, the operator (local user) and the admin
login, the repository's commit and whether its tracked files had changes, the ``--data``
options and what the deploy noted (``note``: the release rolled out, the new primary...).
``webstack audit inventories/<env>`` merges them, newest first. No secret is recorded: options
are the operator's own command line, notes are ids and host names.
"""

from __future__ import annotations

import atexit
import getpass
import json
import shlex
import subprocess
import uuid
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from gevent.lock import Semaphore
from pyinfra import host, inventory, state
from pyinfra.context import ctx_state
from pyinfra.operations import server

from roles._lib import config
from webstack.auditlog import SERVER_LOG, control_log
from webstack.options import command_line

ROOT = Path(__file__).resolve().parent.parent
RUN = uuid.uuid4().hex[:12]
_NOTES: dict[str, Any] = {}
_REGISTERED: list[str] = []
# Every host's deploy asks for the run's line at once (greenlets): the first computes it, the
# others wait for it. Without this each one that came while the first's git ran started its own
# two: 30 git processes per run of 37 hosts, a fifth of the control machine's CPU.
_BASE_LOCK = Semaphore()


def reset() -> None:
    """A new run in this process (tests prepare several)."""
    global RUN
    RUN = uuid.uuid4().hex[:12]
    _NOTES.clear()
    _REGISTERED.clear()
    _base_once.cache_clear()


def note(key: str, value: Any) -> None:
    """Something the run did worth recording (ids and names only, never a secret)."""
    _NOTES[key] = value


def _git() -> tuple[str, bool]:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def _options() -> dict[str, str]:
    """The run's ``--data`` options as given (the pyinfra command line)."""
    return command_line()["data"]


def _base(deploy: str) -> dict[str, Any]:
    with _BASE_LOCK:
        return _base_once(deploy)


@cache
def _base_once(deploy: str) -> dict[str, Any]:
    commit, dirty = _git()
    return {"run": RUN, "at": datetime.now(UTC).isoformat(timespec="seconds"), "deploy": deploy,
            "operator": getpass.getuser(), "commit": commit, "dirty": dirty, "options": _options()}


def _changed_ops(target: Any, run_state: Any = state) -> int:
    ops = run_state.ops.get(target, {})
    return sum(1 for d in ops.values() if d.operation_meta.is_complete() and d.operation_meta.did_change())


def record(deploy: str) -> None:
    """The last operation of a deploy on every host, and the run's line on the control machine at exit."""
    cfg = config()
    env = Path(cfg.inventory_dir).name
    base = _base(deploy)
    login = str(host.data.get("ssh_user") or "root")

    target = inventory.get_host(cfg.name)
    line = json.dumps({**base, "host": cfg.name, "login": login, "notes": dict(_NOTES)}, sort_keys=True)
    # Only where an operation of this run changed something (decided when it runs; skipped, no change, else).
    server.shell(name="Audit trail", _if=lambda: _changed_ops(target) > 0, commands=[
        f"install -d -m 750 -g adm /var/log/webstack && printf '%s\\n' {shlex.quote(line)} >> {SERVER_LOG} "
        f"&& chgrp adm {SERVER_LOG} && chmod 640 {SERVER_LOG}"])
    if _REGISTERED:
        return
    _REGISTERED.append(deploy)
    real_state = ctx_state.get()  # the object itself: pyinfra's context is unset by the time we exit

    def at_exit() -> None:
        changed, failed = [], sorted(h.name for h in real_state.failed_hosts)
        for target in real_state.inventory:
            if _changed_ops(target, real_state):
                changed.append(target.name)
        if not changed and not failed:
            return  # nothing happened (a dry run, or nothing to do)
        path = control_log(env)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        line = {**base, "login": login, "hosts_changed": changed, "hosts_failed": failed, "notes": dict(_NOTES),
                "outcome": "failed" if failed else "ok", "finished": datetime.now(UTC).isoformat(timespec="seconds")}
        with open(path, "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")

    atexit.register(at_exit)

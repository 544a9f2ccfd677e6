"""Rollout hooks: commands of the inventory (``app__pre_rollout_hook``, ``app__post_rollout_hook``)
run on the control machine, once per run, when the run switches a release.

The pre hook runs while the run is prepared, before any server is touched: if it fails, the
run stops there. The post hook runs when pyinfra exits, if no host of the rollout failed.
Both get ``WEBSTACK_RELEASE`` (the release rolled out), ``WEBSTACK_PREVIOUS_RELEASE`` (the one
it replaces), ``WEBSTACK_INVENTORY`` (the inventory's name) and ``WEBSTACK_DEPLOY`` (site,
rollout, rollback). Neither runs for ``--dry``.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pyinfra.api import OperationError
from pyinfra.context import ctx_state

from roles._lib import dry_run
from roles.app.settings import AppSettings
from webstack.inventory import HostConfig
from webstack.options import command_line

_DONE: list[str] = []


def _deploy() -> str:
    deploys = command_line()["deploys"]
    return deploys[0] if deploys else ""


def around(cfg: HostConfig, app: AppSettings, release: str, previous: str, involved: Callable[[], bool]) -> None:
    """Run the pre hook now (once per run) and the post hook at exit if ``involved()`` says no host of
    the rollout failed."""
    if _DONE or dry_run() or not (app.pre_rollout_hook or app.post_rollout_hook):
        return
    _DONE.append(release)
    env = {**os.environ, "WEBSTACK_RELEASE": release, "WEBSTACK_PREVIOUS_RELEASE": previous,
           "WEBSTACK_INVENTORY": Path(cfg.inventory_dir).name, "WEBSTACK_DEPLOY": _deploy()}
    if app.pre_rollout_hook:
        done = subprocess.run(["sh", "-c", app.pre_rollout_hook], env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise OperationError(f"the pre-rollout hook `{app.pre_rollout_hook}` exited {done.returncode}: the "
                                 f"rollout of {release} stopped before any server was touched\n"
                                 f"{(done.stdout + done.stderr).strip()[-1000:]}")
    if app.post_rollout_hook:
        state = ctx_state.get()

        def after() -> None:
            if state is None or not involved():
                print(f"webstack: the post-rollout hook was not run: the rollout of {release} failed", file=sys.stderr)
                return
            rc = subprocess.run(["sh", "-c", app.post_rollout_hook], env=env, timeout=600).returncode
            if rc != 0:
                print(f"webstack: the post-rollout hook `{app.post_rollout_hook}` exited {rc}", file=sys.stderr)

        atexit.register(after)


def reset() -> None:
    _DONE.clear()

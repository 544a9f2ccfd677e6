"""Settings of the app role: a WSGI application under gunicorn (keys ``app__<field>``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from webstack.settings import setting


@dataclass(frozen=True)
class AppSettings:
    """A stateless application server; releases switch atomically."""

    name: str = setting("webapp", "application name (user, unit, paths)")
    source: str = setting("examples/demoapp", "path of the WSGI application in this repository")
    git_ref: str = setting("", "deploy this git ref of `source` instead of the working tree (tag, branch, commit)")
    module: str = setting("app:application", "WSGI entry point, module:callable")
    port: int = setting(8000, "port gunicorn listens on (the load balancers connect to it)")
    workers: int = setting(3, "gunicorn worker processes")
    keep_releases: int = setting(5, "releases kept on disk for rollback")
    packages: tuple[str, ...] = setting(("python3-psycopg2",), "Debian packages the application imports (installed without "
                                                        "their Recommends: name those it needs, e.g. libjs-jquery for "
                                                        "Django's admin)")
    database: str = setting("app", "database (from postgres__databases) whose URL goes in DATABASE_URL")
    health_path: str = setting("/healthz", "path that answers 200 when the server can serve")
    health_timeout: int = setting(60, "seconds a switched server has to answer its health check with the new "
                                      "release before the rollout stops there")
    migrate_command: str = setting(
        "", "shell command that migrates the database schema (e.g. `python3 -m migrate`): run once per release, "
        "on one host, in the new release with the app's environment, before any server switches")

    pre_rollout_hook: str = setting(
        "", "shell command on the control machine before a release rolls out (env: WEBSTACK_RELEASE, "
        "WEBSTACK_PREVIOUS_RELEASE, WEBSTACK_INVENTORY, WEBSTACK_DEPLOY); failing, it stops the rollout")
    post_rollout_hook: str = setting(
        "", "shell command on the control machine after a release rolled out everywhere (same environment)")

    def check(self) -> tuple[str, str] | None:
        """Field-level consistency; returns (key, message) on a problem."""
        if not re.match(r"^[a-z][a-z0-9-]{0,30}$", self.name):
            return "name", f"not a usable name: {self.name!r}"
        if not re.match(r"^[\w.]+:\w+$", self.module):
            return "module", f"expected module:callable, got {self.module!r}"
        if self.keep_releases < 2:
            return "keep_releases", "keep at least 2 (the current one and one to roll back to)"
        return None

"""Rolling changes of application servers, one at a time, drained from every load balancer.

``converge()`` runs on every application server and load balancer of the run
(site.py calls it after the roles). All of them compute the same plan from
cross-host facts: which servers need a new release, a restart (environment or
unit changed, or a restart owed by a failed run) or a start. For each such
server in turn: the load balancers render nginx with it marked ``down`` and
reload (graceful), the server switches and reloads or restarts, waits until
its health check answers with the new release, and the load balancers put it
back. ``barrier`` operations keep the steps in order across hosts.

A server that fails (its health check, say: a bad release, or the database down,
since ``/healthz`` queries it) stops the rollout there: it stays drained on every
load balancer (``/srv/<app>/unverified`` holds the release it switched to until
its health check passes, and keeps it drained in later runs too), no later server
is touched (every later operation is skipped, ``_if``), the others keep serving
their release, and the error says how to roll the failed server back. A drain
that would leave no server in rotation (``lb__drained`` counts) is refused
before anything is touched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from pyinfra import host, inventory, state
from pyinfra.api import Host, OperationError, deploy
from pyinfra.facts.files import Sha1File
from pyinfra.operations import files, server

from roles import audit
from roles._lib import PendingActions, barrier, config, dry_run, fact_lock, owed_action, unit_file, validated_file
from roles.app import hooks
from roles.app.deploy import AppState, build_release, env_content, prune_releases, socket_content, unit_content, use_release
from roles.app.settings import AppSettings
from roles.base.deploy import codename
from roles.lb.deploy import nginx_site
from roles.lb.settings import LbSettings
from roles.topology import topology
from roles.worker import deploy as worker
from roles.worker.settings import WorkerSettings
from webstack.inventory import HostConfig


@dataclass(frozen=True)
class Step:
    """One application server's change: what it needs and why."""

    host: str
    release: str
    reasons: tuple[str, ...]
    worker: bool = False
    previous: str = ""  # the release it runs now (the way back if the new one fails)
    migrate: bool = False  # the first server to switch release runs the migrations first


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _wanted_release(cfg: HostConfig, current: dict, requested: str) -> str:
    """The release a server should run: ``requested`` (an id or "previous"), else the build."""
    if requested == "previous":
        earlier = [r for r in current["history"] if r != current["current"] and r in current["releases"]]
        if not earlier:
            raise OperationError(f"{cfg.name}: no earlier release on disk to roll back to")
        return earlier[-1]
    if requested:
        return requested
    app = worker.app_settings(cfg)  # a worker host runs the application servers' release
    return build_release(app.source, app.git_ref)[0]


def plan(requested: str = "") -> list[Step]:
    """Every worker host, then every application server, of the run that needs a change, in inventory
    order. Workers go first: a job enqueued by the new release must find workers that know it."""
    steps = []
    me = config()
    # A host with both roles (stage 1 on one box) has a worker step and an application step.
    top = topology(me)
    for peer, is_worker in [*((p, True) for p in top.workers()), *((p, False) for p in top.app_servers())]:
        other = inventory.get_host(peer.name, default=None)
        if other is None or other not in state.active_hosts:
            continue
        cfg = config(other)
        # Every lb, app and worker host of the run asks the same facts of ``other`` at once; one
        # at a time, so the rest read pyinfra's cache (see roles._lib.peer_fact).
        with fact_lock(peer.name):
            step = _step(other, cfg, peer.name, is_worker, requested)
        if step:
            steps.append(step)
    return steps


def _step(other: Host, cfg: HostConfig, name: str, is_worker: bool, requested: str) -> Step | None:
    """The change host ``other`` needs, from its facts; None when it needs none."""
    wanted: dict[str, str | None]  # path -> content, None: absent
    if is_worker:
        app = worker.app_settings(cfg).name
        wanted = dict(worker.wanted_files(cfg))
        owed = "restart-worker"
    else:
        app = cfg.settings(AppSettings).name
        wanted = {f"/etc/webstack/{app}.env": env_content(cfg),
                  f"/etc/systemd/system/{app}.service": unit_content(cfg),
                  f"/etc/systemd/system/{app}.socket": socket_content(cfg)}
        owed = "restart-app"
    current = other.get_fact(AppState, app=app)
    release = _wanted_release(cfg, current, requested)
    reasons = []
    if current["current"] != release:
        reasons.append("release")
    if any(other.get_fact(Sha1File, path=path) != (None if text is None else _sha(text))
           for path, text in wanted.items()):
        reasons.append("configuration")
    if owed in other.get_fact(PendingActions):
        reasons.append("owed restart")
    if is_worker:
        units = other.get_fact(worker.WorkerUnits, app=app)
        count = cfg.settings(WorkerSettings).processes
        if units["active"] != list(range(1, count + 1)) or units["enabled"] != units["active"]:
            reasons.append("not running")
    elif not current["active"]:
        reasons.append("not running")
    if not is_worker and current["unverified"]:
        reasons.append("unhealthy")
    if reasons:
        previous = next((r for r in reversed(current["history"]) if r != current["unverified"]), "")
        return Step(name, release, tuple(reasons), is_worker, previous)
    return None




def _switch(cfg: HostConfig, step: Step) -> None:
    """On the server being changed: files, release, reload or restart, health, pruning."""
    app = cfg.settings(AppSettings)
    name = app.name
    current = host.get_fact(AppState, app=name)
    env = validated_file(name="Environment file (secrets)", dest=f"/etc/webstack/{name}.env",
                         content=env_content(cfg), mode="640", group=name, owes="restart-app")
    service, socket = unit_content(cfg), socket_content(cfg)
    socket_path = f"/etc/systemd/system/{name}.socket"
    if socket is not None:
        unit = unit_file(f"{name}.service", service, owes="restart-app", beside={f"{name}.socket": socket})
        sock = unit_file(f"{name}.socket", socket, owes="restart-app-socket", beside={f"{name}.service": service})
    else:
        # From one application server to several: the socket goes (roles.app.deploy.holds_socket).
        # Stopping it stops the service too (Requires=); the restart below starts it on its own port.
        if host.get_fact(Sha1File, path=socket_path) is not None:
            server.shell(name=f"Stop {name}.socket (no longer the only application server)",
                         commands=[f"systemctl disable -q --now {name}.socket"])
        unit = unit_file(f"{name}.service", service, owes="restart-app")
        sock = files.file(name=f"No {name}.socket", path=socket_path, present=False)
    owed_action("daemon-reload", "systemctl daemon-reload", [unit, sock])
    # Until its health check passes, the server is kept drained by every run (roles.lb.deploy.not_serving).
    mark = (f"echo {step.release} > /srv/{name}/unverified.new && mv -f /srv/{name}/unverified.new "
            f"/srv/{name}/unverified")
    if current["current"] == step.release:  # a restart or reload only: marked all the same
        server.shell(name=f"Mark release {step.release} unverified", commands=[mark])
    use_release(cfg, app, step.release, current, migrate=step.migrate, before_switch=mark)
    if socket is not None:
        # A lone server: systemd holds the listening socket, so while gunicorn restarts connections
        # wait in its backlog instead of being refused. A changed socket is bound again with the
        # service stopped (the port may still be the service's own).
        owed_action("restart-app-socket", f"systemctl stop {name} && systemctl enable -q {name}.socket && "
                                          f"systemctl restart {name}.socket", [sock])
    if "configuration" in step.reasons or "owed restart" in step.reasons or not current["active"]:
        owed_action("restart-app", f"systemctl enable -q {name} && systemctl restart {name}", [env, unit, sock])
    else:
        server.shell(name=f"Graceful reload of {name} (gunicorn HUP)", commands=[f"systemctl reload {name}"])
    top = topology(cfg)
    lbs = [lb.name for lb in top.load_balancers() if any(u.name == cfg.name for u in top.upstreams(lb.name))]
    limits = " ".join(f"--limit {n}" for n in [cfg.name, *lbs])
    back = (f"roll it back with: pyinfra <inventory> deploys/rollback.py {limits} --data release={step.previous}"
            if step.previous else "fix the release and run the rollout again")
    server.shell(name=f"Wait until {name} serves release {step.release}", commands=[
        f"for i in $(seq {app.health_timeout * 2}); do python3 -c \"import sys, urllib.request as u; "
        f"r = u.urlopen('http://127.0.0.1:{app.port}{app.health_path}', timeout=2); "
        f"sys.exit(0 if r.headers.get('X-Release') == '{step.release}' else 1)\" 2>/dev/null && "
        f"rm -f /srv/{name}/unverified && exit 0; sleep 0.5; done; "
        f"echo '{cfg.name} is not healthy with release {step.release} after {app.health_timeout} s: the rollout "
        "stopped here; "
        f"{cfg.name} stays drained, no later server was touched; {back}' >&2; exit 1"
    ])
    prune_releases(app, step.release, current)


def converge(release: str = "") -> None:
    """Apply the plan, one application server at a time (no-op when nothing changes).

    ``release``: a release id or "previous" instead of the one built from the
    working tree (the deploys pass their ``--data release`` option).
    """
    cfg = config()
    if not {"app", "lb", "worker"} & set(cfg.roles):
        return
    steps = plan(release)
    if not steps:
        host.noop("application servers are up to date")
        return
    audit.note("releases", {s.host: s.release for s in steps})
    app_servers = topology(cfg).app_servers()
    distro = codename() if "lb" in cfg.roles else ""
    # Servers not running yet (being added) joined the load balancers drained: they start first,
    # and stay drained until their own step puts them in, so draining another server never
    # leaves only them in rotation.
    new = [s for s in steps if not s.worker and {"not running", "unhealthy"} & set(s.reasons)]
    steps = [*(s for s in steps if s.worker), *new, *(s for s in steps if not s.worker and s not in new)]
    # Migrations: once per release, on the first server to switch to it, before its switch (so before
    # any server's: a failure there stops the run, nothing switched). Expand/contract: the old
    # release keeps running against the new schema while the others roll.
    first = next((i for i, s in enumerate(steps) if "release" in s.reasons), None)
    if first is not None:
        steps[first] = replace(steps[first], migrate=True)
    involved = {p.name for p in [*app_servers, *topology(cfg).workers()]} | {
        h.name for h in state.active_hosts if "lb" in config(h).roles}

    def go() -> bool:  # nothing further once a host of the rollout failed
        return not any(h.name in involved for h in state.failed_hosts)

    switching = [s for s in steps if "release" in s.reasons]
    if switching and app_servers:
        hooks.around(cfg, app_servers[0].settings(AppSettings), switching[0].release, switching[0].previous, go)

    for i, step in enumerate(host.loop(steps)):
        # With a single application server there is nothing to drain to; workers take no requests.
        drain = len(app_servers) > 1 and not step.worker
        waiting = [s.host for s in steps[i + 1:] if s in new]
        if "lb" in cfg.roles and drain and step not in new:  # one being added or kept out is not in rotation
            out = {*cfg.settings(LbSettings).drained, *waiting, step.host}
            if not [p for p in app_servers if p.name not in out]:
                raise OperationError(
                    f"{cfg.name}: draining {step.host} would leave no application server in rotation "
                    f"(drained: {', '.join(sorted(out))}; lb__drained counts): nothing was changed")
        # ``_if`` only for real: under --dry (drift) the step's operations must be prepared to be seen.
        if dry_run():
            _step_of_the_roll(cfg=cfg, step=step, drain=drain, waiting=waiting, distro=distro)
        else:
            _step_of_the_roll(cfg=cfg, step=step, drain=drain, waiting=waiting, distro=distro, _if=[go])


@deploy("Rolling step")
def _step_of_the_roll(cfg: HostConfig, step: Step, drain: bool, waiting: list[str], distro: str) -> None:
    """Every host's operations for one server's change: drain, switch, health, put back."""
    early = step.migrate and not step.worker and "not running" not in step.reasons
    if early and cfg.name == step.host:
        # A serving application server migrates before it is drained: a failed migration leaves
        # every server serving, and in rotation. (A server being added does it after its files.)
        app = cfg.settings(AppSettings)
        use_release(cfg, app, step.release, host.get_fact(AppState, app=app.name), migrate=True, switch=False)
    if early:
        barrier(name=f"Database migrated for release {step.release}", label=step.host)
    if "lb" in cfg.roles and drain:
        site = nginx_site(cfg, distro, [*cfg.settings(LbSettings).drained, *waiting, step.host], force=True,
                          name=f"Drain {step.host} ({', '.join(step.reasons)})")
        owed_action("reload-nginx", "nginx -t -q && systemctl reload nginx", [site])
    barrier(name=f"{step.host} drained", label=step.host)
    if cfg.name == step.host:
        if step.worker:
            worker.switch(cfg, step.release, step.reasons, migrate=step.migrate)
        else:
            _switch(cfg, replace(step, migrate=step.migrate and not early))
    barrier(name=f"{step.host} switched", label=step.host)
    if "lb" in cfg.roles and drain:
        site = nginx_site(cfg, distro, [*cfg.settings(LbSettings).drained, *waiting], force=True,
                          name=f"Put {step.host} back")
        owed_action("reload-nginx", "nginx -t -q && systemctl reload nginx", [site])
    barrier(name=f"{step.host} back in rotation", label=step.host)

"""The app role: a WSGI application under Debian's gunicorn, released without downtime.

A release is the application directory packed on the control machine into a
reproducible tarball named by its content hash (from the working tree, or from
a git ref). Servers keep releases under /srv/<app>/releases/<id> with an atomic
``current`` link and the last ``keep_releases`` of them. Changes roll out one
server at a time: the server is drained from every load balancer (nginx
reload), switched, reloaded (gunicorn HUP, graceful) or restarted, checked
healthy, and put back. Dependencies come from Debian packages; servers never
need PyPI.
"""

from __future__ import annotations

import hashlib
import io
import shlex
import subprocess
import tarfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase, OperationError, deploy, operation
from pyinfra.api.command import FileUploadCommand, StringCommand
from pyinfra.operations import files, server

from roles._lib import config, install_packages, render
from roles.app.settings import AppSettings
from roles.postgres import certs
from roles.registry import ROLES
from roles.topology import topology
from webstack.inventory import HostConfig

ROOT = Path(__file__).resolve().parents[2]


@cache
def build_release(source: str, git_ref: str = "") -> tuple[str, bytes]:
    """(release id, tar.gz bytes) of the application; same content, same id."""
    if git_ref:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", git_ref, "--", source],
                             capture_output=True, check=False)
        if tar.returncode != 0:
            raise OperationError(f"app__git_ref {git_ref!r}: {tar.stderr.decode().strip()}")
        members = tarfile.open(fileobj=io.BytesIO(tar.stdout))
        entries = [(m.name[len(source.rstrip('/')) + 1:], members.extractfile(m).read())  # type: ignore[union-attr]
                   for m in members.getmembers() if m.isfile()]
    else:
        base = ROOT / source
        if not base.is_dir():
            raise OperationError(f"app__source: {base} is not a directory")
        entries = [(str(p.relative_to(base)), p.read_bytes()) for p in sorted(base.rglob("*"))
                   if p.is_file() and "__pycache__" not in p.parts]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=6) as tar_out:
        for name, data in sorted(entries):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar_out.addfile(info, io.BytesIO(data))
    digest = hashlib.sha256(b"".join(n.encode() + b"\0" + hashlib.sha256(d).digest() for n, d in sorted(entries)))
    return digest.hexdigest()[:12], out.getvalue()


class AppState(FactBase):
    """The deployed release (target of ``current``), releases on disk (oldest first), the
    switch history (oldest first), whether the service is active, and the release a rolling
    step switched to whose health check has not passed yet (``unverified``: the load balancers
    keep such a server drained, see roles.lb.deploy.not_serving)."""

    def command(self, app: str) -> str:
        return (f"echo current=$(basename \"$(readlink /srv/{app}/current 2>/dev/null)\"); "
                f"ls -1tr /srv/{app}/releases 2>/dev/null | sed 's/^/release=/'; "
                f"tail -n 50 /srv/{app}/history 2>/dev/null | sed 's/^/history=/'; "
                f"echo active=$(systemctl is-active {app} 2>/dev/null); "
                f"echo unverified=$(cat /srv/{app}/unverified 2>/dev/null)")

    def process(self, output: Sequence[str]) -> dict:
        out: dict = {"current": None, "releases": [], "history": [], "active": False, "unverified": ""}
        for line in output:
            key, _, value = line.partition("=")
            if key == "current":
                out["current"] = value or None
            elif key == "release" and value:
                out["releases"].append(value)
            elif key == "history" and value:
                out["history"].append(value)
            elif key == "active":
                out["active"] = value == "active"
            elif key == "unverified":
                out["unverified"] = value
        return out


def database_url(cfg: HostConfig) -> str:
    """libpq connection string to the cluster that holds ``app__database`` (read-write member)."""
    top = topology(cfg)
    found = top.app_database(cfg.name)
    if found is None:
        raise OperationError(f"app__database {cfg.settings(AppSettings).database!r}: no postgres host has this database")
    db = found.database
    hosts = [p.address for p in top.cluster(found.cluster)]
    password = cfg.secret(f"postgres_password_{db.owner}").unmask().replace("\\", "\\\\").replace("'", "\\'")
    return (f"host={','.join(hosts)} dbname={db.name} user={db.owner} password='{password}' "
            f"{certs.client_options(found.cluster)} target_session_attrs=read-write connect_timeout=3")


def env_content(cfg: HostConfig) -> str:
    """The service's environment file (secrets inside: 0640 root:<app>); the same for every release."""
    def quote(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return render("app/etc/webstack/app.env.j2", database_url=quote(database_url(cfg)),
                  secret_key=quote(cfg.secret("app_secret_key").unmask()))


def holds_socket(cfg: HostConfig) -> bool:
    """Whether systemd holds the application's listening socket (``app.socket``): only for a lone
    application server (stage 1). A restart then queues connections instead of refusing them, and
    there is no other server to send them to. With two or more, a restart is drained first, and a
    server that dies must refuse connections so the load balancers try the next at once: a socket
    held open by systemd would take them and leave them waiting for the restart."""
    return len(topology(cfg).app_servers()) == 1


def unit_content(cfg: HostConfig) -> str:
    app = cfg.settings(AppSettings)
    return render("app/etc/systemd/system/app.service.j2", name=app.name, port=app.port, workers=app.workers,
                  module=app.module, socket=holds_socket(cfg))


def socket_content(cfg: HostConfig) -> str | None:
    """The listening socket systemd holds for a lone application server; None: no socket unit."""
    if not holds_socket(cfg):
        return None
    app = cfg.settings(AppSettings)
    return render("app/etc/systemd/system/app.socket.j2", name=app.name, port=app.port)


@deploy("Application server")
def apply() -> None:
    """What an application server needs before its first release: packages, user, directories."""
    cfg = config()
    app = cfg.settings(AppSettings)
    install_packages("Install gunicorn and the application's Debian packages", ROLES["app"].packages(cfg))
    server.user(name=f"Service user {app.name}", user=app.name, system=True, home=f"/srv/{app.name}",
                shell="/usr/sbin/nologin")
    files.directory(name="Release directory", path=f"/srv/{app.name}/releases", user="root", group="root", mode="755")
    files.directory(name="/etc/webstack", path="/etc/webstack", mode="755")


@operation()
def install_release(app: str, release: str, tarball: bytes):
    """Unpack a release into /srv/<app>/releases/<release> unless it is there.

    + app: application name
    + release: release id
    + tarball: the release's tar.gz
    """
    have = host.get_fact(AppState, app=app)
    if release in have["releases"]:
        host.noop(f"release {release} is on disk")
        return
    tmp = f"/srv/{app}/releases/.{release}.tar.gz"
    yield FileUploadCommand(io.BytesIO(tarball), tmp)
    # Checked again when it runs: an earlier operation of the same run may have put it there.
    yield StringCommand(f"d=/srv/{app}/releases/{release}; if [ ! -d $d ]; then rm -rf $d.new && mkdir $d.new && "
                        f"tar -xzf {tmp} -C $d.new && chmod -R a+rX $d.new && mv $d.new $d; fi && rm -f {tmp}")


def migrate_command(app: AppSettings, release: str) -> str:
    """The application's ``migrate_command`` in ``release`` (its code, not the running one's) with the
    application's environment, as its user, in a transient unit ``<app>-migrate-<release>`` (the journal
    keeps its output); once per release: a marker in the release directory records success."""
    d = f"/srv/{app.name}/releases/{release}"
    run = shlex.join([
        "systemd-run", "--quiet", "--wait", "--collect", "--pipe", f"--unit={app.name}-migrate-{release}",
        "-p", f"User={app.name}", "-p", f"Group={app.name}", "-p", f"EnvironmentFile=/etc/webstack/{app.name}.env",
        "-p", f"WorkingDirectory={d}", "-E", f"PYTHONPATH={d}", "--", "sh", "-c", app.migrate_command])
    failed = (f"the migration of release {release} ({app.migrate_command}) failed: no server was switched, "
              "the running release keeps serving")
    return f"test -e {d}/.migrated || {{ {run} && touch {d}/.migrated; }} || {{ echo {shlex.quote(failed)} >&2; exit 1; }}"


def use_release(cfg: HostConfig, app: AppSettings, release: str, current: dict, migrate: bool = False,
                before_switch: str = "", switch: bool = True) -> None:
    """Put ``release`` on disk (only the one built here can be uploaded) and point ``current`` at it,
    recording the switch in the history (rollbacks read it). ``current``: the host's AppState.
    ``migrate``: run the application's migrations in the new release first (the rolling step's
    first server); ``before_switch``: a shell command run right before the switch; ``switch=False``:
    stop before it (the release on disk, migrated)."""
    if release not in current["releases"]:
        built = build_release(app.source, app.git_ref)
        if release != built[0]:
            raise OperationError(f"{cfg.name}: release {release} is not on this server")
        install_release(name=f"Release {release}", app=app.name, release=release, tarball=built[1])
    if migrate and app.migrate_command and current["current"] != release:
        server.shell(name=f"Migrate the database for release {release} (once, here)",
                     commands=[migrate_command(app, release)])
    if not switch:
        return
    if before_switch and current["current"] != release:
        server.shell(name=f"Before the switch to {release}", commands=[before_switch])
    if current["current"] != release:
        server.shell(name=f"Switch current -> {release}", commands=[
            f"ln -sfn releases/{release} /srv/{app.name}/current.new && "
            f"mv -T /srv/{app.name}/current.new /srv/{app.name}/current && echo {release} >> /srv/{app.name}/history"
        ])


def prune_releases(app: AppSettings, release: str, current: dict) -> None:
    """Keep ``release`` and the newest others by last use (history; never-used ones by age), up to
    ``app__keep_releases`` in all; remove the rest. ``current``: the host's AppState before the switch."""
    order = dict.fromkeys([*reversed(current["history"]), *reversed(current["releases"])])
    recent = [r for r in order if r in current["releases"] and r != release]
    keep = {release, *recent[:app.keep_releases - 1]}
    for old in current["releases"]:
        if old not in keep:
            server.shell(name=f"Prune release {old}", commands=[f"rm -rf /srv/{app.name}/releases/{old}"])

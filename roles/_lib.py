"""Shared building blocks for roles: templates, validated swaps, owed actions.

The pattern every configuration file with a validator follows:

1. render the template on the control machine (``render``);
2. ``validated_file`` compares the wanted content with the server's file by
   SHA-1; when they differ it uploads to a staging path next to the target,
   runs the validator (``nginx -t``, ``sshd -t``, ``visudo -c``...) on the
   staged file, and only if that passes moves it into place atomically, and
   records an owed action (a marker under ``/var/lib/webstack/pending``);
3. ``owed_action`` runs the reload/restart when a swap happened in this run
   OR a marker was left by an earlier run that failed before acting, and
   clears the marker only after the action succeeded.
"""

from __future__ import annotations

import atexit
import difflib
import hashlib
import io
import json
import os
import re
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from pyinfra import host
from pyinfra.api import FactBase, HiddenValue, OperationError, QuoteString, StringCommand, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import Directory
from pyinfra.operations import apt, server

from webstack import factcache
from webstack import options as _options
from webstack.factprefetch import PLAIN_PATH
from webstack.inventory import HostConfig
from webstack.reports import DRIFT_ENV

T = TypeVar("T")

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
PENDING_DIR = "/var/lib/webstack/pending"
MANAGED = "Managed by webstack (pyinfra); local changes are overwritten."

_env = Environment(
    loader=FileSystemLoader(str(TEMPLATES)),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


def config(target: Any = None) -> HostConfig:
    """The validated configuration of the current host (or of pyinfra host ``target``), set by the inventory loader."""
    target = target or host
    cfg = target.data.get("webstack")
    if not isinstance(cfg, HostConfig):
        raise RuntimeError(f"{target.name}: not loaded through a webstack inventory (inventories/<env>.py)")
    if os.environ.get(DRIFT_ENV):
        _drift_writer()
    return cfg


_FACT_LOCKS: dict[str, Any] = {}


def peer_fact(name: str, fact: type[FactBase], **kwargs: Any) -> Any:
    """A fact of another host of the run (``None`` when that host is not in the run).

    Every host of the run may ask the same fact of the same peer at once; they ask one at a
    time, so the first one's answer is in pyinfra's cache for the rest, instead of opening more
    SSH channels on one connection than sshd's MaxSessions (10) allows.
    """
    from pyinfra import inventory, state

    other = inventory.get_host(name, default=None)
    if other is None or other not in state.active_hosts:
        return None
    with fact_lock(name):
        return other.get_fact(fact, **kwargs)


def fact_lock(name: str) -> Any:
    """The lock taken while asking host ``name``'s facts from another host's preparation."""
    from gevent.lock import Semaphore

    return _FACT_LOCKS.setdefault(name, Semaphore())


def options(cls: type[T]) -> T:
    """This deploy's ``--data`` options, typed (declared in roles/options.py; unknown keys were refused
    before pyinfra connected)."""
    return _options.parse(cls, host.data)


def dry_run() -> bool:
    """Whether pyinfra runs with ``--dry`` (drift and status do): nothing executes. Operations with a
    run-time condition (``_if``) are not even prepared then, so code that records what would change
    (drift) passes ``_if`` only when not dry."""
    return bool(_options.command_line()["dry"])


FAULT_ENV = "WEBSTACK_FAULT"


def fault_point(name: str) -> None:
    """Fault injection for the lab tests: with ``WEBSTACK_FAULT=<name>`` in the environment, the
    control machine's process dies here (SIGKILL: no cleanup, no atexit), as if its machine
    lost power at that step. Without the variable it does nothing."""
    if os.environ.get(FAULT_ENV) == name:
        import signal
        import sys

        print(f"webstack: fault injected: killed at {name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


@operation()
def barrier(label: str):
    """A no-op shared by several hosts, so later operations wait for all earlier ones (see deploys/site.py).

    + label: what the barrier separates (shown in the output)
    """
    host.noop(label)
    return
    yield  # pragma: no cover - makes this a generator, as operations are


def render(template: str, **context: Any) -> str:
    """Render ``templates/<template>`` with a 'managed by' header variable."""
    return _env.get_template(template).render(managed=MANAGED, **context)


class PendingActions(FactBase):
    """Names of actions (reloads/restarts) owed by an earlier, failed run."""

    default = list

    def command(self) -> str:
        return f"ls -1 {PENDING_DIR} 2>/dev/null || true"

    def process(self, output: Sequence[str]) -> list[str]:
        return [line.strip() for line in output if line.strip()]


@operation()
def validated_file(
    dest: str,
    content: str,
    validate: str | None = None,
    mode: str = "644",
    user: str = "root",
    group: str = "root",
    owes: str | None = None,
    in_place: bool = False,
    force: bool = False,
):
    """Install ``content`` at ``dest`` only if ``validate`` accepts it.

    + dest: target path on the server
    + content: the full wanted file content
    + validate: shell command with ``{}`` for the staged file path, e.g. ``sshd -t -f {}``
    + mode/user/group: wanted permissions and owner (applied before the swap)
    + owes: name of the action this swap makes owed (e.g. ``reload-ssh``)
    + in_place: for validators that read the live path (``nginx -t``): swap, validate, and
      put the previous file back if validation fails
    + force: write even if the file looked up to date when the run was prepared (for
      files that an earlier operation of the same run changes)

    ``validated_file(dest="/etc/ssh/sshd_config", content=text, validate="sshd -t -f {}")``
    """
    data = content.encode()
    want = hashlib.sha1(data).hexdigest()
    info = file_state(dest)
    same_content = isinstance(info, dict) and info["sha1"] == want
    same_meta = isinstance(info, dict) and (
        info["mode"] == mode.lstrip("0") and info["user"] == user and info["group"] == group
    )
    if same_content and same_meta and not force:
        host.noop(f"{dest} is up to date")
        return
    if os.environ.get(DRIFT_ENV) and not force:
        _record_drift(dest, content, bool(info), same_content,
                      "" if same_meta else f"{_meta(info)} -> {mode} {user}:{group}")
    staged = f"{dest}.webstack-new"
    parent = str(Path(dest).parent)
    if not host.get_fact(Directory, path=parent):
        yield StringCommand("mkdir", "-p", QuoteString(parent))
    # A file others may not read never exists readable, not even staged (a secret: a key, a password).
    yield from _upload(data, staged, private=mode[-1] in "0")
    steps = [
        StringCommand("chown", f"{user}:{group}", QuoteString(staged)),
        StringCommand("chmod", mode, QuoteString(staged)),
    ]
    # The owed action is recorded before the swap: a run cut off right after the swap must not
    # lose it (a validation that fails next costs at most one needless reload).
    marker = [StringCommand("mkdir", "-p", PENDING_DIR), StringCommand("touch", f"{PENDING_DIR}/{owes}")] if owes else []
    if validate and in_place:
        steps += marker
        old = f"{dest}.webstack-old"
        steps.append(StringCommand("{", "cp", "-p", QuoteString(dest), QuoteString(old), "2>/dev/null", "||", "true", ";", "}"))
        steps.append(StringCommand("mv", "-f", QuoteString(staged), QuoteString(dest)))
        steps.append(StringCommand(
            "{", "sh", "-c", QuoteString(validate), "||", "{", "mv", "-f", QuoteString(old), QuoteString(dest),
            "2>/dev/null", "||", "rm", "-f", QuoteString(dest), ";", "false", ";", "}", ";", "}"))
        steps.append(StringCommand("rm", "-f", QuoteString(old)))
    else:
        if validate:
            steps.append(StringCommand("sh", "-c", QuoteString(validate.replace("{}", staged))))
        steps += marker
        steps.append(StringCommand("mv", "-f", QuoteString(staged), QuoteString(dest)))
    chained = StringCommand(*steps, _separator=" && ")
    # On a failed validation, remove the staged file and fail the operation.
    yield StringCommand("(", chained, ")", "||", "{", "rm", "-f", QuoteString(staged), ";", "exit", "1", ";", "}")


# --- drift: `webstack drift` runs site with --dry and this variable set ----------------------------------------

_DRIFT: dict[str, list[dict[str, str]]] = {}
_DRIFT_WRITER: list[bool] = []
_SECRET_LINE = re.compile(r"(?i)^([^\n]*?(password|passwd|secret|token|_key|apikey|credential)[^=:\n]*[=:]\s*).+$", re.M)
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)


class FileState(FactBase):
    """A regular file's mode (octal, as ``stat %a``), owner, group and SHA-1, in one command:
    ``None`` when absent, ``False`` when the path is not a regular file (a link, a directory)."""

    def command(self, path: str) -> StringCommand:
        q = QuoteString(path)
        return StringCommand("if", "[", "-L", q, "]", "||", "[", "-e", q, "];", "then",
                             "stat", "-c", "'%F|%a|%U|%G'", q, "&&",
                             "{", "[", "!", "-f", q, "]", "||", "[", "-L", q, "]", "||", "sha1sum", q, ";", "};", "fi")

    def process(self, output: Sequence[str]) -> dict[str, str] | bool | None:
        kind, mode, user, group = output[0].split("|", 3)
        if kind not in ("regular file", "regular empty file") or len(output) < 2:
            return False
        return {"mode": mode, "user": user, "group": group, "sha1": output[1].split()[0]}


class DirectoryFiles(FactBase):
    """The entries directly in a directory, in one command: name -> type (``find %y``), mode,
    owner, group, size, and the SHA-1 of regular files up to ``HASHED_UP_TO`` bytes ({} when the
    directory does not exist)."""

    default = dict
    HASHED_UP_TO = 262144

    def command(self, path: str) -> StringCommand:
        q = QuoteString(path)
        return StringCommand(
            "[", "!", "-d", q, "]", "||", "{", "find", q, "-mindepth", "1", "-maxdepth", "1",
            "-printf", "'entry|%y|%m|%u|%g|%s|%f\\n'", "&&",
            "find", q, "-mindepth", "1", "-maxdepth", "1", "-type", "f", "-size", f"-{self.HASHED_UP_TO + 1}c",
            "-exec", "sha1sum", "{}", "+", ";", "}")

    @classmethod
    def merged(cls, calls: list[tuple[Any, dict[str, Any]]]) -> tuple[str, Callable[[list[str]], list[list[str]]]] | None:
        """Every directory a run reads of a host in one ``find`` and one ``sha1sum`` (the prefetch,
        ``webstack.factprefetch``), split back into the lines each directory's own command prints.
        One pass lists and picks the files to hash (two ``find``s cost a base-only host 2-3 ms more
        of its CPU). Declined for a path a shell word cannot carry as is (then each is asked by
        itself)."""
        paths = [str(kwargs.get("path", "")) for _, kwargs in calls]
        if not all(PLAIN_PATH.match(p) for p in paths) or len(set(paths)) != len(paths):
            return None
        words = " ".join(paths)
        command = (f"find {words} -mindepth 1 -maxdepth 1 -printf '%H|entry|%y|%m|%u|%g|%s|%f\\n' "
                   f"-type f -size -{cls.HASHED_UP_TO + 1}c -exec sha1sum {{}} + 2>/dev/null; true")

        def split(lines: list[str]) -> list[list[str]]:
            listed: dict[str, list[str]] = {p: [] for p in paths}
            hashed: dict[str, list[str]] = {p: [] for p in paths}
            for line in lines:
                where, sep, rest = line.partition("|entry|")
                if sep and where in listed:
                    listed[where].append("entry|" + rest)
                elif len(line) > 42 and line[40:42] == "  " and line[42:].rsplit("/", 1)[0] in hashed:
                    hashed[line[42:].rsplit("/", 1)[0]].append(line)
            return [listed[p] + hashed[p] for p in paths]

        return command, split

    def process(self, output: Sequence[str]) -> dict[str, dict[str, str]]:
        entries: dict[str, dict[str, str]] = {}
        hashes: dict[str, str] = {}
        for line in output:
            if line.startswith("entry|"):
                _, kind, mode, user, group, size, name = line.split("|", 6)
                entries[name] = {"type": kind, "mode": mode, "user": user, "group": group, "size": size}
            elif len(line) > 42 and line[40:42] == "  ":
                hashes[line[42:].rsplit("/", 1)[-1]] = line[:40]
        for name, entry in entries.items():
            if name in hashes:
                entry["sha1"] = hashes[name]
        return entries


def file_state(path: str) -> dict[str, str] | bool | None:
    """``FileState`` of ``path``, read with the other files of its directory when it can be (one
    command per directory: a role's files mostly share a few directories); ``None`` when absent."""
    parent, name = os.path.split(path)
    if "|" in name or not parent:
        return host.get_fact(FileState, path=path)
    entry = host.get_fact(DirectoryFiles, path=parent).get(name)
    if entry is None:
        return None
    if entry["type"] != "f":
        return False
    if "sha1" not in entry:  # larger than the directory listing hashes
        return host.get_fact(FileState, path=path)
    return {"mode": entry["mode"], "user": entry["user"], "group": entry["group"], "sha1": entry["sha1"]}


class FileText(FactBase):
    """A text file's content ('' when absent or empty)."""

    default = str

    def command(self, path: str) -> StringCommand:
        return StringCommand("cat", QuoteString(path), "2>/dev/null", "||", "true")

    def process(self, output: Sequence[str]) -> str:
        return "\n".join(output) + ("\n" if output else "")


def mask(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with the inventory's secret values, private keys and the values of password-, secret-,
    token- and key-like settings replaced by ``*MASKED*``."""
    for value in sorted((v.strip("\n") for v in secrets if len(v.strip()) >= 4), key=len, reverse=True):
        text = text.replace(value, "*MASKED*")
    text = _PRIVATE_KEY.sub("*MASKED PRIVATE KEY*", text)
    return _SECRET_LINE.sub(lambda m: m.group(1) + "*MASKED*", text)


def _meta(info: Any) -> str:
    return f"{info['mode']} {info['user']}:{info['group']}" if isinstance(info, dict) else "absent"


def _record_drift(dest: str, content: str, exists: bool, same_content: bool, meta: str) -> None:
    """Keep what differs in ``dest`` for the drift report: a unified diff (secrets masked), or the mode."""
    entry = {"path": dest, "diff": "", "meta": meta}
    if not same_content:
        current = host.get_fact(FileText, path=dest) if exists else ""
        secrets = [v.unmask() if isinstance(v, HiddenValue) else str(v) for v in config().secrets.values()]
        entry["diff"] = "".join(difflib.unified_diff(
            mask(current, secrets).splitlines(keepends=True), mask(content, secrets).splitlines(keepends=True),
            f"{dest} (server)", f"{dest} (repository)"))
    _DRIFT.setdefault(host.name, []).append(entry)


def _drift_writer() -> None:
    """Once per process, in a drift run: write the report when pyinfra exits."""
    if not _DRIFT_WRITER:
        from pyinfra.context import ctx_state

        _DRIFT_WRITER.append(True)
        atexit.register(_write_drift, os.environ[DRIFT_ENV], ctx_state.get())


def _write_drift(path: str, run_state: Any) -> None:
    """At exit: per host, the operations that would change something and the files' diffs (JSON)."""
    out: dict[str, Any] = {}
    for target in run_state.inventory:
        if not run_state.is_host_in_limit(target):
            continue  # left out by --limit
        if target not in run_state.activated_hosts:
            out[target.name] = {"error": "not connected", "changes": [], "files": []}
            continue
        changes = []
        for op_hash in run_state.get_op_order():
            if op_hash in run_state.ops[target]:
                data = run_state.get_op_data_for_host(target, op_hash)
                # What pyinfra's own dry-run summary counts as a change; a conditional one (an owed
                # reload that depends on a swap) follows from a listed change.
                if data.operation_meta._maybe_is_change and not data.global_arguments["_if"]:
                    changes.append(" / ".join(sorted(run_state.op_meta[op_hash].names)))
        out[target.name] = {"changes": changes, "files": _DRIFT.get(target.name, [])}
    Path(path).write_text(json.dumps(out, indent=2) + "\n")


def _upload(data: bytes, dest: str, private: bool = False):
    """Put ``data`` at ``dest``. ``private``: never a readable copy on the way (pyinfra's upload goes
    through a 0644 file in the login user's temp directory): the content is piped, base64-encoded,
    into a file created under umask 077 (0600 root), and never appears in a command line."""
    import base64

    from pyinfra.api.command import FileUploadCommand

    if private:
        # rm first: umask applies to new files only, and a leftover staged file may be readable.
        yield stdin_command(f"rm -f {shlex.quote(dest)} && umask 077 && base64 -d > {shlex.quote(dest)}",
                            base64.encodebytes(data).decode())
    else:
        yield FileUploadCommand(io.BytesIO(data), dest)


def stdin_command(command: str, data: str, timeout: int = 120) -> Any:
    """A command (run as root) that reads ``data`` on its standard input: for secrets, which must not
    show in any process's arguments (``/proc/<pid>/cmdline`` is readable by every local user)."""
    from pyinfra import logger
    from pyinfra.api.command import FunctionCommand

    def run(state: Any, host: Any) -> bool:
        sudo = host.data.get("ssh_user", "root") != "root"
        factcache.host_changed(host)
        ok, out = host.run_shell_command(StringCommand(command), _sudo=sudo, _stdin=data, _timeout=timeout)
        if not ok:
            logger.error(f"    [{host.name}] `{command}` (input on stdin) failed: {out.stderr.strip()[-500:]}")
        return ok

    return FunctionCommand(run, (), {})


INSTALLING = "_webstack_installing"  # attribute of a pyinfra Host: what the base role's transaction installs


def install_all_packages(name: str, packages: Sequence[str], cache_time: int) -> None:
    """apt.packages for every package of every role of the host, in one transaction (the base role,
    first), after ``apt-get update`` when the lists are older than ``cache_time`` seconds, without
    Recommends: a server gets what its roles name (a recommendation the stack needs is named in
    ``roles.base._release.PACKAGES``), not MIME databases, sysstat, ipvsadm or bash completion
    (on a database host 69 packages instead of 88, and a fifth less of its install's CPU). What
    it installs in this run is noted on the host, so each role's own install of the same packages
    (:func:`install_packages`) need not run an apt-get of its own: if this one fails, the host
    stops here."""
    installed = host.get_fact(DebPackages)
    setattr(host, INSTALLING, frozenset(p for p in packages if p not in installed))
    # Retried: apt-get update fails at once on the lists lock of apt-daily.service's refresh (a few
    # seconds, twice a day); DPkg::Lock::Timeout (51webstack-lists) covers only the dpkg lock.
    apt.packages(name=name, packages=list(packages), update=True, cache_time=cache_time, no_recommends=True,
                 _retries=2, _retry_delay=15)


def install_packages(name: str, packages: Sequence[str]) -> None:
    """A role's apt.packages, minus the packages the base role's one transaction installs in this
    run (``install_all_packages``); on a converged host, the same check as apt.packages."""
    installing: frozenset[str] = getattr(host, INSTALLING, frozenset())
    left = [p for p in packages if p not in installing]
    if left:
        apt.packages(name=name, packages=left, no_recommends=True)
    else:
        host.noop(f"{name}: {', '.join(packages)} installed by the base role's transaction in this run")


def owed_action(name: str, command: str, swaps: Sequence[OperationMeta], hint: str = "") -> OperationMeta:
    """Run ``command`` if any of ``swaps`` changed now, or an earlier run left it owed.

    The marker ``/var/lib/webstack/pending/<name>`` is removed only after the
    command succeeded, so a failed run's reload is retried by the next run.
    ``hint``: what the operator runs next if the command fails (printed then).
    """
    owed_before = name in host.get_fact(PendingActions)
    run = f"{command} && rm -f {PENDING_DIR}/{name}"
    if hint:
        run = f"( {run} ) || {{ echo {shlex.quote(hint)} >&2; exit 1; }}"
    return server.shell(
        name=f"{name} (owed)",
        commands=[run],
        _if=None if owed_before else (lambda: any(op.did_change() for op in swaps)),
    )


def unit_file(unit: str, content: str, owes: str, instance: str = "",
              beside: dict[str, str] | None = None) -> OperationMeta:
    """``/etc/systemd/system/<unit>``, swapped in only if ``systemd-analyze verify`` accepts it
    (a template unit is verified as its ``instance``, e.g. ``app-worker@1.service``). ``beside``:
    units verified together with it (name -> content: a socket and its service need each other)."""
    import shlex

    others = "".join(f" && printf '%s' {shlex.quote(text)} > $d/{name}" for name, text in (beside or {}).items())
    return validated_file(
        name=f"Unit {unit}", dest=f"/etc/systemd/system/{unit}", content=content, owes=owes,
        validate=f"d=$(mktemp -d) && cp {{}} $d/{unit}{others} && "
                 f"systemd-analyze verify $d/{instance or unit}; r=$?; rm -rf $d; exit $r",
    )


def template_file(template: str, dest: str, *, validate: str | None = None, owes: str | None = None,
                  mode: str = "644", user: str = "root", group: str = "root", in_place: bool = False,
                  force: bool = False, **context: Any) -> OperationMeta:
    """``render`` + ``validated_file`` in one call, named after the target."""
    return validated_file(
        name=f"Configure {dest}",
        dest=dest,
        content=render(template, **context),
        validate=validate,
        mode=mode,
        user=user,
        group=group,
        owes=owes,
        in_place=in_place,
        force=force,
    )


def root_shell(target: Any, command: str | StringCommand, timeout: int = 120) -> tuple[bool, Any]:
    """Run a command as root on ``target`` (a pyinfra Host) from a callback: (ok, CommandOutput)."""
    sudo = target.data.get("ssh_user", "root") != "root"
    cmd = command if isinstance(command, StringCommand) else StringCommand(command)
    factcache.host_changed(target)  # it may change anything: later facts of ``target`` are asked again
    return target.run_shell_command(cmd, _sudo=sudo, _timeout=timeout)


ALERT_DROP_IN = "webstack-alert.conf"


def alert_on_failure(*units: str) -> list[OperationMeta]:
    """Mail the operator when one of ``units`` fails (``base__operator_email``).

    + units: unit names (``webstack-backup-check.service``); a template unit's instances
      (``worker@.service``) are named by prefix and instance

    Each unit gets the drop-in ``/etc/systemd/system/<unit>.d/webstack-alert.conf`` with
    ``OnFailure=webstack-alert@%n.service``; without an operator address the drop-ins are
    removed. A daemon-reload follows when one changed. Call it after installing the units:
    ``alert_on_failure("webstack-backup.service", "webstack-backup-check.service")``
    """
    from pyinfra.operations import files

    from roles.base.settings import BaseSettings

    enabled = bool(config().settings(BaseSettings).operator_email)
    swaps = []
    for unit in units:
        # A template's instance name holds an "@", which an instance name may not: prefix-instance then.
        instance = "%p-%i" if unit.endswith("@.service") else "%n"
        path = f"/etc/systemd/system/{unit}.d/{ALERT_DROP_IN}"
        if enabled:
            swaps.append(validated_file(
                name=f"Alert the operator when {unit} fails", dest=path, owes="daemon-reload",
                content=f"# {MANAGED}\n[Unit]\nOnFailure=webstack-alert@{instance}.service\n",
            ))
        else:
            swaps.append(files.file(name=f"No alert drop-in for {unit}", path=path, present=False))
    # A copy: the reload must not wait on its own result (the list gets the reload appended).
    swaps.append(owed_action("daemon-reload", "systemctl daemon-reload", list(swaps)))
    return swaps


def inventory_file(cfg: HostConfig, key: str, value: str) -> Path:
    """A file a setting names, relative to the inventory directory (``ca.crt`` beside hosts.yml);
    OperationError naming the key when it is not there."""
    path = Path(value) if Path(value).is_absolute() else Path(cfg.inventory_dir) / value
    if not path.is_file():
        raise OperationError(f"{key}: {path} not found on the control machine")
    return path

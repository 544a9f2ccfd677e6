"""Every fact a host will be asked, in one command at the start of the run.

A no-change run asks each host the same facts, one SSH round trip and one sudo each: a
``stat``, a ``dpkg-query``, a ``systemctl show`` per operation. Most of a no-change run's
time was those round trips and the servers' CPU for the sudo'd shells.

So each run writes down, per host, the facts it asked (class and arguments only: never an
answer), in a file on the control machine; a run that changed a host writes down what it asked
after the change too, which is what the next run, with nothing to change, will ask. The next
run of the same deploy against the same inventory sends all of them at its first fact for that
host, as one ``sh`` script under one sudo, and keeps each answer as
``webstack.factcache`` keeps any answer: until a command runs on that host. The commands are
pyinfra's own for each fact; only the round trips are merged. A fact whose command fails, or
whose output does not parse, is not kept: pyinfra asks it again by itself, with its usual
errors.

What is prefetched is read a little earlier than it would have been asked, but only while
nothing has run on that host, which is what the fact cache already relies on. Facts asked
with other connector arguments (another sudo user, an environment) than the host's default,
``volatile`` facts and facts with arguments that do not survive JSON are not prefetched.

The files live in ``$WEBSTACK_PREFETCH_DIR`` (default ``~/.cache/webstack/facts``), 0600 in a
0700 directory, and go once their run has not been repeated for two weeks; a record that does
not fit the run only costs a few unused commands.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
import sys
import uuid
from collections.abc import Callable
from functools import partial
from inspect import getcallargs
from pathlib import Path
from typing import Any

DIR_ENV = "WEBSTACK_PREFETCH_DIR"
MAX_ARG = 400  # longer arguments (a script) are not recorded
MISSING = "##PYINFRA_NOCMD##"  # pyinfra.api.facts._MISSING_COMMAND_MARKER
KEEP_DAYS = 14  # a run's records are removed when it has not been repeated for this long


def _dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "webstack" / "facts"
    return Path(os.environ.get(DIR_ENV) or default)


def record_file(host_name: str) -> Path:
    """Where this run's inventory + deploy keeps the facts asked of ``host_name``."""
    run = " ".join(a for a in sys.argv[1:] if a.endswith(".py")) or "-"
    digest = hashlib.sha1(run.encode()).hexdigest()[:16]
    return _dir() / digest / f"{host_name}.json"


def _plain(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_ARG
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


# Connector arguments that change when or how often a command runs, not what it prints: a fact
# asked inside an operation with ``_retries`` (the base role's one install: its lists' stamp and
# the server's date) is answered by the prefetch like any other. With them in the signature those
# two questions went by commands of their own on every host (3 fact commands per host instead of 1;
# the no-change run's cost per added host 0.146 s instead of 0.107-0.12).
NOT_IN_SIGNATURE = frozenset({"_retries", "_retry_delay", "_retry_until", "_timeout", "_temp_dir"})


@functools.cache
def signature_keys() -> tuple[str, ...]:
    """The connector arguments a signature holds, sorted."""
    from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS

    return tuple(sorted(k for k in CONNECTOR_ARGUMENT_KEYS if k not in NOT_IN_SIGNATURE))


def connector_signature(global_kwargs: dict[str, Any]) -> str:
    """A comparable digest of the connector arguments a fact runs with (sudo, user, env...)."""
    items = [(k, repr(global_kwargs.get(k))) for k in signature_keys()]
    return hashlib.sha1(repr(items).encode()).hexdigest()


def entry(cls: type, args: Any, kwargs: Any, signature: str) -> dict[str, Any] | None:
    """What is written down for one fact asked (None when it cannot be replayed exactly)."""
    args, kwargs = list(args or ()), dict(kwargs or {})
    if any(k.startswith("_") for k in kwargs) or not (_plain(args) and _plain(kwargs)):
        return None
    return {"cls": f"{cls.__module__}:{cls.__qualname__}", "args": args, "kwargs": kwargs, "conn": signature}


class Recorder:
    """The facts asked of each host, and what was prefetched."""

    def __init__(self) -> None:
        self.asked: dict[str, dict[str, dict[str, Any]]] = {}
        self.previous: dict[str, list[dict[str, Any]]] = {}
        self.done: set[str] = set()

    def note(self, host_name: str, item: dict[str, Any]) -> None:
        self.asked.setdefault(host_name, {})[json.dumps(item, sort_keys=True)] = item

    def load(self, host_name: str) -> list[dict[str, Any]]:
        try:
            items = json.loads(record_file(host_name).read_text())
        except (OSError, ValueError):
            items = []
        self.previous[host_name] = items if isinstance(items, list) else []
        return self.previous[host_name]

    def save(self, stopped: set[str]) -> None:
        """Per host: what this run asked; on a host where the run stopped (it failed), also what the
        last record held (the next run may get further)."""
        for host_name, asked in self.asked.items():
            items = dict(asked)
            if host_name in stopped:
                for item in self.previous.get(host_name, []):
                    items.setdefault(json.dumps(item, sort_keys=True), item)
            path = record_file(host_name)
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(sorted(items.values(), key=lambda i: json.dumps(i, sort_keys=True))))
                tmp.chmod(0o600)
                tmp.replace(path)
            except OSError:
                pass  # a read-only home: the next run asks fact by fact, as pyinfra does
        prune()


def prune(days: float = KEEP_DAYS) -> None:
    """Remove the records of runs not repeated for ``days`` (a throwaway inventory's, e.g. a test's
    copy in a temporary directory, would otherwise stay for good)."""
    import shutil
    import time

    cutoff = time.time() - days * 86400
    try:
        runs = [d for d in _dir().iterdir() if d.is_dir()]
    except OSError:
        return
    for run in runs:
        try:
            if max((f.stat().st_mtime for f in run.iterdir()), default=0.0) < cutoff:
                shutil.rmtree(run, ignore_errors=True)
        except OSError:
            continue


def _load_class(path: str) -> type | None:
    module, _, name = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def script(commands: list[str], marker: str) -> str:
    """One sh script: each command in a subshell, then ``<marker> <index> <exit code>`` on stdout.

    The marker line follows the command's output directly: after a last line without a newline
    it shares that line (``parse`` splits it off), so the output splits into the lines pyinfra
    would have read from the command alone. One process per fact besides the fact's own (a
    base64 round per fact cost four more, a quarter of a base-only host's prefetch)."""
    return "".join(f"( {command}\n) </dev/null 2>/dev/null; printf '{marker} {i} %d\\n' $?\n"
                   for i, command in enumerate(commands)) + "true\n"


def parse(stdout_lines: list[str], marker: str, count: int) -> dict[int, tuple[int, list[str]]]:
    """index -> (exit code, stdout lines as pyinfra splits them) from ``script``'s output."""
    out: dict[int, tuple[int, list[str]]] = {}
    lines: list[str] = []
    tag = f"{marker} "
    for line in stdout_lines:
        at = line.find(tag)
        if at < 0:
            lines.append(line)
            continue
        if at:
            lines.append(line[:at])
        parts = line[at:].split(" ")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() and 0 <= int(parts[1]) < count:
            out[int(parts[1])] = (int(parts[2]), lines)
        lines = []
    return out


UNIT_NAME = re.compile(r"^[A-Za-z0-9@._:-]+$")  # a plain unit name: no glob, nothing to quote
_SYSTEMD_PROPERTIES = ("Id", "SubState", "UnitFileState")


def _systemd_mergeable(fact: Any, fact_kwargs: dict[str, Any]) -> list[str] | None:
    """The unit names of a ``SystemdStatus``/``SystemdEnabled`` question that one shared
    ``systemctl show`` can answer (system manager, plain names), else None."""
    from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus

    if type(fact) not in (SystemdStatus, SystemdEnabled) or fact.state_key not in _SYSTEMD_PROPERTIES:
        return None
    if fact_kwargs.get("user_mode") or fact_kwargs.get("machine") or fact_kwargs.get("user_name"):
        return None
    services = fact_kwargs.get("services")
    services = [services] if isinstance(services, str) else services
    if not isinstance(services, list) or not services or not all(
            isinstance(s, str) and UNIT_NAME.match(s) for s in services):
        return None
    return services


def systemd_command(units: list[str]) -> str:
    """One ``systemctl show`` of every property the merged questions read, for ``units`` in order."""
    properties = " ".join(f"--property {p}" for p in _SYSTEMD_PROPERTIES)
    return f"systemctl show --all {properties} {' '.join(units)}"


def systemd_lines(lines: list[str], units: list[str], services: list[str], state_key: str) -> list[str] | None:
    """What ``systemctl show --all --property Id --property <state_key> <services>`` alone prints,
    cut from the shared command's output for ``units`` (one block per unit, in order, blank lines
    between; systemd prints the properties of a block in its own order whatever was asked)."""
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line == "":
            blocks.append([])
        else:
            blocks[-1].append(line)
    if len(blocks) != len(units):
        return None
    keep = ("Id=", f"{state_key}=")
    out: list[str] = []
    for n, service in enumerate(services):
        if n:
            out.append("")
        out.extend(line for line in blocks[units.index(service)] if line.startswith(keep))
    return out


PLAIN_PATH = re.compile(r"^(/[A-Za-z0-9._@:+-]+)+$")  # absolute, no trailing slash, nothing to quote
STAT_FORMAT = "user=%U group=%G mode=%A atime=%X mtime=%Y ctime=%Z size=%s %N"  # pyinfra's LINUX_STAT_COMMAND


def _stat_mergeable(fact: Any, fact_kwargs: dict[str, Any]) -> str | None:
    """The path of a ``File``/``Link``/``Directory`` question one shared ``stat`` can answer."""
    from pyinfra.facts.files import LINUX_STAT_COMMAND, Directory, File, Link

    path = fact_kwargs.get("path")
    if type(fact) not in (File, Link, Directory) or LINUX_STAT_COMMAND != f"stat -c '{STAT_FORMAT}'":
        return None
    return path if isinstance(path, str) and PLAIN_PATH.match(path) else None


def stat_command(paths: list[str]) -> str:
    """One GNU ``stat`` of ``paths``, each line led by its path and a ``|`` (a missing path: no line)."""
    return f"stat --printf '%n|{STAT_FORMAT}\\n' {' '.join(paths)} 2>/dev/null; true"


def stat_lines(lines: list[str], path: str) -> list[str]:
    """What pyinfra's ``File`` command prints for ``path`` (its stat line, or nothing when absent)."""
    return [line[len(path) + 1:] for line in lines if line.startswith(f"{path}|")][:1]


def _sha1_mergeable(fact: Any, fact_kwargs: dict[str, Any]) -> str | None:
    """The path of a ``Sha1File`` question one shared ``sha1sum`` can answer."""
    from pyinfra.facts.files import Sha1File

    path = fact_kwargs.get("path")
    return path if type(fact) is Sha1File and isinstance(path, str) and PLAIN_PATH.match(path) else None


def sha1_command(paths: list[str]) -> str:
    """One GNU ``sha1sum`` of ``paths`` (a missing path or a directory: no line)."""
    return f"sha1sum {' '.join(paths)} 2>/dev/null; true"


def sha1_lines(lines: list[str], path: str) -> list[str]:
    """What pyinfra's ``Sha1File`` command prints for ``path`` (``<hash>  <path>``, or nothing)."""
    return [line for line in lines if line.endswith(f"  {path}") and len(line) == 42 + len(path)][:1]


Merged = tuple[str, Callable[[list[str]], "list[list[str]] | None"]]


def _merge_systemd(calls: list[tuple[Any, dict[str, Any]]]) -> Merged:
    asked = [(fact.state_key, _systemd_mergeable(fact, kwargs) or []) for fact, kwargs in calls]
    units = list(dict.fromkeys(u for _, services in asked for u in services))

    def split(lines: list[str]) -> list[list[str]] | None:
        parts = [systemd_lines(lines, units, services, state_key) for state_key, services in asked]
        return None if any(p is None for p in parts) else [p for p in parts if p is not None]

    return _guarded("systemctl", systemd_command(units)), split


def _merge_paths(command: Callable[[list[str]], str],
                 lines_of: Callable[[list[str], str], list[str]]) -> Callable[[list[tuple[Any, dict[str, Any]]]], Merged]:
    """A merger for questions about one path each: ``command`` of every path once, and each
    question gets ``lines_of`` its own path."""
    def merge(calls: list[tuple[Any, dict[str, Any]]]) -> Merged:
        paths = [str(kwargs["path"]) for _, kwargs in calls]
        return command(list(dict.fromkeys(paths))), lambda lines: [lines_of(lines, p) for p in paths]
    return merge


_PYINFRA_MERGERS = {"systemctl-show": _merge_systemd, "stat": _merge_paths(stat_command, stat_lines),
                    "sha1sum": _merge_paths(sha1_command, sha1_lines)}


def _merge_group(fact: Any, fact_kwargs: dict[str, Any], requires: Any) -> Any:
    """Which shared command can answer this question with others (None: its own command).

    pyinfra's ``SystemdStatus``/``SystemdEnabled`` share one ``systemctl show`` and its
    ``File``/``Link``/``Directory`` one ``stat`` and its ``Sha1File`` one ``sha1sum`` (mergers here,
    as its classes cannot carry one);
    a class of ours with a ``merged(calls) -> (command, split) | None`` classmethod shares the
    command it builds with every class of its ``merge_group`` (default: the class)."""
    if _systemd_mergeable(fact, fact_kwargs) is not None:
        return "systemctl-show"
    if _stat_mergeable(fact, fact_kwargs) is not None:
        return "stat"
    if _sha1_mergeable(fact, fact_kwargs) is not None:
        return "sha1sum"
    if hasattr(type(fact), "merged") and not requires:
        return getattr(type(fact), "merge_group", type(fact))
    return None


def prefetch(state: Any, host: Any, items: list[dict[str, Any]], key_of: Any) -> dict[tuple[str, ...], Any]:
    """Ask ``items`` of ``host`` in one command; {fact cache key: answer} for those that answered.

    Questions one tool answers together share one command of it (``_merge_group``: the unit
    questions, ~8 ms of a server's CPU each, one ``systemctl show``; the file questions one
    ``stat``; ``roles._lib.DirectoryFiles`` and the postgres role's one-query facts their own);
    each question gets the lines its own command prints."""
    from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
    from pyinfra.api.command import StringCommand
    from pyinfra.api.facts import FactBase, _make_command

    if not items or not host.connected:
        return {}
    defaults, _ = pop_global_arguments(state, host, {})
    signature = connector_signature(dict(defaults))
    executor = {k: v for k, v in defaults.items() if k in CONNECTOR_ARGUMENT_KEYS}
    commands: list[str] = []
    # per command: (cache key, fact, the lines of this fact's own command from the command's lines)
    readers: list[list[tuple[tuple[str, ...], Any, Callable[[list[str]], list[str] | None]]]] = []
    # per merge group (_merge_group): (cache key, fact, its arguments, its own command)
    groups: dict[Any, list[tuple[tuple[str, ...], Any, dict[str, Any], str]]] = {}
    for item in items:
        cls = _load_class(str(item.get("cls", "")))
        if cls is None or not issubclass(cls, FactBase) or item.get("conn") != signature or getattr(cls, "volatile", False):
            continue
        args, kwargs = item.get("args") or [], item.get("kwargs") or {}
        key = key_of(cls, args, kwargs)
        fact = cls()
        if key is None or fact.shell_executable or fact.check_preconditions(state, host):
            continue
        try:
            # pyinfra's _handle_fact_kwargs, less its merge of the global arguments: a recorded call
            # has none (entry() refuses "_" names), so its fact arguments are its own
            fact_kwargs = getcallargs(fact.command, *args, **kwargs) if args or kwargs else {}
            command = _make_command(fact.command, dict(fact_kwargs))
            requires = _make_command(fact.requires_command, dict(fact_kwargs))
        except Exception:  # noqa: BLE001 - a recorded call that no longer fits the class: skipped
            continue
        text = command.get_raw_value() if isinstance(command, StringCommand) else str(command)
        if requires:  # as pyinfra guards it: a missing binary prints the marker, left to pyinfra
            text = _guarded(str(requires), text)
        group = _merge_group(fact, dict(fact_kwargs), requires)
        groups.setdefault(group if group is not None else object(), []).append((key, fact, dict(fact_kwargs), text))
    for group, calls in groups.items():
        merge = _PYINFRA_MERGERS.get(group) if isinstance(group, str) else None
        merge = merge or getattr(calls[0][1], "merged", None)
        merged = merge([(fact, kw) for _, fact, kw, _ in calls]) if merge and len(calls) > 1 else None
        if merged is None:  # alone, not mergeable, or declined: each by its own command
            for key, fact, _, text in calls:
                commands.append(text)
                readers.append([(key, fact, lambda lines: lines)])
            continue
        command_text, split = merged
        commands.append(command_text)
        shared = _SplitOnce(split)  # every question of the command reads its part of one split
        readers.append([(key, fact, partial(shared.nth, n=n)) for n, (key, fact, _, _) in enumerate(calls)])
    if not commands:
        return {}
    marker = f"WSF{uuid.uuid4().hex[:12]}"
    try:
        status, output = host.run_shell_command(StringCommand(script(commands, marker)),
                                                print_output=False, print_input=False, **executor)
    except Exception:  # noqa: BLE001 - e.g. output that is not UTF-8: pyinfra asks fact by fact and reports it
        return {}
    if not status:
        return {}
    answers: dict[tuple[str, ...], Any] = {}
    for i, (code, lines) in parse(output.stdout_lines, marker, len(commands)).items():
        if code != 0 or lines == [MISSING]:
            continue  # pyinfra asks it again and reports its error (or the missing binary) as it would
        for key, fact, read in readers[i]:
            own = read(lines)
            if own is None:
                continue
            try:
                answers[key] = fact.process(own) if own else fact.default()
            except Exception:  # noqa: BLE001 - pyinfra asks it again and reports its FactProcessError
                continue
    return answers


class _SplitOnce:
    """A merged command's ``split``, run once for all of its questions (not once per question:
    fourteen unit questions of a host each split the whole ``systemctl show`` output)."""

    def __init__(self, split: Callable[[list[str]], list[list[str]] | None]) -> None:
        self.split = split
        self.done: tuple[list[str], list[list[str]] | None] | None = None

    def nth(self, lines: list[str], n: int) -> list[str] | None:
        if self.done is None or self.done[0] is not lines:
            self.done = (lines, self.split(lines))
        parts = self.done[1]
        return parts[n] if parts is not None else None


def _guarded(requires: str, text: str) -> str:
    """pyinfra's guard: the command where ``requires`` is installed, else the missing-binary marker."""
    return f"if command -v {requires} >/dev/null 2>&1; then ( {text}\n); else echo '{MISSING}'; fi"

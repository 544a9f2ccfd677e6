"""One command per distinct fact and host in a run, as long as nothing changed that host.

pyinfra 3 keeps no fact cache. It runs every operation's function while executing,
and without ``-y`` also while preparing (to show what would change); several
operations ask the same fact. A no-change site run therefore sent the same
``dpkg-query``, ``systemctl show`` or ``stat`` to a host many times, one SSH round
trip each.

The answer to a fact asked twice with the same arguments is the same as long as
nothing ran on that host in between, so it is kept:

- while preparing: nothing runs on any server (pyinfra runs commands only once every
  operation of every host is prepared);
- while executing: until the first command of an operation (a shell command, an
  upload) runs on the host; from then on its facts are asked again, as pyinfra does.
  A Python callback (``python.call``) may do anything on any host: once one runs,
  nothing more is kept or served for the rest of the run.

A fact class with ``volatile = True`` is never kept. ``WEBSTACK_FACT_CACHE=0`` keeps
nothing (to measure the difference). ``WEBSTACK_FACT_STATS=FILE``
writes, at exit, the fact commands sent per host and the answers served from here
(``bench/nochange.py`` reads it).
"""

from __future__ import annotations

import atexit
import copy
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

STATS_ENV = "WEBSTACK_FACT_STATS"
SWITCH_ENV = "WEBSTACK_FACT_CACHE"
_SENT: Counter[str] = Counter()
_KEPT: Counter[str] = Counter()
_INSTALLED: list[Any] = []


class _RunCache:
    """The kept answers of one pyinfra run (one ``State``)."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[tuple[str, ...], Any]] = {}
        self.changed: set[str] = set()
        self.callbacks_ran = False

    def usable(self, host_name: str) -> bool:
        return not self.callbacks_ran and host_name not in self.changed

    def host_changed(self, host_name: str) -> None:
        self.changed.add(host_name)
        self.answers.pop(host_name, None)


def _run_cache(state: Any) -> _RunCache:
    cache = getattr(state, "_webstack_fact_cache", None)
    if cache is None:
        cache = _RunCache()
        state._webstack_fact_cache = cache
    return cache


def _key(cls: type, args: Any, kwargs: Any) -> tuple[str, ...] | None:
    try:
        return (f"{cls.__module__}.{cls.__qualname__}", repr(tuple(args or ())), repr(sorted((kwargs or {}).items())))
    except TypeError:  # keyword values that do not sort: not kept
        return None


def install() -> None:
    """Wrap pyinfra's ``get_fact`` and the commands that change a host (idempotent)."""
    if _INSTALLED:
        return
    from pyinfra.api import command as command_module
    from pyinfra.api import facts as facts_module
    from pyinfra.api import host as host_module
    from pyinfra.api.facts import ShortFactBase
    from pyinfra.api.state import StateStage

    original = facts_module.get_fact
    enabled = os.environ.get(SWITCH_ENV, "1") != "0"

    def get_fact(state: Any, host: Any, cls: Any, args: Any = None, kwargs: Any = None, **more: Any) -> Any:
        if issubclass(cls, ShortFactBase):  # derived from another fact, which comes through here
            return original(state, host, cls, args=args, kwargs=kwargs, **more)
        cache = _run_cache(state)
        stage = getattr(state, "current_stage", None)
        key = None
        if enabled and stage in (StateStage.Prepare, StateStage.Execute) and not getattr(cls, "volatile", False) \
                and cache.usable(host.name):
            key = _key(cls, args, kwargs)
        answers = cache.answers.setdefault(host.name, {})
        if key is not None and key in answers:
            _KEPT[host.name] += 1
            return copy.deepcopy(answers[key])  # the caller may change the list or dict it gets
        _SENT[host.name] += 1
        value = original(state, host, cls, args=args, kwargs=kwargs, **more)
        # Not kept: a failed fact (the host failed; its answer is the default), or a host changed meanwhile.
        if key is not None and cache.usable(host.name) and host not in getattr(state, "failed_hosts", ()):
            answers[key] = copy.deepcopy(value)
        return value

    def changes_host(cls: Any, callback: bool = False) -> None:
        execute = cls.execute

        def wrapped(self: Any, state: Any, host: Any, connector_arguments: Any) -> Any:
            cache = _run_cache(state)
            if callback:
                cache.callbacks_ran = True
                cache.answers.clear()
            else:
                cache.host_changed(host.name)
            return execute(self, state, host, connector_arguments)

        cls.execute = wrapped

    facts_module.get_fact = get_fact  # type: ignore[assignment]
    host_module.get_fact = get_fact  # type: ignore[assignment]  # Host.get_fact calls the name imported there
    for cls in (command_module.StringCommand, command_module.FileUploadCommand, command_module.RsyncCommand):
        changes_host(cls)
    changes_host(command_module.FunctionCommand, callback=True)
    _INSTALLED.append(original)
    if os.environ.get(STATS_ENV):
        atexit.register(_write_stats, Path(os.environ[STATS_ENV]))


def host_changed(target: Any) -> None:
    """Forget what is kept about pyinfra host ``target`` (a command outside an operation ran on it)."""
    if target.state is not None:
        _run_cache(target.state).host_changed(target.name)


def stats() -> dict[str, dict[str, int]]:
    """Per host: fact commands sent, and answers served from an identical earlier question."""
    return {name: {"sent": _SENT[name], "kept": _KEPT[name]} for name in sorted(set(_SENT) | set(_KEPT))}


def _write_stats(path: Path) -> None:
    path.write_text(json.dumps(stats(), indent=1) + "\n")

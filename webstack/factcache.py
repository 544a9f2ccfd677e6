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
nothing (to measure the difference). The first fact asked of a host also brings, in the same
command, every fact the last run of this deploy asked of it (``webstack.factprefetch``;
``WEBSTACK_FACT_PREFETCH=0`` turns that off). ``WEBSTACK_FACT_STATS=FILE``
writes, at exit, the fact commands sent per host and the answers served from here
(``bench/nochange.py`` reads it).
"""

from __future__ import annotations

import atexit
import copy
import datetime
import json
import os
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

from webstack import factprefetch

STATS_ENV = "WEBSTACK_FACT_STATS"
SWITCH_ENV = "WEBSTACK_FACT_CACHE"
PREFETCH_ENV = "WEBSTACK_FACT_PREFETCH"
_SENT: Counter[str] = Counter()
_KEPT: Counter[str] = Counter()
_PREFETCHED: Counter[str] = Counter()
_ALONE: dict[str, list[str]] = {}  # per host: the facts asked by a command of their own (not the prefetch)
_INSTALLED: list[Any] = []
_RUNS: list[Any] = []
_LOCKS: dict[str, Any] = {}


class _RunCache:
    """The kept answers of one pyinfra run (one ``State``)."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[tuple[str, ...], Any]] = {}
        self.changed: set[str] = set()
        self.callbacks_ran = False
        self.recorder = factprefetch.Recorder()
        self.noted: dict[str, set[tuple[str, ...]]] = {}
        self.signatures: dict[tuple[Any, ...], str] = {}  # (host, the context's connector arguments) -> signature
        self.state: Any = None  # the run's pyinfra State (weakly): which hosts failed

    def usable(self, host_name: str) -> bool:
        return not self.callbacks_ran and host_name not in self.changed

    def host_changed(self, host_name: str) -> None:
        self.changed.add(host_name)
        self.answers.pop(host_name, None)


def _run_cache(state: Any) -> _RunCache:
    cache = getattr(state, "_webstack_fact_cache", None)
    if cache is None:
        cache = _RunCache()
        cache.state = weakref.ref(state)
        state._webstack_fact_cache = cache
        _RUNS.append(cache)
    return cache


def _host_lock(name: str) -> Any:
    from gevent.lock import Semaphore

    return _LOCKS.setdefault(name, Semaphore())


def _prefetch(state: Any, host: Any, cache: _RunCache) -> None:
    """Once per host and run, before its first fact: everything the last run asked of it."""
    with _host_lock(host.name):
        if host.name in cache.recorder.done:
            return
        cache.recorder.done.add(host.name)
        items = cache.recorder.load(host.name)
        if not items:
            return
        found = factprefetch.prefetch(state, host, items, _key)
        _SENT[host.name] += 1
        _PREFETCHED[host.name] += len(found)
        if cache.usable(host.name):
            answers = cache.answers.setdefault(host.name, {})
            for key, value in found.items():
                answers.setdefault(key, value)


def _note(state: Any, host: Any, cache: _RunCache, cls: Any, args: Any, kwargs: Any, key: tuple[str, ...]) -> None:
    """Write down a fact asked of the host, for the next run's prefetch (once per question and
    host: working out its connector arguments is most of the cost)."""
    from pyinfra.api.facts import _handle_fact_kwargs

    noted = cache.noted.setdefault(host.name, set())
    if key in noted:
        return
    noted.add(key)
    if any(str(k).startswith("_") for k in kwargs or {}):
        return  # a call with global arguments of its own is not written down (factprefetch.entry)

    # The signature depends on the host and the connector arguments of the operation or deploy the
    # fact is asked in: worked out once per context (pyinfra's whole global argument merge per fact
    # was a tenth of the control machine's CPU on a no-change run of base-only hosts).
    context = (host.name, _connector_context(host.current_op_global_arguments),
               _connector_context(host.current_deploy_kwargs))
    signature = cache.signatures.get(context)
    if signature is None:
        try:
            _, global_kwargs = _handle_fact_kwargs(state, host, cls, list(args or ()), dict(kwargs or {}))
        except Exception:  # noqa: BLE001 - pyinfra itself reports a bad fact call
            return
        signature = cache.signatures[context] = factprefetch.connector_signature(dict(global_kwargs))
    item = factprefetch.entry(cls, args, kwargs, signature)
    if item is not None:
        cache.recorder.note(host.name, item)


def _connector_context(arguments: Any) -> tuple[str, ...] | None:
    """The connector arguments (as in the signature) of an operation's or deploy's arguments."""
    if not arguments:
        return None
    return tuple(repr(arguments.get(k)) for k in factprefetch.signature_keys())


_IMMUTABLE = (str, int, float, bool, bytes, type(None), datetime.datetime, datetime.date)


def _copy(value: Any) -> Any:
    """``copy.deepcopy`` for what facts answer (dicts and lists of strings and numbers), without its
    memo bookkeeping: a tenth of the control machine's time serving kept answers went there."""
    if isinstance(value, _IMMUTABLE):
        return value
    kind = type(value)
    if kind is dict:
        return {k: _copy(v) for k, v in value.items()}
    if kind is list:
        return [_copy(v) for v in value]
    if kind is tuple and all(isinstance(v, _IMMUTABLE) for v in value):
        return value
    if kind in (set, frozenset) and all(isinstance(v, _IMMUTABLE) for v in value):
        return value if kind is frozenset else set(value)  # package facts: {name: {versions}}
    return copy.deepcopy(value)


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
    prefetching = enabled and os.environ.get(PREFETCH_ENV, "1") != "0"

    def get_fact(state: Any, host: Any, cls: Any, args: Any = None, kwargs: Any = None, **more: Any) -> Any:
        if issubclass(cls, ShortFactBase):  # derived from another fact, which comes through here
            return original(state, host, cls, args=args, kwargs=kwargs, **more)
        cache = _run_cache(state)
        stage = getattr(state, "current_stage", None)
        key = None
        if enabled and stage in (StateStage.Prepare, StateStage.Execute) and not getattr(cls, "volatile", False):
            asked = _key(cls, args, kwargs)
            if asked is not None and prefetching:
                if cache.usable(host.name) and host.name not in cache.recorder.done:
                    _prefetch(state, host, cache)
                # written down after a change too: the next run asks it, and would otherwise ask it alone
                _note(state, host, cache, cls, args, kwargs, asked)
            key = asked if cache.usable(host.name) else None
        answers = cache.answers.setdefault(host.name, {})
        if key is not None and key in answers:
            _KEPT[host.name] += 1
            return _copy(answers[key])  # the caller may change the list or dict it gets
        _SENT[host.name] += 1
        _ALONE.setdefault(host.name, []).append(f"{cls.__module__}.{cls.__qualname__}")
        value = original(state, host, cls, args=args, kwargs=kwargs, **more)
        # Not kept: a failed fact (the host failed; its answer is the default), or a host changed meanwhile.
        if key is not None and cache.usable(host.name) and host not in getattr(state, "failed_hosts", ()):
            answers[key] = _copy(value)
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
    if prefetching:
        atexit.register(_save_records)


def _save_records() -> None:
    for cache in _RUNS:
        state = cache.state() if cache.state is not None else None
        cache.recorder.save({h.name for h in getattr(state, "failed_hosts", ())})


def host_changed(target: Any) -> None:
    """Forget what is kept about pyinfra host ``target`` (a command outside an operation ran on it)."""
    if target.state is not None:
        _run_cache(target.state).host_changed(target.name)


def stats() -> dict[str, dict[str, Any]]:
    """Per host: fact commands sent (a prefetch counts one), answers served from an earlier
    question or the prefetch, answers the prefetch brought, and the facts asked by a command of
    their own."""
    return {name: {"sent": _SENT[name], "kept": _KEPT[name], "prefetched": _PREFETCHED[name],
                   "alone": _ALONE.get(name, [])}
            for name in sorted(set(_SENT) | set(_KEPT))}


def _write_stats(path: Path) -> None:
    path.write_text(json.dumps(stats(), indent=1) + "\n")

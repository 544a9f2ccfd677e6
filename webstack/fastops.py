"""The same answers as two pyinfra helpers, without the control machine's CPU they cost.

Profiled on a no-change site run of the 15-host lab (py-spy, ``bench/nochange.py``), a quarter
of the control machine's CPU went to one line per operation call: pyinfra orders operations by
the line numbers of the call stack, and takes them with ``inspect.stack()``, which for every
frame of every call looks the module up and reads its source file to build a line of context
that is then thrown away. Another 7% went to ``typing.get_type_hints`` evaluating the same
annotations of pyinfra's global arguments on every operation and fact call.

- ``get_operation_order_from_stack``: the same walk over the same frames with the same
  filenames (a frame's ``co_filename``, which is what ``getframeinfo`` reports for a source
  file) and line numbers, without reading sources.
- ``all_global_arguments``: computed once; the annotations of a class defined at import do
  not change.

And one on the servers: pyinfra's ``Users`` fact (asked of every host by the admin accounts)
runs about a dozen processes per account in ``/etc/passwd`` (``grep``, ``cut``, ``id``,
``lastlog``, ``tr`` in backticks): 140-210 ms of a lab server's CPU, a third of a base-only
host's whole no-change run. ``USERS_COMMAND`` prints the same lines with one ``awk``, one
``getent group`` and one ``lastlog``:

- the ``/etc/passwd`` line, and the ``/etc/shadow`` password field, as pyinfra reads them;
- the primary group's name and the ``id -Gn`` list (the primary group, then every group that
  names the account as a member, in ``getent group`` order, once per id), through NSS as ``id``;
- the account's ``lastlog`` row with runs of spaces squeezed (``tr -s ' '``), or nothing
  where ``lastlog`` is gone (Debian 13).

The fast command and pyinfra's print the same bytes on both Debian releases
(``tests/integration/test_nochange.py`` compares them on every lab host), for ordinary
account databases: a name that is a regular expression, duplicated or containing a backslash
is out of scope (pyinfra's own loop misreads those too).

- ``HostData.__getattr__`` (``host.data.<name>``, asked ~30 times per operation by the global
  argument merge): the same walk over the same data layers, testing membership instead of
  raising and catching a ``KeyError`` per layer (most names, ``_sudo_user`` and the like, are in
  none of the five).
- ``pop_global_arguments`` (the global argument merge, once per operation and host and once per
  fact asked): the same merge, with the host's five data layers built once per call instead of
  once per argument (one of them merges every group's data on each build). Profiled on a
  no-change run of 37 base-only hosts, the merge was a fifth of the control machine's CPU.

- ``_run_single_op`` (the execute stage, once per operation): pyinfra starts a greenlet for every
  active host and, for each host the operation does not concern, logs "Skipped". On a no-change
  run of 52 hosts that was 7,412 greenlets and log lines for 2,676 host operations, a cost that
  grows with operations times hosts (each base-only host added ~150). Run with the active hosts
  narrowed to those the operation concerns, it does the same for those and nothing for the
  others; failures count against all active hosts as before (``State.fail_hosts`` reads the set).

- Python's cyclic garbage collector: a run's objects (operations, their arguments, the facts'
  answers) live until it ends, and the collector scanned them again every 700 allocations: a
  tenth of the pyinfra process's CPU samples (``gc_collect_main``) on a no-change run of 52
  hosts. What is loaded before the run (modules, the inventory) is frozen out of the scans and
  the youngest generation is collected every 50,000 allocations (``GC_THRESHOLD``): the control
  machine's CPU on that run 7% less (4 alternating rounds), the peak memory the same (97 MB).

The Python helpers are checked against pyinfra's own in ``tests/unit/test_fastops.py``.
"""

from __future__ import annotations

import gc
import importlib
import sys
from types import FrameType
from typing import Any

GC_THRESHOLD = (50_000, 20, 20)
_INSTALLED: list[bool] = []
_ORIGINAL: dict[str, Any] = {}

USERS_COMMAND = r"""awk -F: '
BEGIN {
    while (("getent group" | getline line) > 0) {
        split(line, g, ":")
        if (!(g[3] in gname)) gname[g[3]] = g[1]
        ng++; gid[ng] = g[3]; members[ng] = "," g[4] ","
    }
    while (("lastlog 2>/dev/null" | getline line) > 0) {
        gsub(/ +/, " ", line)
        split(line, f, " ")
        if (f[1] != "Username" && !(f[1] in last)) last[f[1]] = line
    }
    while ((getline line < "/etc/shadow") > 0) {
        split(line, s, ":")
        if (!(s[1] in password)) password[s[1]] = s[2]
    }
}
$1 != "" {
    primary = ($4 in gname) ? gname[$4] : $4
    list = primary
    split("", seen); seen[$4] = 1
    for (k = 1; k <= ng; k++)
        if (!(gid[k] in seen) && index(members[k], "," $1 ",")) {
            seen[gid[k]] = 1
            list = list " " gname[gid[k]]
        }
    print $0 "|" primary "|" list "|" last[$1] "|" password[$1]
}' /etc/passwd"""


def operation_order_from_stack(state: Any) -> list[int]:
    """pyinfra.api.util.get_operation_order_from_stack, walking frames instead of ``inspect.stack()``."""
    import pyinfra
    from pyinfra.api.util import PYINFRA_INSTALL_DIR

    frames = []
    frame: FrameType | None = sys._getframe(1)  # the caller's (pyinfra's operation wrapper) and outwards
    while frame is not None:
        frames.append((frame.f_code.co_filename, frame.f_lineno))
        frame = frame.f_back
    frames.reverse()  # outermost first, as pyinfra reverses inspect.stack()

    start = 0
    if state.current_deploy_filename:
        # pyinfra's loop, not finding it, ends on its own frame (innermost, inside pyinfra): nothing follows
        start = next((n for n, (filename, _) in enumerate(frames) if filename == state.current_deploy_filename),
                     len(frames))

    line_numbers = [state.current_op_file_number] if pyinfra.is_cli else []
    line_numbers.extend(lineno for filename, lineno in frames[start:] if not filename.startswith(PYINFRA_INSTALL_DIR))
    return line_numbers


def host_data_getattr(self: Any, key: str) -> Any:
    """pyinfra.api.host.HostData.__getattr__ without an exception per data layer that lacks ``key``."""
    from copy import copy

    from pyinfra.api.host import extract_callable_datas

    for data in extract_callable_datas(self.datas):
        if key in data:
            return copy(data[key])
    raise AttributeError(f"Host `{self.host}` has no data `{key}`")


def pop_global_arguments(state: Any, host: Any, kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
    """pyinfra.api.arguments.pop_global_arguments, the host's data layers read once per call."""
    from copy import copy

    from pyinfra.api.arguments import all_argument_meta, default_sentinel, raise_if_bad_type
    from pyinfra.api.exceptions import ArgumentTypeError
    from pyinfra.api.host import extract_callable_datas
    from pyinfra.context import ctx_config

    config = state.config
    if ctx_config.isset():
        config = ctx_config.get()
        assert config is not None
    meta_kwargs: dict[str, Any] = host.current_deploy_kwargs or {}
    datas = list(extract_callable_datas(host.data.datas))
    arguments: dict[str, Any] = {}
    found_keys: list[str] = []
    for key, type_ in _HINTS:
        argument_meta = all_argument_meta[key]
        handler = argument_meta.handler
        default: Any = argument_meta.default(config)
        host_default = next((copy(data[key]) for data in datas if key in data), default_sentinel)
        if host_default is not default_sentinel:
            default = host_default
        if key in kwargs:
            found_keys.append(key)
            value = kwargs.pop(key)
        else:
            value = meta_kwargs.get(key, default)
        if handler:
            value = handler(config, value)
        if value != default:
            raise_if_bad_type(value, type_, ArgumentTypeError, f"Invalid argument `{key}`:")
        arguments[key] = value
    return arguments, found_keys


_HINTS: list[tuple[str, type]] = []


def run_single_op_for_its_hosts(original: Any) -> Any:
    """pyinfra's ``_run_single_op`` with ``inventory.get_active_hosts()`` narrowed, for its call,
    to the hosts the operation concerns (``state.ops[host]`` holds it)."""

    def run(state: Any, op_hash: str) -> Any:
        inventory = state.inventory
        concerned = [h for h in inventory.get_active_hosts() if op_hash in state.ops[h]]
        inventory.get_active_hosts = lambda: list(concerned)
        try:
            return original(state, op_hash)
        finally:
            del inventory.get_active_hosts  # the class's method again

    return run


def pyinfra_users_command() -> str:
    """pyinfra's own command for ``Users`` (to compare with ``USERS_COMMAND``)."""
    from pyinfra.facts.server import Users

    return str(_ORIGINAL.get("users", Users.command)(Users()))


def install() -> None:
    """Swap the helpers in where pyinfra calls them (idempotent)."""
    if _INSTALLED:
        return
    from pyinfra.api import arguments, facts
    from pyinfra.facts.server import Users

    hints = arguments.all_global_arguments()
    _HINTS.extend(hints)

    def all_global_arguments() -> list[tuple[str, type]]:
        return list(hints)

    arguments.all_global_arguments = all_global_arguments  # type: ignore[assignment]
    facts.all_global_arguments = all_global_arguments  # type: ignore[assignment]  # imported by name there
    # pyinfra.api exports the decorator under the module's name: the module itself, by path
    operation_module: Any = importlib.import_module("pyinfra.api.operation")
    operation_module.get_operation_order_from_stack = operation_order_from_stack
    _ORIGINAL["users"] = Users.command
    _ORIGINAL["pop_global_arguments"] = arguments.pop_global_arguments
    # imported by name in each of these modules
    for name in ("pyinfra.api.arguments", "pyinfra.api.deploy", "pyinfra.api.operation", "pyinfra.api.facts"):
        module: Any = importlib.import_module(name)
        module.pop_global_arguments = pop_global_arguments
    from pyinfra.api.host import HostData

    _ORIGINAL["host_data_getattr"] = HostData.__getattr__
    HostData.__getattr__ = host_data_getattr  # type: ignore[method-assign]
    Users.command = lambda self: USERS_COMMAND  # type: ignore[method-assign]
    operations: Any = importlib.import_module("pyinfra.api.operations")
    operations._run_single_op = run_single_op_for_its_hosts(operations._run_single_op)
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    _INSTALLED.append(True)

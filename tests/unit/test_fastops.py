"""webstack.fastops gives the answers of the pyinfra helpers it replaces."""

from __future__ import annotations

import subprocess

import pyinfra
import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.api import util as pyinfra_util
from pyinfra.api.arguments import AllArguments
from pyinfra.api.exceptions import ArgumentTypeError
from pyinfra.facts.server import Users

from webstack import fastops

# the originals, taken before install() swaps them
ORIGINAL_ORDER = pyinfra_util.get_operation_order_from_stack


def _state(deploy_file: str | None) -> State:
    state = State(Inventory((["web1"], {})), Config())
    state.current_deploy_filename = deploy_file
    state.current_op_file_number = 7
    return state


def _nested(state: State, depth: int) -> tuple[list[int], list[int]]:
    if depth:
        return _nested(state, depth - 1)
    return ORIGINAL_ORDER(state), fastops.operation_order_from_stack(state)


def test_operation_order_is_pyinfras_with_and_without_the_deploy_file_on_the_stack(monkeypatch):
    monkeypatch.setattr(pyinfra, "is_cli", True)
    # this file stands in for the deploy file: the line numbers from its first frame on count
    for deploy_file in (__file__, None, "deploys/elsewhere.py"):
        slow, fast = _nested(_state(deploy_file), 3)
        # the two calls sit on the same line of _nested; pyinfra's own frame is skipped in both
        assert slow == fast and slow[0] == 7, deploy_file
    slow, fast = _nested(_state(__file__), 2)
    assert len(slow) > 3  # the test's own frames are there: the comparison compared something


def test_global_argument_hints_are_pyinfras_and_a_fresh_list_each_call():
    from typing import get_type_hints

    from pyinfra.api import arguments

    fastops.install()
    first = arguments.all_global_arguments()
    assert first == list(get_type_hints(AllArguments).items()) and first
    first.clear()
    assert arguments.all_global_arguments()


def test_the_fast_users_command_prints_what_pyinfras_prints_here():
    slow = subprocess.run(["sh", "-c", fastops.pyinfra_users_command()], capture_output=True, text=True).stdout
    fast = subprocess.run(["sh", "-c", fastops.USERS_COMMAND], capture_output=True, text=True).stdout
    assert slow == fast and slow.count("\n") >= 3
    fastops.install()
    assert Users().command() == fastops.USERS_COMMAND


def test_host_data_is_read_as_pyinfra_reads_it():
    from pyinfra.api.host import HostData

    fastops.install()
    original = fastops._ORIGINAL["host_data_getattr"]
    inventory = Inventory((["web1"], {"a": 1, "shared": ["group"]}), web=(["web1"], {"shared": ["web"], "b": 2}))
    data = inventory.get_host("web1").data
    assert isinstance(data, HostData)
    data.c = [3]
    for key in ("a", "b", "c", "shared", "missing"):
        try:
            expected = original(data, key)
        except AttributeError as exc:
            expected = type(exc)
        try:
            got = fastops.host_data_getattr(data, key)
        except AttributeError as exc:
            got = type(exc)
        assert got == expected, key
    assert getattr(data, "missing", "sentinel") == "sentinel" and data.shared == ["web"]
    data.shared.append("not kept")  # a copy, as pyinfra gives
    assert data.shared == ["web"]


def test_global_arguments_are_merged_as_pyinfra_merges_them():
    fastops.install()
    original = fastops._ORIGINAL["pop_global_arguments"]
    inventory = Inventory((["web1", "db1"], {"_sudo": True, "name": "from data"}),
                          web=(["web1"], {"_sudo_user": "deploy", "_env": {"A": "1"}}))
    state = State(inventory, Config(SUDO=False, SHELL="bash"))
    for host in inventory:
        host.init(state)
    web1 = inventory.get_host("web1")
    web1.data._retries = 2  # an override, as a deploy sets one
    cases = [{}, {"_sudo": False, "_timeout": 3, "name": "op", "other": 1}, {"_env": {"B": "2"}, "_serial": True}]
    for host in inventory:
        for kwargs in cases:
            mine, theirs = dict(kwargs), dict(kwargs)
            got, expected = fastops.pop_global_arguments(state, host, mine), original(state, host, theirs)
            assert got == expected and mine == theirs, (host, kwargs)
        host.current_deploy_kwargs = {"_sudo_user": "postgres", "_chdir": "/tmp"}  # inside a @deploy(...)
        assert fastops.pop_global_arguments(state, host, {}) == original(state, host, {})
        host.current_deploy_kwargs = None
    got, _ = fastops.pop_global_arguments(state, web1, {})
    assert (got["_sudo"], got["_sudo_user"], got["_retries"], got["_shell_executable"]) == (True, "deploy", 2, "bash")
    got["_env"]["A"] = "changed"  # a copy, as pyinfra gives
    assert fastops.pop_global_arguments(state, web1, {})[0]["_env"] == {"A": "1"}
    with pytest.raises(ArgumentTypeError):
        fastops.pop_global_arguments(state, web1, {"_timeout": "soon"})


def test_ssh_connections_offer_gcm_first_and_keep_every_other_cipher():
    from paramiko.transport import Transport

    from roles.base._release import SSH_CIPHERS
    from webstack import nodelay

    ours = nodelay.prefer_aead(("aes128-ctr", "aes256-ctr", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com"))
    assert ours == ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
    assert nodelay.prefer_aead(("aes128-ctr",)) == ("aes128-ctr",)  # a paramiko without GCM: unchanged
    nodelay.install()
    offered = Transport._preferred_ciphers  # type: ignore[attr-defined]
    assert offered[:2] == nodelay.AEAD_FIRST and set(nodelay.AEAD_FIRST) <= set(SSH_CIPHERS)  # sshd accepts both


class _ChannelFile:
    """A paramiko channel file over fixed bytes: paramiko's own BufferedFile (its readline decodes)."""

    def __new__(cls, data: bytes):  # type: ignore[no-untyped-def]
        from paramiko.file import BufferedFile

        class Fixed(BufferedFile):
            def __init__(self) -> None:
                super().__init__()
                self._data = data
                self._set_mode("r")  # text mode, as exec_command opens stdout and stderr

            def _read(self, size: int) -> bytes | None:
                chunk, self._data = self._data[:size], self._data[size:]
                return chunk or None

        return Fixed()


def test_output_that_is_not_utf8_is_read_with_replacement_characters():
    """The fault: a remote command prints bytes that are not UTF-8 (Latin-1 here). paramiko's text-mode
    readline raises UnicodeDecodeError, which stopped the whole pyinfra run; through the installed
    reader the line arrives with a replacement character and the lines around it unchanged."""
    from pyinfra.connectors import ssh

    from webstack import sshoutput

    data = b"first\nstanza caf\xe9 ok\nlast\n"
    with pytest.raises(UnicodeDecodeError):
        list(_ChannelFile(data))
    sshoutput.install()
    out = ssh.read_output_buffers(_ChannelFile(data), _ChannelFile(b"warn\xff\n"), timeout=5, print_output=False,
                                  print_prefix="")
    assert out.stdout_lines == ["first", "stanza caf\ufffd ok", "last"]
    assert out.stderr_lines == ["warn\ufffd"]
    assert list(sshoutput.lenient(["as", "is"])) == ["as", "is"]  # not a channel file: untouched


def test_an_operation_runs_on_the_hosts_it_concerns_and_no_greenlet_starts_for_the_others(monkeypatch):
    """pyinfra's execute stage with ``_run_single_op`` narrowed: the operation of web1 runs there
    once; web2, which it does not concern, gets no greenlet (pyinfra's own started one to log
    "Skipped"); web2 stays active, its own operation runs."""
    from pyinfra.api import operations
    from pyinfra.api.operation import add_op
    from pyinfra.api.operations import run_ops
    from pyinfra.api.state import StateStage
    from pyinfra.operations import python

    fastops.install()
    inventory = Inventory((["web1", "web2"], {}))
    state = State(inventory, Config())
    state.set_stage(StateStage.Prepare)
    for host in inventory:
        state.activate_host(host)
    ran: list[str] = []
    web1, web2 = inventory.get_host("web1"), inventory.get_host("web2")
    add_op(state, python.call, function=lambda: ran.append("web1's"), host=[web1])
    add_op(state, python.call, function=lambda: ran.append("both"), host=[web1, web2])
    started: list[str] = []
    original = operations._run_host_op_with_context

    def counting(state, host, op_hash):
        started.append(host.name)
        return original(state, host, op_hash)

    monkeypatch.setattr(operations, "_run_host_op_with_context", counting)
    state.set_stage(StateStage.Execute)
    run_ops(state)
    assert sorted(ran) == ["both", "both", "web1's"] and sorted(started) == ["web1", "web1", "web2"]
    assert sorted(h.name for h in inventory.get_active_hosts()) == ["web1", "web2"] and not state.failed_hosts


def test_the_collector_scans_a_runs_objects_less_often_and_not_what_was_loaded_before():
    import gc

    fastops.install()
    assert gc.get_threshold() == fastops.GC_THRESHOLD and gc.get_freeze_count() > 1000

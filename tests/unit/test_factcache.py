"""webstack.factcache: a fact asked again on an unchanged host is answered from the first answer."""

from __future__ import annotations

from unittest import mock

import pytest
from pyinfra.api import Config, FactBase, FunctionCommand, Inventory, State, StringCommand
from pyinfra.api import facts as pyinfra_facts
from pyinfra.api.state import StateStage

from webstack import factcache


class Files(FactBase):
    def command(self, path: str) -> str:
        return f"ls {path}"


class Clock(FactBase):
    volatile = True

    def command(self) -> str:
        return "date"


@pytest.fixture
def run():
    factcache.install()
    inventory = Inventory((["web1", "web2"], {}))
    state = State(inventory, Config())
    asked: list[tuple[str, str, dict]] = []

    def fake(state, host, cls, args=None, kwargs=None, ensure_hosts=None, apply_failed_hosts=True):
        asked.append((host.name, cls.__name__, dict(kwargs or {})))
        return [f"answer {len(asked)}"]

    with mock.patch.object(pyinfra_facts, "_get_fact", fake):
        state.set_stage(StateStage.Prepare)
        yield state, inventory.get_host("web1"), inventory.get_host("web2"), asked


def test_same_fact_same_arguments_is_asked_once_while_preparing(run):
    state, web1, web2, asked = run
    first = web1.get_fact(Files, path="/etc")
    first.append("changed by the caller")
    assert web1.get_fact(Files, path="/etc") == ["answer 1"]
    web1.get_fact(Files, path="/srv")
    web2.get_fact(Files, path="/etc")
    assert asked == [("web1", "Files", {"path": "/etc"}), ("web1", "Files", {"path": "/srv"}),
                     ("web2", "Files", {"path": "/etc"})]


def test_volatile_facts_are_always_asked(run):
    state, web1, _web2, asked = run
    web1.get_fact(Clock)
    web1.get_fact(Clock)
    assert len(asked) == 2


def test_a_command_run_on_a_host_makes_its_facts_asked_again(run):
    state, web1, web2, asked = run
    web1.get_fact(Files, path="/etc")
    web2.get_fact(Files, path="/etc")
    state.set_stage(StateStage.Execute)
    web1.get_fact(Files, path="/etc")  # executing, nothing ran yet: kept
    assert len(asked) == 2
    with mock.patch.object(type(web1), "run_shell_command", return_value=(True, [])):
        StringCommand("touch", "/etc/x").execute(state, web1, {})
    web1.get_fact(Files, path="/etc")
    web1.get_fact(Files, path="/etc")
    web2.get_fact(Files, path="/etc")  # web2 unchanged: kept
    assert [a[0] for a in asked] == ["web1", "web2", "web1", "web1"]


def test_after_a_callback_every_fact_is_asked_again(run):
    state, web1, web2, asked = run
    web2.get_fact(Files, path="/etc")
    state.set_stage(StateStage.Execute)
    FunctionCommand(lambda: None, (), {}).execute(state, web1, {})
    web2.get_fact(Files, path="/etc")
    web2.get_fact(Files, path="/etc")
    assert len(asked) == 3


def test_stats_count_sent_and_kept(run):
    _state, web1, _web2, _asked = run
    before = factcache.stats().get("web1", {"sent": 0, "kept": 0})
    web1.get_fact(Files, path="/opt")
    web1.get_fact(Files, path="/opt")
    after = factcache.stats()["web1"]
    assert (after["sent"] - before["sent"], after["kept"] - before["kept"]) == (1, 1)


def test_a_command_outside_operations_makes_the_hosts_facts_asked_again(run):
    _state, web1, _web2, asked = run
    web1.get_fact(Files, path="/etc")
    factcache.host_changed(web1)  # as roles._lib.root_shell does before running its command
    web1.get_fact(Files, path="/etc")
    assert len(asked) == 2


OUTPUTS = {  # command -> what it prints, with the edge cases of pyinfra's line splitting
    "printf 'a\\nb\\n'": ["a", "b"],
    "printf 'a\\n\\nb'": ["a", "", "b"],
    "printf '\\n'": [""],
    "true": [],
    "printf 'x~1 %s\\n' '~'": ["x~1 ~"],
    "echo 'é ü'; echo >&2 noise": ["é ü"],
}


def test_the_prefetch_script_gives_each_commands_lines_and_exit_code_as_pyinfra_would():
    import subprocess

    from webstack.factprefetch import parse, script

    commands = [*OUTPUTS, "echo partial; exit 3"]
    out = subprocess.run(["sh", "-c", script(commands, "M1")], capture_output=True, text=True, check=True).stdout
    parsed = parse(out.splitlines(), "M1", len(commands))
    for i, command in enumerate(OUTPUTS):
        alone = subprocess.run(["sh", "-c", command], capture_output=True, text=True).stdout
        assert parsed[i] == (0, OUTPUTS[command]) and alone.splitlines() == OUTPUTS[command], command
    assert parsed[len(OUTPUTS)] == (3, ["partial"])


class Lines(FactBase):
    def command(self, path: str) -> str:
        return f"printf 'one\\ntwo\\n' # {path}"

    def process(self, output):
        return list(output)


class Failing(FactBase):
    def command(self) -> str:
        return "exit 1"


def _second_run_here(monkeypatch, sent: list, env: dict | None = None):
    """web1 of a new run whose commands run on this machine (``sent`` collects them)."""
    import subprocess

    from pyinfra.connectors.util import CommandOutput, OutputLine

    def local(command, print_output=False, print_input=False, **kwargs):
        sent.append(command)
        out = subprocess.run(["sh", "-c", command.get_raw_value()], capture_output=True, text=True, env=env).stdout
        return True, CommandOutput([OutputLine("stdout", line) for line in out.splitlines()])

    state = State(Inventory((["web1"], {})), Config())
    state.set_stage(StateStage.Prepare)
    host = state.inventory.get_host("web1")
    monkeypatch.setattr(host, "connected", True, raising=False)
    monkeypatch.setattr(host, "run_shell_command", local)
    return host


def test_a_run_asks_in_one_command_what_the_last_run_asked(run, tmp_path, monkeypatch):
    """Run 1 asks two facts fact by fact and writes them down; run 2 sends both in one command at
    its first fact, serves the answer that came back, and asks the failing one again by itself."""


    state, web1, _web2, asked = run
    monkeypatch.setenv("WEBSTACK_PREFETCH_DIR", str(tmp_path))
    web1.get_fact(Lines, path="/etc")
    web1.get_fact(Failing)
    factcache._save_records()
    assert len(asked) == 2

    sent: list = []
    host = _second_run_here(monkeypatch, sent)
    assert host.get_fact(Lines, path="/etc") == ["one", "two"]
    assert len(sent) == 1 and len(asked) == 2  # from the prefetch, not from pyinfra
    host.get_fact(Failing)
    assert len(asked) == 3 and asked[-1][1] == "Failing"
    assert factcache.stats()["web1"]["prefetched"] >= 1


def test_records_of_runs_not_repeated_for_two_weeks_are_removed(tmp_path, monkeypatch):
    import os
    import time

    from webstack import factprefetch

    monkeypatch.setenv("WEBSTACK_PREFETCH_DIR", str(tmp_path))
    old, recent = tmp_path / "old", tmp_path / "recent"
    for run in (old, recent):
        run.mkdir()
        (run / "web1.json").write_text("[]")
    stale = time.time() - 15 * 86400
    os.utime(old / "web1.json", (stale, stale))
    factprefetch.prune()
    assert not old.exists() and (recent / "web1.json").exists()


FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl show --all --property P ... UNIT...: one block per unit, blank lines between
shift 2; props=""; while [ "$1" = "--property" ]; do props="$props $2"; shift 2; done
first=1
for unit in "$@"; do
    [ $first = 1 ] || echo; first=0
    for p in Id SubState UnitFileState; do
        case " $props " in *" $p "*) ;; *) continue ;; esac
        case $p in Id) echo "Id=$unit" ;; SubState) echo "SubState=running" ;;
                   UnitFileState) [ "$unit" = off.service ] && echo "UnitFileState=disabled" || echo "UnitFileState=enabled" ;; esac
    done
done
echo "$*" >> "$SYSTEMCTL_LOG"
"""


def test_unit_questions_share_one_systemctl_show_and_get_their_own_answers(run, tmp_path, monkeypatch):
    import os

    from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(FAKE_SYSTEMCTL)
    (bin_dir / "systemctl").chmod(0o755)
    log = tmp_path / "systemctl.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SYSTEMCTL_LOG=str(log))
    monkeypatch.setenv("WEBSTACK_PREFETCH_DIR", str(tmp_path / "records"))
    state, web1, _web2, asked = run
    questions = [(SystemdStatus, ["ssh.service"]), (SystemdEnabled, ["ssh.service"]),
                 (SystemdEnabled, ["off.service", "cron.service"]), (SystemdStatus, "cron.service")]
    for cls, services in questions:
        web1.get_fact(cls, services=services)
    factcache._save_records()

    host = _second_run_here(monkeypatch, [], env)
    answers = [host.get_fact(cls, services=services) for cls, services in questions]
    assert answers == [{"ssh.service": True}, {"ssh.service": True},
                       {"off.service": False, "cron.service": True}, {"cron.service": True}]
    shows = log.read_text().splitlines()  # one show, each unit once
    assert len(shows) == 1 and sorted(shows[0].split()) == ["cron.service", "off.service", "ssh.service"]
    assert len(asked) == len(questions)  # run 2 asked pyinfra nothing


def test_a_unit_answer_is_not_cut_from_output_of_the_wrong_shape():
    from webstack.factprefetch import systemd_lines

    shared = ["Id=a.service", "SubState=running", "UnitFileState=enabled", "", "Id=b.service", "SubState=dead",
              "UnitFileState="]
    assert systemd_lines(shared, ["a.service", "b.service"], ["b.service"], "SubState") == ["Id=b.service",
                                                                                             "SubState=dead"]
    assert systemd_lines(shared, ["a.service", "b.service", "c.service"], ["a.service"], "SubState") is None


def test_kept_answers_are_copies_as_deep_as_deepcopys():
    import copy

    from webstack.factcache import _copy

    value = {"a": [1, {"b": "c"}], "t": (1, "x"), "n": None, "s": {1, 2}, "nested": ((1, [2]),)}
    out = _copy(value)
    assert out == value == copy.deepcopy(value)
    out["a"][1]["b"] = "changed"
    out["s"].add(3)
    out["nested"][0][1].append(9)
    assert value == {"a": [1, {"b": "c"}], "t": (1, "x"), "n": None, "s": {1, 2}, "nested": ((1, [2]),)}


def test_directory_listings_merged_give_each_directory_its_own_lines():
    """roles._lib.DirectoryFiles.merged on this machine's /etc and a subdirectory, against each
    directory's own command (the lab compares the same on its servers)."""
    import subprocess

    from roles._lib import DirectoryFiles

    paths = ["/etc", "/etc/ssh" if __import__("os").path.isdir("/etc/ssh") else "/usr/lib", "/nonexistent"]
    command, split = DirectoryFiles.merged([(None, {"path": p}) for p in paths])
    parts = split(subprocess.run(["sh", "-c", command], capture_output=True, text=True).stdout.splitlines())
    for path, part in zip(paths, parts, strict=True):
        own = subprocess.run(["sh", "-c", DirectoryFiles().command(path=path).get_raw_value()],
                             capture_output=True, text=True).stdout.splitlines()
        assert part == own, path
    assert len(parts[0]) > 10 and parts[2] == []
    assert DirectoryFiles.merged([(None, {"path": "/etc/my dir"}), (None, {"path": "/etc"})]) is None  # a word to quote: declined


def test_file_questions_share_one_stat_and_get_their_own_lines_here(tmp_path):
    """webstack.factprefetch's shared stat against pyinfra's File/Link/Directory commands on this
    machine: a directory, a file, a symlink, a missing path (the lab compares on its servers)."""
    import subprocess

    from pyinfra.facts.files import Directory, File, Link

    from webstack.factprefetch import stat_command, stat_lines

    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    paths = ["/etc", str(tmp_path / "file"), "/nonexistent", str(tmp_path / "link"), str(tmp_path)]
    shared = subprocess.run(["sh", "-c", stat_command(paths)], capture_output=True, text=True).stdout.splitlines()
    for path in paths:
        for cls in (File, Link, Directory):
            own = subprocess.run(["sh", "-c", cls().command(path=path).get_raw_value()], capture_output=True,
                                 text=True).stdout.splitlines()
            assert stat_lines(shared, path) == own, (cls.__name__, path)
    assert stat_lines(shared, "/nonexistent") == [] and stat_lines(shared, "/etc")


def test_sha1_questions_share_one_sha1sum_and_get_pyinfras_answers_here(tmp_path):
    """webstack.factprefetch's shared sha1sum against pyinfra's Sha1File on this machine: two files,
    a missing path, a directory, a symlink; each answer as pyinfra's own command and process give it."""
    import subprocess

    from pyinfra.facts.files import Sha1File

    from webstack.factprefetch import _sha1_mergeable, sha1_command, sha1_lines

    (tmp_path / "a").write_text("x")
    (tmp_path / "b").write_text("y\n")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    paths = [str(tmp_path / "a"), str(tmp_path / "b"), "/nonexistent", str(tmp_path), str(tmp_path / "link")]
    shared = subprocess.run(["sh", "-c", sha1_command(paths)], capture_output=True, text=True).stdout.splitlines()
    answers = []
    for path in paths:
        fact = Sha1File()
        own = subprocess.run(["sh", "-c", fact.command(path=path).get_raw_value()], capture_output=True,
                             text=True).stdout.splitlines()
        mine = sha1_lines(shared, path)
        assert mine == own, path
        answers.append(fact.process(mine) if mine else fact.default())
    assert answers[0] == "11f6ad8ec52a2984abaafd7c3b516503785c2072" and answers[0] == answers[4]
    assert answers[1] != answers[0] and answers[2] is None and answers[3] is None
    assert _sha1_mergeable(Sha1File(), {"path": "/etc/my file"}) is None  # a word to quote: its own command


def test_kept_answers_are_copies_sets_included():
    """A kept answer handed out twice: changing the first copy (a set of package versions, a list)
    does not change the second."""
    value = {"nginx": {"1.26"}, "groups": ["a"], "frozen": frozenset({"x"})}
    first = factcache._copy(value)
    first["nginx"].add("1.27")
    first["groups"].append("b")
    assert factcache._copy(value) == {"nginx": {"1.26"}, "groups": ["a"], "frozen": frozenset({"x"})}


def test_facts_asked_after_a_change_are_written_down_for_the_next_run(run, tmp_path, monkeypatch):
    """Run 1 changes web1 between two questions (as a converging run does); run 2, with nothing to
    change, gets both answers from its one prefetch command."""
    state, web1, _web2, asked = run
    monkeypatch.setenv("WEBSTACK_PREFETCH_DIR", str(tmp_path))
    web1.get_fact(Lines, path="/before")
    factcache.host_changed(web1)
    web1.get_fact(Lines, path="/after")
    factcache._save_records()
    assert len(asked) == 2

    sent: list = []
    host = _second_run_here(monkeypatch, sent)
    assert host.get_fact(Lines, path="/before") == ["one", "two"] == host.get_fact(Lines, path="/after")
    assert len(sent) == 1 and "/after" in sent[0].get_raw_value() and len(asked) == 2


def test_codename_fact_answers_what_pyinfras_linux_distribution_says_here():
    """roles.base.facts.Codename against pyinfra's LinuxDistribution on this machine."""
    import subprocess

    from pyinfra.facts.server import LinuxDistribution

    from roles.base.facts import Codename

    def ask(fact: object) -> object:
        out = subprocess.run(["sh", "-c", str(fact.command())], capture_output=True, text=True).stdout  # type: ignore[attr-defined]
        return fact.process(out.splitlines())  # type: ignore[attr-defined]

    theirs = ask(LinuxDistribution())["release_meta"].get("VERSION_CODENAME", "")  # type: ignore[index]
    assert ask(Codename()) == theirs and theirs


def test_retries_and_timeouts_do_not_keep_a_fact_from_the_prefetch():
    """A fact asked inside an operation run with ``_retries`` (the base role's one install asks its
    lists' stamp and the date there) has the signature of the same fact asked outside it; the user a
    command runs as still tells two apart."""
    from webstack.factprefetch import connector_signature

    plain = connector_signature({"_sudo": True})
    assert connector_signature({"_sudo": True, "_retries": 2, "_retry_delay": 15, "_timeout": 30}) == plain
    assert connector_signature({"_sudo": True, "_sudo_user": "postgres"}) != plain
    assert connector_signature({"_sudo": True, "_success_exit_codes": [0, 1]}) != plain


def test_facts_asked_as_another_user_are_written_down_with_that_users_signature(run, tmp_path, monkeypatch):
    """The signature is worked out once per context: a fact asked in a deploy run as postgres is
    written down with a signature of its own, and the plain ones share pyinfra's merge's."""
    import json

    from pyinfra.api.facts import _handle_fact_kwargs

    from webstack import factprefetch

    state, web1, _web2, _asked = run
    monkeypatch.setenv("WEBSTACK_PREFETCH_DIR", str(tmp_path))
    web1.get_fact(Files, path="/etc")
    web1.get_fact(Files, path="/srv")
    monkeypatch.setattr(web1, "current_deploy_kwargs", {"_sudo": True, "_sudo_user": "postgres"}, raising=False)
    web1.get_fact(Files, path="/var/lib/postgresql")
    expected = factprefetch.connector_signature(dict(_handle_fact_kwargs(state, web1, Files, [], {})[1]))
    monkeypatch.setattr(web1, "current_deploy_kwargs", None, raising=False)
    factcache._save_records()
    items = {i["kwargs"]["path"]: i["conn"] for f in tmp_path.rglob("web1.json") for i in json.loads(f.read_text())}
    assert items["/etc"] == items["/srv"] == factprefetch.connector_signature(
        dict(_handle_fact_kwargs(state, web1, Files, [], {})[1]))
    assert items["/var/lib/postgresql"] == expected != items["/etc"]

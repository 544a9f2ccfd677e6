"""Deploy options: one typed declaration each, one yes/no parser, unknown keys refused before connecting."""

from __future__ import annotations

import click
import pytest

from roles.options import RestoreOptions, SwitchoverOptions
from roles.registry import CATALOG
from tests.unit.test_cli import PYINFRA, ROOT, assert_stopped_before_connecting, prod  # noqa: F401
from webstack.errors import ConfigError
from webstack.options import check_command_line, parse, to_bool


def test_options_are_typed_with_defaults():
    assert parse(SwitchoverOptions, {}) == SwitchoverOptions(to="", write_inventory=False, force=False)
    # pyinfra's --data parser turns "true" into True and "1" into 1: both are yes.
    assert parse(SwitchoverOptions, {"to": "db2", "write_inventory": True, "force": 1}) == \
        SwitchoverOptions(to="db2", write_inventory=True, force=True)
    restore = parse(RestoreOptions, {"from": "main", "confirm": "drill1", "check_db": ""})
    assert (restore.source, restore.confirm, restore.check_db, restore.time) == ("main", "drill1", "postgres", "")


@pytest.mark.parametrize("value,expected", [("yes", True), ("YES", True), (True, True), (1, True), ("on", True),
                                            ("no", False), (False, False), (0, False), ("off", False), ("", False)])
def test_one_yes_no_parser(value, expected):
    assert to_bool(value, "force") is expected


def test_a_yes_no_option_refuses_anything_else():
    with pytest.raises(ConfigError, match="--data: reclone: expected yes or no, got 'maybe'"):
        parse(CATALOG.deploys["rejoin"].options, {"reclone": "maybe"})  # type: ignore[arg-type]


def check(operations: tuple[str, ...], data: tuple[str, ...]) -> None:
    ctx = click.Context(click.Command("pyinfra"))
    ctx.params = {"operations": operations, "data": data}
    with ctx:
        check_command_line(CATALOG)


def test_known_options_pass_and_pyinfra_keys_are_left_alone():
    check(("deploys/restore.py",), ("from=main", "confirm=drill1", "time=2026-11-27 10:41:07+00"))
    check(("deploys/switchover.py",), ("to=db2", "write_inventory=yes", "ssh_user=root", "_sudo=true"))
    check(("exec", "--", "uptime"), ("anything=1",))  # not a deploy: nothing to check against
    check_command_line(CATALOG)  # no pyinfra command line (unit tests, the API): nothing to check


def test_misspelt_option_names_key_deploy_and_options():
    with pytest.raises(ConfigError) as info:
        check(("deploys/restore.py",), ("from=main", "confrim=drill1"))
    assert str(info.value) == ("pyinfra: --data confrim: unknown option of deploys/restore.py "
                               "(its options: check_db, check_sql, confirm, from, time, vault)")
    with pytest.raises(ConfigError, match="--data release: unknown option of deploys/check.py .its options: none"):
        check(("deploys/check.py",), ("release=abc",))


def test_misspelt_option_stops_pyinfra_before_connecting(prod):  # noqa: F811
    import subprocess

    result = subprocess.run([PYINFRA, "-y", str(prod.with_suffix(".py")), "deploys/restore.py",
                             "--limit", "db1", "--data", "confrim=db1"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert_stopped_before_connecting(
        result, "webstack: pyinfra: --data confrim: unknown option of deploys/restore.py "
                "(its options: check_db, check_sql, confirm, from, time, vault)")

"""Every validation error, with its exact message, before any connection."""

from __future__ import annotations

import pytest

from roles.base.settings import BaseSettings
from roles.topology import Topology
from tests.unit.conftest import KEY, SECRETS
from webstack.errors import ConfigError
from webstack.inventory import load


def error_of(inv, secrets=SECRETS) -> str:
    with pytest.raises(ConfigError) as info:
        load(inv, secrets=secrets)
    return str(info.value)


def test_valid_inventory_gives_typed_settings(make_inventory):
    inv = make_inventory(groups={"db": {"base__ssh_port": 2222}}, host_data={"web1": {"base__timezone": "Europe/Paris"}})
    configs = {c.name: c for c in load(inv, secrets=SECRETS)}
    assert configs["db1"].settings(BaseSettings).ssh_port == 2222
    assert configs["web1"].settings(BaseSettings).ssh_port == 22
    assert configs["web1"].settings(BaseSettings).timezone == "Europe/Paris"
    assert configs["db1"].settings(BaseSettings).timezone == "Etc/UTC"
    assert configs["web1"].settings(BaseSettings).admin_users[0].name == "ops"
    assert [p.name for p in Topology(configs["web1"].peers).members("db")] == ["db1"]


def test_host_data_beats_group_beats_all(make_inventory):
    inv = make_inventory(
        groups={"all": {"base__admin_users": [{"name": "ops", "ssh_keys": [KEY]}], "base__journal_max_use": "1G"},
                "web": {"base__journal_max_use": "2G"}},
        host_data={"web1": {"base__journal_max_use": "3G"}},
    )
    configs = {c.name: c for c in load(inv, secrets=SECRETS)}
    assert configs["web1"].settings(BaseSettings).journal_max_use == "3G"
    assert configs["db1"].settings(BaseSettings).journal_max_use == "1G"


def test_secrets_are_masked(make_inventory):
    cfg = load(make_inventory(), secrets=SECRETS)[0]
    value = cfg.secret("password_hash_ops")
    assert str(value) == "*MASKED*" and repr(value) == "'*MASKED*'"
    assert value.unmask() == "$6$salt$hash"
    assert "$6$salt" not in repr(cfg)


def test_malformed_yaml_names_file_and_line(make_inventory):
    inv = make_inventory(raw={"group_data/web.yml": "base__ssh_port: [1, 2\nbase__timezone: x\n"})
    assert error_of(inv) == f"{inv}/group_data/web.yml:2: malformed YAML: expected ',' or ']', but got ':'"


def test_unknown_key_names_file_and_key(make_inventory):
    inv = make_inventory(groups={"web": {"base__ssh_prot": 22}})
    message = error_of(inv)
    assert message.startswith(f"{inv}/group_data/web.yml: base__ssh_prot: unknown key (known: ")


def test_unknown_role_prefix(make_inventory):
    inv = make_inventory(groups={"web": {"nginx__workers": 2}})
    assert error_of(inv) == (
        f"{inv}/group_data/web.yml: nginx__workers: unknown key: "
        "settings are '<role>__<setting>' with role one of app, backup, base, lb, mailprovider, postgres, worker"
    )


def test_wrong_type(make_inventory):
    inv = make_inventory(host_data={"db1": {"base__ssh_port": "22"}})
    assert error_of(inv) == f"{inv}/host_data/db1.yml: base__ssh_port: expected int, got str '22'"


def test_wrong_nested_type(make_inventory):
    inv = make_inventory(groups={"all": {"base__admin_users": [{"name": "ops", "ssh_keys": KEY}]}})
    assert error_of(inv) == (
        f"{inv}/group_data/all.yml: base__admin_users[0].ssh_keys: expected list of str, got str '{KEY}'"
    )


def test_unknown_nested_key(make_inventory):
    inv = make_inventory(groups={"all": {"base__admin_users": [{"name": "ops", "ssh_keys": [KEY], "sudo": True}]}})
    assert error_of(inv).startswith(f"{inv}/group_data/all.yml: base__admin_users[0].sudo: unknown key")


def test_bool_is_not_an_int(make_inventory):
    inv = make_inventory(groups={"web": {"base__ssh_port": True}})
    assert error_of(inv) == f"{inv}/group_data/web.yml: base__ssh_port: expected int, got bool True"


def test_literal_choices(make_inventory):
    inv = make_inventory(groups={"web": {"base__firewall_openings": [{"port": 80, "proto": "icmp", "from_networks": ["10.0.0.0/8"]}]}})
    assert error_of(inv) == (
        f"{inv}/group_data/web.yml: base__firewall_openings[0].proto: must be one of 'tcp', 'udp', got 'icmp'"
    )


def test_field_check_bad_network(make_inventory):
    inv = make_inventory(groups={"web": {"base__admin_networks": ["10.0.0.300/8"]}})
    assert error_of(inv) == f"{inv}/group_data/web.yml: base__admin_networks: not a network: '10.0.0.300/8'"


def test_unknown_role_on_host(make_inventory):
    inv = make_inventory(hosts={"web1": {"address": "10.1.0.11", "roles": ["nginx"]}})
    assert error_of(inv) == (f"{inv}/hosts.yml: hosts.web1.roles: unknown role 'nginx' "
                             "(known: app, backup, lb, mailprovider, postgres, worker)")


def test_unknown_host_key(make_inventory):
    inv = make_inventory(hosts={"web1": {"address": "10.1.0.11", "role": ["x"]}})
    assert error_of(inv).startswith(f"{inv}/hosts.yml: hosts.web1.role: unknown key")


def test_bad_address(make_inventory):
    inv = make_inventory(hosts={"web1": {"address": "10.1.0.300"}})
    assert error_of(inv) == f"{inv}/hosts.yml: hosts.web1.address: not an IP address: '10.1.0.300'"


def test_bad_release(make_inventory):
    inv = make_inventory(hosts={"web1": {"address": "10.1.0.11", "release": "buster"}})
    assert error_of(inv) == f"{inv}/hosts.yml: hosts.web1.release: must be one of bookworm, trixie"


def test_duplicate_address(make_inventory):
    inv = make_inventory(hosts={"a": {"address": "10.1.0.1"}, "b": {"address": "10.1.0.1"}})
    assert error_of(inv) == f"{inv}/hosts.yml: hosts.b.address: 10.1.0.1 is also the address of a"


def test_group_data_for_unknown_group(make_inventory):
    inv = make_inventory(groups={"wbe": {"base__ssh_port": 22}})
    assert error_of(inv) == f"{inv}/group_data/wbe.yml: no group or role named 'wbe' in {inv}/hosts.yml"


def test_host_data_for_unknown_host(make_inventory):
    inv = make_inventory(host_data={"web9": {"base__ssh_port": 22}})
    assert error_of(inv) == f"{inv}/host_data/web9.yml: no host named 'web9' in {inv}/hosts.yml"


def test_missing_secret(make_inventory):
    assert error_of(make_inventory(), secrets={}) == (
        f"{make_inventory()}/secrets.age: password_hash_ops: missing secret (needed by host db1); "
        f"add it with `webstack secrets edit {make_inventory()}`"
    )


def test_no_admin_user(make_inventory):
    inv = make_inventory(groups={"all": {"base__journal_max_use": "1G"}})
    assert error_of(inv) == (
        f"{inv}/hosts.yml: hosts.db1: base__admin_users: at least one admin user is needed (root login is disabled)"
    )


def test_opening_from_unknown_group(make_inventory):
    inv = make_inventory(groups={"db": {"base__firewall_openings": [{"port": 5432, "from_groups": ["ap"]}]}})
    assert error_of(inv) == (
        f"{inv}/hosts.yml: hosts.db1: base__firewall_openings[0].from_groups: no host has role or group 'ap'"
    )


def test_opening_needs_a_source(make_inventory):
    inv = make_inventory(groups={"db": {"base__firewall_openings": [{"port": 5432}]}})
    assert error_of(inv) == (
        f"{inv}/group_data/db.yml: base__firewall_openings[0]: needs from_groups or from_networks"
    )


def test_user_both_admin_and_removed(make_inventory):
    inv = make_inventory(groups={"web": {"base__removed_users": ["ops"]}})
    assert error_of(inv) == f"{inv}/group_data/web.yml: base__removed_users: also listed in admin_users: ops"


def test_missing_hosts_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nowhere", secrets=SECRETS)
    assert str(info.value) == f"{tmp_path}/nowhere/hosts.yml: file not found"


def test_unknown_top_level_key(make_inventory):
    inv = make_inventory(raw={"hosts.yml": "hosts:\n  a: {address: 10.0.0.1}\nhost_vars: {}\n"})
    assert error_of(inv) == f"{inv}/hosts.yml: host_vars: unknown key (known: hosts, ssh)"


def test_onboarding_reaches_the_fresh_hosts_as_root_and_the_others_as_the_admin(make_inventory, monkeypatch):
    """`webstack onboard` runs site once over the inventory with WEBSTACK_ROOT_LOGIN naming the fresh
    servers: those are reached as root on the port sshd answers on now, the rest as the admin user."""
    import webstack.secrets
    from webstack.inventory import ROOT_LOGIN_ENV, pyinfra_groups

    inv = make_inventory(groups={"db": {"base__ssh_port": 2222}})
    monkeypatch.setattr(webstack.secrets, "decrypt", lambda *a, **k: SECRETS)
    monkeypatch.setenv(ROOT_LOGIN_ENV, "db1:22")
    hosts = dict(pyinfra_groups(str(inv.with_suffix(".py")))["all"])
    assert (hosts["db1"]["ssh_user"], hosts["db1"]["ssh_port"], "_sudo" in hosts["db1"]) == ("root", 22, False)
    assert (hosts["web1"]["ssh_user"], hosts["web1"]["ssh_port"], hosts["web1"]["_sudo"]) == ("ops", 22, True)
    monkeypatch.setenv(ROOT_LOGIN_ENV, "db9:22")
    from pyinfra.api.exceptions import PyinfraError

    with pytest.raises(PyinfraError, match="db9"):
        pyinfra_groups(str(inv.with_suffix(".py")))

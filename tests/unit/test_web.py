"""The web tier's settings, cross-host rules, rendering and release packing (no hosts)."""

from __future__ import annotations

import pytest
from pyinfra.facts.hardware import NetworkDevices

from roles._lib import render
from roles.app import deploy as app_deploy
from roles.app.deploy import build_release, database_url, env_content
from roles.lb.deploy import interface_of, keepalived_context, keepalived_peers, site_context
from tests.unit.conftest import KEY, SECRETS
from webstack.errors import ConfigError
from webstack.inventory import load

HOSTS = {
    "lb1": {"address": "10.1.0.11", "roles": ["lb"], "release": "trixie"},
    "lb2": {"address": "10.1.0.12", "roles": ["lb"], "release": "bookworm"},
    "app1": {"address": "10.1.0.21", "roles": ["app"]},
    "app2": {"address": "10.1.0.22", "roles": ["app"]},
    "db1": {"address": "10.1.0.31", "roles": ["postgres"], "groups": ["db"]},
}
GROUPS = {
    "lb": {"lb__vip": "10.1.0.100", "lb__vrrp_id": 7},
    "db": {"postgres__primary": "db1", "postgres__users": ["app"],
           "postgres__databases": [{"name": "app", "owner": "app"}]},
}
WEB_SECRETS = SECRETS


def configs(make_inventory, **kwargs):
    inv = make_inventory(hosts=kwargs.pop("hosts", HOSTS), groups=kwargs.pop("groups", GROUPS), **kwargs)
    return inv, {c.name: c for c in load(inv, secrets=WEB_SECRETS)}


def error_of(make_inventory, **kwargs) -> tuple:
    inv = make_inventory(hosts=kwargs.pop("hosts", HOSTS), groups=kwargs.pop("groups", GROUPS), **kwargs)
    with pytest.raises(ConfigError) as info:
        load(inv, secrets=WEB_SECRETS)
    return inv, str(info.value)


def test_peers_that_reboot_together_are_refused(make_inventory):
    groups = {**GROUPS, "all": {"base__admin_users": [{"name": "ops", "ssh_keys": [KEY]}],
                                "base__unattended_reboot": True, "base__unattended_reboot_time": "04:30"}}
    inv, message = error_of(make_inventory, groups=groups, host_data={"lb2": {"base__unattended_reboot_time": "04:50"}})
    assert message.startswith(f"{inv}/hosts.yml: hosts.lb2: base__unattended_reboot_time: 04:50, within 30 minutes "
                              "of lb1's 04:30")
    # Staggered (the app servers too), or one of them not rebooting by itself: accepted.
    configs(make_inventory, groups=groups, host_data={"lb2": {"base__unattended_reboot_time": "05:15"},
                                                      "app2": {"base__unattended_reboot": False}})
    _, bad = error_of(make_inventory, host_data={"lb1": {"base__unattended_reboot_time": "4:30am"}})
    assert "base__unattended_reboot_time" in bad and "not a time HH:MM" in bad


def test_duplicate_vrrp_id(make_inventory):
    hosts = {**HOSTS, "lb3": {"address": "10.1.0.13", "roles": ["lb"]}, "lb4": {"address": "10.1.0.14", "roles": ["lb"]}}
    inv, message = error_of(make_inventory, hosts=hosts,
                            host_data={"lb3": {"lb__vip": "10.1.0.101"}, "lb4": {"lb__vip": "10.1.0.101"}})
    assert message == (f"{inv}/hosts.yml: lb pair lb3, lb4: lb__vrrp_id: "
                       "duplicate VRRP id 7: also used by the pair with VIP 10.1.0.100")


def test_removing_the_last_application_server_is_refused(make_inventory):
    hosts = {k: v for k, v in HOSTS.items() if not k.startswith("app")}
    inv, message = error_of(make_inventory, hosts=hosts)
    assert message.startswith(f"{inv}/hosts.yml: hosts.lb1: lb__upstream_group: no host is in 'app'")


def test_vip_outside_subnet(make_inventory):
    inv, message = error_of(make_inventory, groups={**GROUPS, "lb": {"lb__vip": "10.2.0.100"}})
    assert message == f"{inv}/hosts.yml: hosts.lb1: lb__vip: 10.2.0.100 is outside lb1's subnet 10.1.0.0/24"


def test_vip_is_a_host_address(make_inventory):
    inv, message = error_of(make_inventory, groups={**GROUPS, "lb": {"lb__vip": "10.1.0.21"}})
    assert message == f"{inv}/hosts.yml: lb pair lb1, lb2: lb__vip: 10.1.0.21 is the address of host app1"


def test_bad_vrrp_id(make_inventory):
    inv, message = error_of(make_inventory, groups={**GROUPS, "lb": {"lb__vip": "10.1.0.100", "lb__vrrp_id": 300}})
    assert message == f"{inv}/group_data/lb.yml: lb__vrrp_id: must be 1-255, got 300"


def test_app_needs_its_database(make_inventory):
    inv, message = error_of(make_inventory, groups={**GROUPS, "app": {"app__database": "shop"}})
    assert message == f"{inv}/hosts.yml: hosts.app1: app__database: no postgres host has database 'shop'"


def test_tls_secrets_required(make_inventory):
    inv = make_inventory(hosts=HOSTS, groups=GROUPS)
    with pytest.raises(ConfigError) as info:
        load(inv, secrets={k: v for k, v in WEB_SECRETS.items() if k != "tls_key"})
    assert str(info.value).startswith(f"{inv}/secrets.age: tls_key: missing secret (needed by host lb1)")


def test_nginx_site(make_inventory):
    _inv, cfgs = configs(make_inventory)
    text = render("lb/etc/nginx/sites-available/webstack.conf.j2", **site_context(cfgs["lb1"], "trixie", ["app2"]))
    assert "server 10.1.0.21:8000 max_fails=1 fail_timeout=5s;  # app1" in text
    assert "server 10.1.0.22:8000 max_fails=1 fail_timeout=5s down;  # app2" in text
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text and "http2 on;" in text
    assert 'Strict-Transport-Security "max-age=63072000; includeSubDomains"' in text
    assert "return 301 https://$host$request_uri;" in text
    assert "proxy_cookie_flags ~ secure httponly;" in text and "samesite=" not in text  # never weaken Strict
    old = render("lb/etc/nginx/sites-available/webstack.conf.j2", **site_context(cfgs["lb2"], "bookworm", []))
    assert "listen 443 ssl http2 default_server;" in old and "http2 on;" not in old


def test_keepalived_unicast_peers(make_inventory):
    _inv, cfgs = configs(make_inventory, host_data={"lb1": {"lb__priority": 150}, "lb2": {"lb__nopreempt": True}})
    assert keepalived_peers(cfgs["lb1"]) == ["10.1.0.12"]
    # The role's own context, as apply() renders it.
    text = render("lb/etc/keepalived/keepalived.conf.j2", **keepalived_context(cfgs["lb1"], "eth0"))
    assert "router_id lb1\n" in text and "interface eth0\n" in text and "virtual_router_id 7\n" in text
    assert "priority 150\n" in text and "nopreempt" not in text and "unicast_src_ip 10.1.0.11\n" in text
    assert "unicast_peer {\n        10.1.0.12\n    }" in text and "10.1.0.100/24 dev eth0" in text
    other = render("lb/etc/keepalived/keepalived.conf.j2", **keepalived_context(cfgs["lb2"], "ens3"))
    assert "priority 100\n" in other and "    nopreempt\n" in other and "unicast_src_ip 10.1.0.12\n" in other
    assert "unicast_peer {\n        10.1.0.11\n    }" in other and "10.1.0.100/24 dev ens3" in other


# `ip -j addr show` on a load balancer holding the VIP (a lab container: veth host0), plus a second network.
IP_ADDR_JSON = (
    '[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"operstate":"UNKNOWN",'
    '"link_type":"loopback","address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1",'
    '"prefixlen":8,"scope":"host","label":"lo"},{"family":"inet6","local":"::1","prefixlen":128,"scope":"host"}]},'
    '{"ifindex":2,"link_index":12,"ifname":"host0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1500,'
    '"operstate":"UP","link_type":"ether","address":"9a:1c:2e:44:01:0b","link_netnsid":0,"addr_info":['
    '{"family":"inet","local":"10.77.0.11","prefixlen":24,"broadcast":"10.77.0.255","scope":"global","label":"host0"},'
    '{"family":"inet","local":"10.77.0.100","prefixlen":24,"scope":"global","secondary":true,"label":"host0"},'
    '{"family":"inet6","local":"fe80::981c:2eff:fe44:10b","prefixlen":64,"scope":"link"}]},'
    '{"ifindex":3,"ifname":"eth1","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1500,"operstate":"UP",'
    '"link_type":"ether","address":"52:54:00:12:34:56","addr_info":[{"family":"inet","local":"192.168.5.2",'
    '"prefixlen":24,"broadcast":"192.168.5.255","scope":"global","label":"eth1"}]}]'
)


def test_keepalived_interface_from_pyinfra_network_devices():
    devices = NetworkDevices().process(IP_ADDR_JSON.splitlines())
    assert interface_of(devices, "10.77.0.11") == "host0"
    assert interface_of(devices, "10.77.0.100") == "host0"  # a secondary address counts too
    assert interface_of(devices, "192.168.5.2") == "eth1"
    assert interface_of(devices, "10.77.0.1") is None  # a prefix of 10.77.0.11 is not its address


def test_database_url_and_env_file(make_inventory):
    _inv, cfgs = configs(make_inventory)
    url = database_url(cfgs["app1"])
    assert url == ("host=10.1.0.31 dbname=app user=app password='app-pw' sslmode=verify-full "
                   "sslrootcert=/etc/webstack/postgres-main-ca.crt channel_binding=require "
                   "target_session_attrs=read-write connect_timeout=3")
    env = env_content(cfgs["app1"])
    assert f'DATABASE_URL="{url}"' in env and 'SECRET_KEY="k3y"' in env


def test_release_is_reproducible():
    first, tar1 = build_release("examples/demoapp")
    second, tar2 = build_release.__wrapped__("examples/demoapp")
    assert first == second and len(first) == 12
    assert tar1 == tar2


def test_release_from_a_git_ref_matches_the_committed_tree(tmp_path, monkeypatch):
    """In a repository of its own, so the answer depends on no state of this checkout."""
    import shutil
    import subprocess

    shutil.copytree(app_deploy.ROOT / "examples" / "demoapp", tmp_path / "examples" / "demoapp",
                    ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-C", str(tmp_path), "-c", "user.name=test", "-c", "user.email=test@unit"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "demoapp"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    monkeypatch.setattr(app_deploy, "ROOT", tmp_path)
    build = build_release.__wrapped__  # uncached: the cache holds this checkout's answers
    release, _ = build("examples/demoapp", "HEAD")
    assert len(release) == 12
    assert build("examples/demoapp")[0] == release  # same content, same id, whichever way it was packed
    with open(tmp_path / "examples" / "demoapp" / "app.py", "a") as f:
        f.write("# an uncommitted change\n")
    assert build("examples/demoapp")[0] != release  # the working tree is a new release...
    assert build("examples/demoapp", "HEAD")[0] == release  # ...the ref still packs the committed tree
    with pytest.raises(Exception, match="no-such-ref"):
        build("examples/demoapp", "no-such-ref")

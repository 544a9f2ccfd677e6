"""The topology model's answers on the lab inventory and on small hand-made ones."""

from __future__ import annotations

import pytest

from roles.topology import TIERS, Topology
from tests.unit.conftest import SECRETS
from tests.unit.test_templates import lab_inventory
from webstack.inventory import load


def names(hosts) -> list[str]:
    return [h.name for h in hosts]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Topology:
    cfgs = load(lab_inventory(tmp_path_factory.mktemp("inv")), secrets=SECRETS)
    return Topology(cfgs[0].peers)


def test_lab_clusters_and_primaries(lab):
    assert {c: names(m) for c, m in lab.clusters().items()} == {
        "main": ["db1", "db2"], "legacy": ["db3", "db4"], "drill": ["drill1"]}
    assert names(lab.cluster_of("db2")) == ["db1", "db2"]
    assert names(lab.cluster_peers("db1")) == ["db2"] and names(lab.cluster_peers("drill1")) == []
    assert lab.primary("db4").name == "db3" and lab.primary("db1").name == "db1"


def test_lab_load_balancers(lab):
    assert names(lab.load_balancers()) == ["lb1", "lb2"]
    assert {vip: names(m) for vip, m in lab.lb_pairs().items()} == {"10.77.0.100": ["lb1", "lb2"]}
    assert names(lab.vrrp_peers("lb1")) == ["lb2"] and names(lab.vrrp_peers("lb2")) == ["lb1"]
    assert names(lab.upstreams("lb2")) == ["app1", "app2"]


def test_lab_database_clients_and_owner(lab):
    assert [(g, h.name) for g, h in lab.database_clients("db3")] == [("app", "app1"), ("app", "app2"),
                                                                     ("worker", "worker1"),
                                                                     ("worker", "worker2")]
    found = lab.app_database("app2")
    assert found is not None and (found.database.name, found.database.owner, found.cluster) == ("app", "app", "main")


def test_lab_backups(lab):
    assert lab.backup_host("main").name == "backup1" and lab.backup_host("drill") is None
    assert names(lab.drill_hosts("backup1")) == ["drill1"]
    assert lab.backup_clients("backup1") == {
        "legacy": ["10.77.0.33", "10.77.0.34", "10.77.0.71"],
        "main": ["10.77.0.31", "10.77.0.32", "10.77.0.71"],
    }
    assert lab.ssh_port("backup1") == 22


def test_lab_scheduler_and_tiers(lab):
    assert names(lab.workers()) == ["worker1", "worker2"]
    assert lab.app_of("worker2").name == "app1" and lab.app_of("app2").name == "app2"
    assert lab.app_database("worker1").database.name == "app"
    order = names(lab.in_tier_order())
    assert order == ["lb1", "lb2", "app1", "app2", "worker1", "worker2", "db1", "db2", "db3", "db4", "drill1", "backup1",
                     "mail1", "spare1", "spare2"]
    assert TIERS == ("lb", "app", "worker", "postgres", "backup")


def test_one_box_stage_1(make_inventory):
    inv = make_inventory(
        hosts={"box": {"address": "10.1.0.10", "roles": ["postgres", "app", "lb"], "groups": ["worker"]}},
        groups={"postgres": {"postgres__primary": "box", "postgres__users": ["app"],
                             "postgres__databases": [{"name": "app", "owner": "app"}]}},
    )
    top = Topology(load(inv, secrets=SECRETS)[0].peers)
    assert names(top.cluster_of("box")) == ["box"] and top.cluster_peers("box") == []
    assert top.primary("box").name == "box"
    assert top.vrrp_peers("box") == [] and top.lb_pairs() == {}
    assert names(top.upstreams("box")) == ["box"]
    assert [(g, h.name) for g, h in top.database_clients("box")] == [("app", "box"), ("worker", "box")]
    assert top.addresses((h for _g, h in top.database_clients("box")), besides="box") == []
    assert top.workers() == [] and top.app_of("box").name == "box" and names(top.in_tier_order()) == ["box"]


def test_two_clusters_and_a_worker_pair(make_inventory):
    hosts = {
        "w2": {"address": "10.1.0.42", "groups": ["worker"]},
        "w1": {"address": "10.1.0.41", "groups": ["worker"]},
        "a1": {"address": "10.1.0.21", "roles": ["app"]},
        "p1": {"address": "10.1.0.31", "roles": ["postgres"], "groups": ["one"]},
        "p2": {"address": "10.1.0.32", "roles": ["postgres"], "groups": ["one"]},
        "q1": {"address": "10.1.0.33", "roles": ["postgres"], "groups": ["two"]},
        "vault": {"address": "10.1.0.51", "roles": ["backup"]},
    }
    groups = {
        "one": {"postgres__cluster": "one", "postgres__primary": "p2", "postgres__backup_host": "vault",
                "postgres__users": ["app"], "postgres__databases": [{"name": "app", "owner": "app"}]},
        "two": {"postgres__cluster": "two", "postgres__primary": "q1", "postgres__clients": ["worker"],
                "postgres__users": ["rep"], "postgres__databases": [{"name": "reports", "owner": "rep"}]},
    }
    secrets = {**SECRETS, "postgres_password_rep": "r", "pgbackrest_cipher_pass_one": "c",
               "pgbackrest_sftp_key_one": SECRETS["pgbackrest_sftp_key_main"],
               "pgbackrest_tls_ca_key_one": SECRETS["pgbackrest_tls_ca_key_main"]}
    peers = load(make_inventory(hosts=hosts, groups=groups), secrets=secrets)[0].peers
    top = Topology(peers)
    assert {c: names(m) for c, m in top.clusters().items()} == {"one": ["p1", "p2"], "two": ["q1"]}
    assert top.primary("p1").name == "p2"
    assert [h.name for _g, h in top.database_clients("q1")] == ["w1", "w2"]
    assert [h.name for _g, h in top.database_clients("p1")] == ["a1", "w1", "w2"]
    assert top.app_database("a1").cluster == "one"
    assert top.backup_clients("vault") == {"one": ["10.1.0.31", "10.1.0.32"]}
    assert top.backup_host("two") is None
    assert top.workers() == [] and top.app_of("w1").name == "a1"
    assert names(top.in_tier_order()) == ["a1", "w1", "w2", "p1", "p2", "q1", "vault"]

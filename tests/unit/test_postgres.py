"""The postgres role's settings, cross-host rules, pg_hba and SCRAM verifiers (no hosts)."""

from __future__ import annotations

import pytest

from roles.postgres import scram
from roles.postgres.deploy import config_context, hba_rules
from roles.postgres.orchestrate import _inventory_change
from tests.unit.conftest import SECRETS
from webstack.errors import ConfigError
from webstack.inventory import load

DB_HOSTS = {
    "app1": {"address": "10.1.0.21", "groups": ["app"]},
    "db1": {"address": "10.1.0.31", "roles": ["postgres"], "groups": ["db"], "release": "trixie"},
    "db2": {"address": "10.1.0.32", "roles": ["postgres"], "groups": ["db"], "release": "trixie"},
    "other": {"address": "10.1.0.99", "groups": ["misc"]},
}
DB_GROUP = {"postgres__primary": "db1", "postgres__users": ["app"],
            "postgres__databases": [{"name": "app", "owner": "app"}]}


def error_of(inv) -> str:
    with pytest.raises(ConfigError) as info:
        load(inv, secrets=SECRETS)
    return str(info.value)


def test_cluster_loads(make_inventory):
    cfgs = {c.name: c for c in load(make_inventory(hosts=DB_HOSTS, groups={"db": DB_GROUP}), secrets=SECRETS)}
    ctx = config_context(cfgs["db2"], memory_mb=4096)
    assert not ctx["is_primary"] and ctx["primary_address"] == "10.1.0.31" and ctx["slot"] == "db2"
    assert ctx["shared_buffers_mb"] == 1024 and ctx["effective_cache_size_mb"] == 3072
    assert config_context(cfgs["db1"], memory_mb=4096)["is_primary"]


def test_two_primaries(make_inventory):
    inv = make_inventory(hosts=DB_HOSTS, groups={"db": DB_GROUP}, host_data={"db2": {"postgres__primary": "db2"}})
    assert error_of(inv) == (
        f"{inv}/hosts.yml: cluster main: postgres__primary: two primaries named: db1 say 'db1'; db2 say 'db2'"
    )


def test_primary_must_be_a_member(make_inventory):
    inv = make_inventory(hosts=DB_HOSTS, groups={"db": {**DB_GROUP, "postgres__primary": "app1"}})
    assert error_of(inv) == (
        f"{inv}/hosts.yml: cluster main: postgres__primary: 'app1' is not a postgres host of this cluster "
        "(members: db1, db2)"
    )


def test_replica_without_primary(make_inventory):
    inv = make_inventory(hosts=DB_HOSTS, groups={"db": {k: v for k, v in DB_GROUP.items() if k != "postgres__primary"}})
    assert error_of(inv) == f"{inv}/hosts.yml: cluster main: postgres__primary: no primary named"


def test_one_release_per_cluster(make_inventory):
    hosts = {**DB_HOSTS, "db2": {**DB_HOSTS["db2"], "release": "bookworm"}}
    inv = make_inventory(hosts=hosts, groups={"db": DB_GROUP})
    assert error_of(inv).startswith(f"{inv}/hosts.yml: cluster main: release: members run different Debian releases")


def test_owner_must_be_a_user(make_inventory):
    inv = make_inventory(hosts=DB_HOSTS, groups={"db": {**DB_GROUP, "postgres__users": ["web"]}})
    assert error_of(inv) == f"{inv}/group_data/db.yml: postgres__databases[0].owner: 'app' is not in postgres__users"


def test_password_secret_required(make_inventory):
    inv = make_inventory(hosts=DB_HOSTS, groups={"db": {**DB_GROUP, "postgres__users": ["app", "report"]}})
    assert error_of(inv).startswith(f"{inv}/secrets.age: postgres_password_report: missing secret")


def test_hba_and_firewall_follow_the_inventory(make_inventory):
    from roles.base.deploy import firewall_rules

    cfgs = {c.name: c for c in load(make_inventory(hosts=DB_HOSTS, groups={"db": DB_GROUP}), secrets=SECRETS)}
    rules = {(r["database"], r["user"], r["address"]) for r in hba_rules(cfgs["db1"])}
    assert rules == {("app", "app", "10.1.0.21/32"), ("replication", "replicator", "10.1.0.32/32"),
                     ("postgres", "replicator", "10.1.0.32/32")}
    sets, fw = firewall_rules(cfgs["db1"])
    sources = {s["name"]: s["elements"] for s in sets}
    assert sources["postgres0_v4"] == ["10.1.0.21"] and sources["postgres1_v4"] == ["10.1.0.32"]
    assert all("10.1.0.99" not in elements for elements in sources.values())
    assert not any("5432" in rule for rule in firewall_rules(cfgs["app1"])[1])


def test_scram_verifier_round_trip():
    stored = scram.verifier("correct horse")
    assert stored.startswith("SCRAM-SHA-256$4096:")
    assert scram.matches("correct horse", stored)
    assert not scram.matches("wrong", stored)
    assert not scram.matches("correct horse", "md5abcdef")
    assert not scram.matches("correct horse", None)


def test_inventory_change_finds_the_primary_in_the_old_primarys_host_file(make_inventory):
    # A switchover writes the change from the new primary's context; the line lives in db1's file.
    group = {k: v for k, v in DB_GROUP.items() if k != "postgres__primary"}
    inv = make_inventory(hosts=DB_HOSTS, groups={"db": group},
                         host_data={"db1": {"postgres__primary": "db1"}, "db2": {"postgres__primary": "db1"}})
    cfgs = {c.name: c for c in load(inv, secrets=SECRETS)}
    _inventory_change(cfgs["db2"], "db1", "db2", write=True)
    assert (inv / "host_data" / "db1.yml").read_text() == "postgres__primary: db2\n"
    assert (inv / "host_data" / "db2.yml").read_text() == "postgres__primary: db2\n"


def test_divergence_helpers_read_history_files():
    from roles.postgres.orchestrate import fork_point, fork_segment

    history = "1\t0/3000148\tno recovery target specified\n\n2\t0/5000A0\tno recovery target specified\n"
    assert fork_point(history, 1) == "0/3000148" and fork_point(history, 2) == "0/5000A0"
    assert fork_point(history, 3) is None
    assert fork_segment("0/50000A0") == "0000000000000005" and fork_segment("1/FF000000") == "00000001000000FF"


def test_a_synchronous_primary_waits_only_for_members_that_can_acknowledge(make_inventory):
    from roles.postgres.deploy import sync_standbys

    hosts = {**DB_HOSTS, "db3": {"address": "10.1.0.33", "roles": ["postgres"], "groups": ["db"], "release": "trixie"}}
    cfgs = {c.name: c for c in load(make_inventory(hosts=hosts, groups={"db": {**DB_GROUP, "postgres__synchronous": True}}),
                                    secrets=SECRETS)}
    standby = {"standby_signal": True, "running": True}
    fenced = {"standby_signal": False, "running": False}  # a former primary waiting for its rejoin
    # Both replicas standbys of this run, or one streaming from outside it: both count.
    assert sync_standbys(cfgs["db1"], {"db2": standby, "db3": standby}, []) == ["db2", "db3"]
    assert sync_standbys(cfgs["db1"], {"db2": "unreachable", "db3": standby}, ["db2"]) == ["db2", "db3"]
    # Not installed yet: this run clones it.
    assert sync_standbys(cfgs["db1"], {"db2": None, "db3": standby}, []) == ["db2", "db3"]
    # After a failover: the old primary is fenced, or outside the run and silent: left out.
    assert sync_standbys(cfgs["db1"], {"db2": fenced, "db3": "unreachable"}, []) == []
    assert sync_standbys(cfgs["db1"], {"db2": fenced, "db3": standby}, ["db3"]) == ["db3"]
    ctx = config_context(cfgs["db1"], memory_mb=4096, standbys=[])
    assert ctx["synchronous_standbys"] == []
    assert config_context(cfgs["db1"], memory_mb=4096)["synchronous_standbys"] == ["db2", "db3"]


def test_database_certificates_derive_from_the_cluster_key_and_carry_a_channel_binding_hash():
    """Same secret, same files (a second run changes nothing); an ECDSA-SHA256 signature, whose hash
    SCRAM-SHA-256-PLUS's tls-server-end-point needs (an Ed25519 certificate has none); the member's
    name and address in the certificate, which verify-full checks."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from webstack import tls

    key = tls.new_p256_key()
    ca_pem = tls.pg_ca(key, "ca main")
    leaf_key, leaf_pem = tls.pg_server(key, "ca main", "db1", ["10.1.0.31"])
    assert (ca_pem, (leaf_key, leaf_pem)) == (tls.pg_ca(key, "ca main"), tls.pg_server(key, "ca main", "db1", ["10.1.0.31"]))
    assert tls.pg_server(key, "ca main", "db2", ["10.1.0.32"])[0] != leaf_key  # one key per member
    ca, leaf = x509.load_pem_x509_certificate(ca_pem.encode()), x509.load_pem_x509_certificate(leaf_pem.encode())
    leaf.verify_directly_issued_by(ca)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["db1"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.0.31")]
    assert tls.key_matches_certificate(leaf_key, leaf_pem)
    with pytest.raises(ValueError, match="not an ECDSA P-256 private key"):
        tls.pg_ca(tls.new_ed25519_key(), "ca main")


def test_every_connection_to_a_member_verifies_it_and_binds_the_channel(make_inventory):
    """No sslmode=require left anywhere: replication, clones, rewind, fencing, the probes and the
    application all verify the member's certificate against the cluster's CA and bind the channel."""
    import subprocess
    from pathlib import Path

    from roles._lib import render
    from roles.postgres import certs
    from roles.postgres.facts import primary_probe

    root = Path(__file__).resolve().parents[2]
    left = subprocess.run(["grep", "-rn", "sslmode=require", "roles", "templates", "webstack", "webstack_agent"],
                          capture_output=True, text=True, cwd=root)
    assert left.stdout == ""
    wanted = "sslmode=verify-full sslrootcert=/etc/webstack/postgres-main-ca.crt channel_binding=require"
    assert certs.client_options("main") == wanted
    cfgs = {c.name: c for c in load(make_inventory(hosts=DB_HOSTS, groups={"db": DB_GROUP}), secrets=SECRETS)}
    conf = render("postgres/etc/postgresql/main/conf.d/webstack.conf.j2", **config_context(cfgs["db2"], memory_mb=4096))
    assert f"primary_conninfo = 'host=10.1.0.31 port=5432 user=replicator application_name=db2 {wanted}'" in conf
    assert "ssl_cert_file = '/etc/webstack/postgres-server.crt'" in conf
    assert wanted in primary_probe("10.1.0.32", wanted)

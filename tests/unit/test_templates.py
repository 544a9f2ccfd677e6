"""Render every template for every host of every shipped inventory.

Rendered files are checked by the real validators where the control machine
has them (``nft -c``, ``visudo -c``); sshd's own check runs on the servers in
the integration tests.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from roles._lib import render
from roles.base import _release
from roles.base.deploy import firewall_rules, sshd_context
from roles.base.settings import BaseSettings
from tests.unit.conftest import KEY, SECRETS
from webstack import tls
from webstack.inventory import load

ROOT = Path(__file__).resolve().parents[2]


def lab_inventory(tmp: Path) -> Path:
    """The lab inventory as `python -m lab up` writes it, from lab/fleet.yml."""
    inv = tmp / "lab"
    shutil.copytree(ROOT / "inventories" / "lab", inv, ignore=shutil.ignore_patterns("hosts.yml", "secrets.*"))
    # The lab's key exists only once the lab is up; unit tests need no lab.
    all_yml = inv / "group_data" / "all.yml"
    all_yml.write_text(all_yml.read_text().replace('"file:/var/lib/webstack-lab/ssh/id_ed25519.pub"', f'"{KEY}"'))
    if not (inv / "ca.crt").exists():  # written by the lab's secrets generator, absent in a fresh clone
        (inv / "ca.crt").write_text(tls.make_ca()[1])
    fleet = yaml.safe_load((ROOT / "lab" / "fleet.yml").read_text())
    hosts = {m["name"]: {k: m[k] for k in ("address", "release", "roles", "groups")} for m in fleet["machines"]
             if not m.get("on_demand")}
    (inv / "hosts.yml").write_text(yaml.safe_dump({"ssh": {"user": "ops"}, "hosts": hosts}))
    return inv


def shipped(tmp: Path) -> list:
    """(inventory name, HostConfig) for every host of every shipped inventory."""
    out = []
    for inv in (lab_inventory(tmp), ROOT / "inventories" / "example-production"):
        for cfg in load(inv, secrets=SECRETS):
            out.append((inv.name, cfg))
    return out


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    return shipped(tmp_path_factory.mktemp("inv"))


def test_every_shipped_inventory_loads(hosts):
    names = {env for env, _ in hosts}
    assert names == {"lab", "example-production"}
    assert len(hosts) == 15 + 8


@pytest.mark.parametrize("release", _release.SSH_KEX)
def test_sshd_config_is_hardened(hosts, release):
    for _env, cfg in hosts:
        text = render("base/etc/ssh/sshd_config.j2", **sshd_context(cfg, release, ["/etc/ssh/ssh_host_ed25519_key"]))
        lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in text.splitlines() if line and not line.startswith("#")}
        assert lines["PasswordAuthentication"] == "no"
        assert lines["PermitRootLogin"] == "no"
        assert lines["AuthenticationMethods"] == "publickey"
        assert "diffie-hellman-group14-sha1" not in lines["KexAlgorithms"]
        assert "hmac-sha1" not in lines["MACs"] and "cbc" not in lines["Ciphers"]
        # The backup host: operators from the admin networks, repository accounts from their clusters only.
        if cfg.name == "backup1" and _env == "lab":
            assert lines["AllowUsers"].split() == [
                "ops@10.77.0.1/32", "pgbr-legacy@10.77.0.33", "pgbr-legacy@10.77.0.34", "pgbr-legacy@10.77.0.71",
                "pgbr-main@10.77.0.31", "pgbr-main@10.77.0.32", "pgbr-main@10.77.0.71"], lines["AllowUsers"]
        elif _env == "lab":
            assert "AllowUsers" not in lines
        # OpenSSH 9.8+ only: the narrow admin networks are exempt from PerSourcePenalties.
        exempt = lines.get("PerSourcePenaltyExemptList")
        if _env == "lab":
            assert exempt == ("10.77.0.1/32" if _release.SSH_PENALTIES[release] else None), exempt


@pytest.mark.skipif(not shutil.which("nft"), reason="nft not installed on the control machine")
def test_nftables_ruleset_is_valid_and_default_deny(hosts, tmp_path):
    for env, cfg in hosts:
        sets, rules = firewall_rules(cfg)
        text = render("base/etc/nftables.conf.j2", sets=sets, rules=rules)
        path = tmp_path / f"{env}-{cfg.name}.nft"
        path.write_text(text)
        check = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, f"{env}/{cfg.name}: {check.stderr}"
        assert "policy drop;" in text
        assert any("tcp dport 22 accept" in r for r in rules)


def test_firewall_opening_from_group_lists_its_members(tmp_path):
    cfgs = {c.name: c for c in load(ROOT / "inventories" / "example-production", secrets=SECRETS)}
    sets, rules = firewall_rules(cfgs["db1"])
    opening = next(s for s in sets if s["name"] == "open0_v4")
    assert opening["elements"] == ["192.0.2.41"]  # worker1 only
    assert 'ip saddr @open0_v4 tcp dport 9100 accept comment "metrics scraped by worker1"' in rules
    ssh = next(s for s in sets if s["name"] == "ssh_v4")
    assert ssh["elements"] == ["203.0.113.0/24"]
    assert not any(s["name"].startswith("open") for s in firewall_rules(cfgs["app1"])[0])
    # host_data narrows SSH on the off-site backup host
    assert next(s for s in firewall_rules(cfgs["backup1"])[0] if s["name"] == "ssh_v4")["elements"] == ["203.0.113.10/32"]


@pytest.mark.skipif(not shutil.which("visudo"), reason="visudo not installed on the control machine")
def test_sudoers_passes_visudo(tmp_path):
    path = tmp_path / "sudoers"
    path.write_text(render("base/etc/sudoers.d/webstack-admin.j2", admin_group="webstack-admin"))
    check = subprocess.run(["visudo", "-c", "-q", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_hosts_file_lists_every_peer(hosts):
    for env, cfg in hosts:
        text = render("base/etc/hosts.j2", name=cfg.name, env=env, peers=cfg.peers)
        for peer in cfg.peers:
            assert f"{peer.address}\t{peer.name}" in text
        assert "127.0.1.1" not in text  # the host's name resolves to its real address


def test_other_templates_render(hosts):
    _env, cfg = hosts[0]
    base = cfg.settings(BaseSettings)
    chrony = render("base/etc/chrony/chrony.conf.j2", servers=base.ntp_servers)
    assert "pool 10.77.0.1 iburst" in chrony
    assert "Storage=persistent" in render("base/etc/systemd/journald.conf.d/webstack.conf.j2", max_use="1G")
    unattended = render("base/etc/apt/apt.conf.d/52webstack-unattended.j2", enabled=True, reboot=False,
                        reboot_time="04:00")
    assert 'APT::Periodic::Unattended-Upgrade "1";' in unattended
    sysctl = render("base/etc/sysctl.d/60-webstack.conf.j2", sysctls=_release.SYSCTLS)
    assert "net.ipv4.tcp_syncookies = 1" in sysctl


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_app_service_and_its_socket_verify_together(hosts, tmp_path):
    """A lone application server takes its port from a systemd socket (open while it restarts); each
    unit alone fails systemd-analyze verify, so the role verifies them side by side, as here. With
    two or more servers (the lab) there is no socket: a dead server must refuse connections."""
    from roles._lib import render
    from roles.app.deploy import socket_content, unit_content

    cfg = next(cfg for _inv, cfg in hosts if "app" in cfg.roles)
    assert socket_content(cfg) is None and "Requires=" not in unit_content(cfg)
    # The control machine has no gunicorn; the servers do (the role installs it first).
    lone = dict(name="webapp", port=8000, workers=2, module="app:application")
    (tmp_path / "webapp.service").write_text(
        render("app/etc/systemd/system/app.service.j2", socket=True, **lone).replace("/usr/bin/gunicorn", "/bin/true"))
    (tmp_path / "webapp.socket").write_text(render("app/etc/systemd/system/app.socket.j2", name="webapp", port=8000))
    assert "Requires=webapp.socket" in (tmp_path / "webapp.service").read_text()
    for unit in ("webapp.service", "webapp.socket"):
        result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr

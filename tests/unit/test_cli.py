"""Bad input stops the real pyinfra CLI before it connects to anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyrage
import pytest

from webstack import secrets
from webstack.sshkeys import new_private_key
from webstack.tls import new_ed25519_key, new_p256_key

ROOT = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).parent / "pyinfra")


@pytest.fixture
def prod(tmp_path, monkeypatch):
    """A copy of the example production inventory with its own key and secrets."""
    ident = pyrage.x25519.Identity.generate()
    monkeypatch.setenv("WEBSTACK_AGE_KEY", str(ident))
    inv = tmp_path / "prod"
    shutil.copytree(ROOT / "inventories" / "example-production", inv)
    shutil.copy(ROOT / "inventories" / "example-production.py", tmp_path / "prod.py")
    (inv / "secrets.recipients").write_text(f"{ident.to_public()}\n")
    secrets.encrypt(inv, {"password_hash_ops": "$6$x$y", "postgres_password_replicator": "r",
                          "postgres_password_app": "a", "tls_cert": "c", "tls_key": "k", "app_secret_key": "s",
                          "pgbackrest_cipher_pass_main": "p", "pgbackrest_sftp_key_main": new_private_key(),
                          "pgbackrest_tls_ca_key_main": new_ed25519_key(), "postgres_tls_ca_key_main": new_p256_key()})
    return inv


def run_pyinfra(inv: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYINFRA, "-y", str(inv.with_suffix(".py")), "deploys/site.py"],
        cwd=ROOT, capture_output=True, text=True, env=os.environ, timeout=60,
    )


def assert_stopped_before_connecting(result: subprocess.CompletedProcess, message: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in out, out
    assert "Connecting to hosts" not in out


def test_valid_inventory_passes_check(prod):
    result = subprocess.run([sys.executable, "-m", "webstack.cli", "check", str(prod)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{prod}: 8 hosts OK"


def test_certificate_without_an_acme_directory_names_the_key_and_connects_nowhere(prod):
    result = subprocess.run([sys.executable, "-m", "webstack.cli", "certificate", str(prod)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "lb__acme_directory: not set" in result.stderr and str(prod) in result.stderr
    with open(prod / "group_data" / "lb.yml", "a") as f:
        f.write("lb__acme_directory: https://acme.example/dir\nlb__acme_renew_days: 7\n")
    result = subprocess.run([sys.executable, "-m", "webstack.cli", "certificate", str(prod)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "lb__acme_renew_days" in result.stderr, result.stderr


def test_unknown_secret_fails_check(prod):
    data = secrets.decrypt(prod)
    secrets.encrypt(prod, {**data, "postgres_pasword_app": "typo"})
    result = subprocess.run([sys.executable, "-m", "webstack.cli", "check", str(prod)], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{prod}/secrets.age: postgres_pasword_app: unknown secret(s), needed by no host" in result.stderr
    assert "typo" not in result.stdout + result.stderr


def test_unknown_key(prod):
    with open(prod / "group_data" / "db.yml", "a") as f:
        f.write("base__ssh_prot: 22\n")
    assert_stopped_before_connecting(run_pyinfra(prod), f"webstack: {prod}/group_data/db.yml: base__ssh_prot: unknown key")


def test_malformed_yaml(prod):
    (prod / "host_data" / "backup1.yml").write_text("base__admin_networks: [\n")
    assert_stopped_before_connecting(run_pyinfra(prod), f"webstack: {prod}/host_data/backup1.yml:2: malformed YAML")


def test_missing_secret(prod):
    secrets.encrypt(prod, {})
    assert_stopped_before_connecting(
        run_pyinfra(prod), f"webstack: {prod}/secrets.age: password_hash_ops: missing secret (needed by host lb1)"
    )


def test_wrong_key(prod, monkeypatch):
    monkeypatch.setenv("WEBSTACK_AGE_KEY", str(pyrage.x25519.Identity.generate()))
    assert_stopped_before_connecting(run_pyinfra(prod), f"webstack: {prod}/secrets.age: cannot decrypt")


def test_secret_value_never_printed(prod):
    secrets.encrypt(prod, {"password_hash_ops": "$6$x$y", "unused": "TOPSECRET-42"})
    (prod / "hosts.yml").write_text((prod / "hosts.yml").read_text().replace("192.0.2.12", "192.0.2.11"))
    result = run_pyinfra(prod)
    assert_stopped_before_connecting(result, "is also the address of lb1")
    assert "TOPSECRET" not in result.stdout + result.stderr


def test_debug_inventory_prints_settings_and_no_secret(prod):
    result = subprocess.run([PYINFRA, str(prod.with_suffix(".py")), "debug-inventory"], cwd=ROOT,
                            capture_output=True, text=True, env=os.environ, timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert '"ssh_port": 22' in out and '"admin_networks": [' in out and '"pgbackrest_sftp_key_main"' in out
    assert "Connecting to hosts" not in out and "BEGIN OPENSSH" not in out


def test_ssh_port_has_one_owner(prod):
    (prod / "hosts.yml").write_text((prod / "hosts.yml").read_text().replace(
        "lb1:     {address: 192.0.2.11,", "lb1:     {address: 192.0.2.11, port: 2222,"))
    assert_stopped_before_connecting(run_pyinfra(prod), "hosts.lb1.port: not here: the SSH port is the setting "
                                                        "base__ssh_port")

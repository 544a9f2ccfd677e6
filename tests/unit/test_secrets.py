"""The age secrets file: round trip, keys from env or file, no value ever printed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pyrage
import pytest

from webstack import secrets
from webstack.errors import ConfigError


@pytest.fixture
def inv(tmp_path, monkeypatch):
    ident = pyrage.x25519.Identity.generate()
    monkeypatch.setenv("WEBSTACK_AGE_KEY", str(ident))
    monkeypatch.delenv("WEBSTACK_AGE_KEY_FILE", raising=False)
    inv = tmp_path / "prod"
    inv.mkdir()
    (inv / "secrets.recipients").write_text(f"# ops\n{ident.to_public()}\n")
    return inv


def test_round_trip_and_mode(inv):
    secrets.encrypt(inv, {"db_password": "s3cret-value"})
    blob = (inv / "secrets.age").read_bytes()
    assert blob.startswith(b"-----BEGIN AGE ENCRYPTED FILE-----")
    assert b"s3cret-value" not in blob and b"db_password" not in blob
    assert stat.S_IMODE((inv / "secrets.age").stat().st_mode) == 0o600
    assert secrets.decrypt(inv) == {"db_password": "s3cret-value"}


def test_key_from_file(inv, tmp_path, monkeypatch):
    secrets.encrypt(inv, {"a": "b"})
    key = os.environ["WEBSTACK_AGE_KEY"]
    monkeypatch.delenv("WEBSTACK_AGE_KEY")
    keyfile = tmp_path / "k.agekey"
    keyfile.write_text(f"# comment\n{key}\n")
    monkeypatch.setenv("WEBSTACK_AGE_KEY_FILE", str(keyfile))
    assert secrets.decrypt(inv) == {"a": "b"}


def test_wrong_key_is_a_clear_error(inv, monkeypatch):
    secrets.encrypt(inv, {"a": "b"})
    monkeypatch.setenv("WEBSTACK_AGE_KEY", str(pyrage.x25519.Identity.generate()))
    with pytest.raises(ConfigError) as info:
        secrets.decrypt(inv)
    assert str(info.value) == f"{inv}/secrets.age: cannot decrypt with the configured key (wrong key?)"


def test_missing_key(inv, tmp_path, monkeypatch):
    secrets.encrypt(inv, {"a": "b"})
    monkeypatch.delenv("WEBSTACK_AGE_KEY")
    monkeypatch.setenv("WEBSTACK_AGE_KEY_FILE", str(tmp_path / "absent.agekey"))
    with pytest.raises(ConfigError) as info:
        secrets.decrypt(inv)
    assert "no key to decrypt it" in str(info.value)


def test_non_string_value_names_key_not_value():
    with pytest.raises(ConfigError) as info:
        secrets.parse_plaintext("db_port: 5432\n", "x.age")
    assert str(info.value) == "x.age: db_port: secret values must be strings"
    assert "5432" not in str(info.value)


def test_malformed_plaintext_hides_content():
    with pytest.raises(ConfigError) as info:
        secrets.parse_plaintext("pw: [hunter2\n", "x.age")
    assert "hunter2" not in str(info.value)
    assert str(info.value).startswith("x.age: malformed YAML inside the encrypted file")


def test_cli_set_list_rotate(inv, monkeypatch, tmp_path):
    keyfile = tmp_path / "prod.agekey"
    keyfile.write_text(os.environ["WEBSTACK_AGE_KEY"] + "\n")
    env = {**os.environ, "WEBSTACK_AGE_KEY_FILE": str(keyfile)}
    env.pop("WEBSTACK_AGE_KEY")
    secrets.encrypt(inv, {})

    def run(*args, stdin=""):
        return subprocess.run([sys.executable, "-m", "webstack.cli", "secrets", *args], input=stdin,
                              capture_output=True, text=True, env=env)

    assert run("set", str(inv), "api_token", stdin="tok-123\n").returncode == 0
    listed = run("list", str(inv))
    assert listed.stdout.split() == ["api_token"] and "tok-123" not in listed.stdout
    old_recipients = (inv / "secrets.recipients").read_text()
    colleague = pyrage.x25519.Identity.generate()
    (inv / "secrets.recipients").write_text(old_recipients + f"{colleague.to_public()}\n")
    rotated = run("rotate", str(inv))
    assert rotated.returncode == 0, rotated.stderr
    listed = [x for x in (inv / "secrets.recipients").read_text().splitlines() if x and not x.startswith("#")]
    mine = [x for x in old_recipients.splitlines() if x and not x.startswith("#")]
    assert str(colleague.to_public()) in listed and not set(mine) & set(listed) and len(listed) == 2
    # The colleague still opens the file.
    assert b"api_token" in pyrage.decrypt((inv / "secrets.age").read_bytes(), [colleague])
    assert (tmp_path / "prod.agekey.old").exists()
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    monkeypatch.setenv("WEBSTACK_AGE_KEY_FILE", str(keyfile))
    monkeypatch.delenv("WEBSTACK_AGE_KEY")
    assert secrets.decrypt(inv) == {"api_token": "tok-123"}
    # The old key no longer opens the rotated file.
    monkeypatch.setenv("WEBSTACK_AGE_KEY_FILE", str(tmp_path / "prod.agekey.old"))
    with pytest.raises(ConfigError):
        secrets.decrypt(inv)


def test_lab_certificates_pass_strict_verification(tmp_path):
    """Python 3.13's default TLS context verifies strictly (key identifiers required): the worker on
    Debian 13 checks mail1's certificate that way."""
    import subprocess

    from webstack import tls

    ca_key, ca_cert = tls.make_ca()
    _key, chain = tls.issue(ca_key, ca_cert, ["mail1"], ["10.77.0.81"])
    (tmp_path / "ca.pem").write_text(ca_cert)
    (tmp_path / "chain.pem").write_text(chain)
    out = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "ca.pem"),
                          str(tmp_path / "chain.pem")], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_certificate_and_key_are_checked_to_match_and_leaves_live_under_200_days():
    from webstack import tls

    ca_key, ca_cert = tls.make_ca()
    key, chain = tls.issue(ca_key, ca_cert, ["www.example.test"], [])
    other_key, _ = tls.issue(ca_key, ca_cert, ["www.example.test"], [])
    assert tls.key_matches_certificate(key, chain)
    assert not tls.key_matches_certificate(other_key, chain)
    import datetime as dt

    assert tls.not_after(chain) - dt.datetime.now(dt.UTC) < dt.timedelta(days=200)

"""The ACME client (webstack/acme.py) against a real pebble (Debian's ACME test server) on
loopback, and the renewal rule of ``webstack certificate``. The lab test (tests/integration/
test_web.py) has pebble validate HTTP-01 through the load-balancer pair for real; here its
validation is switched off (PEBBLE_VA_ALWAYS_VALID) and half of all nonces are refused, so
the client's retry is exercised."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import time

import pytest
from cryptography import x509

from webstack import acme, tls
from webstack.certificate import due

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"  # Makefile HOST_PACKAGES installs it


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pebble(tmp_path_factory):
    d = tmp_path_factory.mktemp("pebble")
    ca_key, ca_cert = tls.make_ca("pebble test CA")
    key, chain = tls.issue(ca_key, ca_cert, ["localhost"], ["127.0.0.1"])
    (d / "ca.crt").write_text(ca_cert)
    (d / "key.pem").write_text(key)
    (d / "cert.pem").write_text(chain)
    port, mgmt = _port(), _port()
    (d / "config.json").write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{port}", "managementListenAddress": f"127.0.0.1:{mgmt}",
        "certificate": str(d / "cert.pem"), "privateKey": str(d / "key.pem"), "httpPort": 80, "tlsPort": 443,
        "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
    env = {**os.environ, "PEBBLE_VA_ALWAYS_VALID": "1", "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "50"}
    proc = subprocess.Popen([PEBBLE, "-config", str(d / "config.json")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline, "pebble did not start"
            time.sleep(0.1)
        yield {"directory": f"https://127.0.0.1:{port}/dir", "ca_file": str(d / "ca.crt")}
    finally:
        proc.terminate()
        proc.wait()


def test_an_order_publishes_each_token_and_returns_a_chain_for_its_own_key(pebble):
    client = acme.Client(pebble["directory"], tls.new_p256_key(), ca_file=pebble["ca_file"], poll_s=0.1)
    account = client.account("ops@example.com")
    assert account.startswith("https://127.0.0.1:")
    published, withdrawn = {}, []
    key, chain = client.order(["www.example.test", "example.test"],
                              lambda token, auth: published.__setitem__(token, auth), withdrawn.append)
    assert len(published) == 2 and sorted(withdrawn) == sorted(published)
    for token, auth in published.items():
        assert auth == f"{token}.{acme.thumbprint(client.key)}"
    assert tls.key_matches_certificate(key, chain) and chain.count("BEGIN CERTIFICATE") >= 2
    leaf = x509.load_pem_x509_certificate(chain.encode())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert sorted(names) == ["example.test", "www.example.test"]
    # The same key finds the same account again.
    again = acme.Client(pebble["directory"], _pem(client), ca_file=pebble["ca_file"])
    assert again.account() == account


def _pem(client: acme.Client) -> str:
    from cryptography.hazmat.primitives import serialization

    return client.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()


def test_a_failed_publication_withdraws_what_was_published_and_says_why(pebble):
    client = acme.Client(pebble["directory"], tls.new_p256_key(), ca_file=pebble["ca_file"], poll_s=0.1)
    withdrawn = []

    def publish(token, auth):
        raise acme.AcmeError("lb2: unreachable")

    with pytest.raises(acme.AcmeError, match="lb2: unreachable"):
        client.order(["www.example.test"], publish, withdrawn.append)
    assert len(withdrawn) == 1  # lb1 may hold it already: withdrawn everywhere
    with pytest.raises(acme.AcmeError, match="P-256"):
        acme.Client(pebble["directory"], tls.new_ed25519_key(), ca_file=pebble["ca_file"])


def test_an_untrusted_acme_server_is_refused(pebble):
    with pytest.raises(acme.AcmeError, match="CERTIFICATE_VERIFY_FAILED"):
        acme.Client(pebble["directory"], tls.new_p256_key())


def test_renewal_is_due_without_a_certificate_for_a_missing_name_and_within_the_window():
    ca_key, ca_cert = tls.make_ca()
    _key, chain = tls.issue(ca_key, ca_cert, ["www.example.test", "example.test"], [], days=90)
    now = dt.datetime.now(dt.UTC)
    assert due(None, ["www.example.test"], now, 30) == "no certificate (secret tls_cert)"
    assert due(chain, ["www.example.test", "example.test"], now, 30) == ""
    assert due(chain, ["www.example.test", "shop.example.test"], now, 30) == "it does not cover shop.example.test"
    assert "within 30 days" in due(chain, ["www.example.test"], now + dt.timedelta(days=61), 30)


def test_lb_settings_refuse_a_renewal_after_the_checks_alarm_and_a_plain_http_directory():
    from roles.lb.settings import LbSettings

    acme_on = {"acme_directory": "https://acme.example/dir"}
    assert LbSettings(**acme_on).check() is None
    assert LbSettings(**acme_on, acme_renew_days=14).check()[0] == "acme_renew_days"
    assert LbSettings(acme_directory="http://acme.example/dir").check()[0] == "acme_directory"

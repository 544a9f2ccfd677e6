"""``webstack certificate``: the load balancers' certificate from an ACME CA, renewed before expiry.

    webstack certificate inventories/<env> [--force] [--renew-days N] [--no-push]

Run on the control machine (daily from a timer or CI is enough: it does nothing until the
certificate is due). One certificate and key for both load balancers, stored where a
certificate from elsewhere lives: the inventory's secrets ``tls_cert`` (chain) and ``tls_key``.

**HTTP-01 through the pair.** The ACME server fetches ``http://<name>/.well-known/acme-challenge/
<token>`` from whichever load balancer holds the VIP at that moment; the token file is written
to every load balancer first (over SSH, as ``webstack exec`` does), so a VIP move during the
validation changes nothing, and removed afterwards. No DNS-provider credentials anywhere, any
DNS works; what it cannot do is a wildcard name (DNS-01 only).

Due when there is no certificate, when it does not cover ``lb__server_names``, or when it
expires within ``lb__acme_renew_days`` (30: Let's Encrypt's 90-day certificates are renewed
with a month to go, so two daily failures in a row still leave weeks). ``--force``: now.
Afterwards ``deploys/site.py --limit lb`` puts it on the load balancers (the key checked against
the certificate, ``nginx -t``, a graceful reload: no request dropped), unless ``--no-push``.
``deploys/check.py`` still fails when the served certificate expires within
``lb__cert_warning_days`` (21), i.e. when renewals have failed for 9 days.
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from webstack import acme, secrets, tls
from webstack.errors import ConfigError

CHALLENGE_DIR = "/var/www/acme/.well-known/acme-challenge"
TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,256}$")


def due(cert_pem: str | None, names: list[str], now: dt.datetime, renew_days: int) -> str:
    """Why the certificate must be renewed now ("" when it need not)."""
    if not cert_pem:
        return "no certificate (secret tls_cert)"
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    try:
        covered = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                      .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        covered = set()
    missing = [n for n in names if n not in covered]
    if missing:
        return f"it does not cover {', '.join(missing)}"
    left = cert.not_valid_after_utc - now
    if left <= dt.timedelta(days=renew_days):
        return f"it expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, within {renew_days} days"
    return ""


def _on(target, command: str, data: str = "") -> None:
    from webstack.remote import ssh_argv

    proc = subprocess.run(ssh_argv(target, command), input=data, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise acme.AcmeError(f"{target.name}: {command!r} failed: {proc.stderr.strip()[-500:]}")


def served(address: str, name: str) -> bytes:
    """The certificate (DER) a load balancer serves for ``name``; b"" when it cannot be reached."""
    import socket
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # compared, not trusted
    try:
        with socket.create_connection((address, 443), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=name) as conn:
            return conn.getpeercert(binary_form=True) or b""
    except OSError:
        return b""


def _leaf_der(chain_pem: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_pem_x509_certificate(chain_pem.encode()).public_bytes(serialization.Encoding.DER)


def _push(inv: Path) -> int:
    pyinfra = Path(sys.executable).parent / "pyinfra"
    cmd = [str(pyinfra), "-y", str(inv.resolve().with_suffix(".py")), "deploys/site.py", "--limit", "lb"]
    print("certificate: " + " ".join(cmd[1:]))
    return subprocess.run(cmd, check=False, cwd=Path(__file__).resolve().parent.parent).returncode


def run(inv: Path, force: bool = False, renew_days: int | None = None, push: bool = True,
        now: dt.datetime | None = None) -> int:
    from webstack.inventory import load
    from webstack.remote import targets

    configs = load(inv)  # bad input: reported and named before anything is asked or changed
    lbs = [c for c in configs if "lb" in c.roles]
    if not lbs:
        raise ConfigError(str(inv / "hosts.yml"), "roles", "no host has role lb: no certificate to get")
    settings: Any = lbs[0].role_settings["lb"]  # the lb role's settings (the tooling imports no role)
    if not settings.acme_directory:
        raise ConfigError(str(inv / "group_data"), "lb__acme_directory",
                          "not set: the ACME server's directory URL (e.g. Let's Encrypt's)")
    names = list(settings.server_names)
    data = secrets.decrypt(inv)
    days = settings.acme_renew_days if renew_days is None else renew_days
    reason = "--force" if force else due(data.get("tls_cert"), names, now or dt.datetime.now(dt.UTC), days)
    if not reason:
        # Stored but not served (the push after the last order failed: a load balancer was down):
        # push now, instead of waiting for the check's alarm.
        stale = [c.name for c in lbs if served(c.address, names[0]) != _leaf_der(data["tls_cert"])]
        if stale and push:
            print(f"certificate: {', '.join(stale)} serve(s) another certificate than tls_cert: pushing")
            return _push(inv)
        print(f"certificate: {', '.join(names)} valid until {tls.not_after(data['tls_cert']):%Y-%m-%d} "
              f"(renewed {days} days before): nothing to do")
        return 0
    print(f"certificate: ordering {', '.join(names)} from {settings.acme_directory}: {reason}")
    account_key = data.get("acme_account_key") or tls.new_p256_key()
    ca_file = str(inv / settings.acme_ca_file) if settings.acme_ca_file else ""
    hosts = targets(inv, "lb")

    def publish(token: str, key_authorization: str) -> None:
        if not TOKEN.match(token):
            raise acme.AcmeError(f"the server sent a token that is no base64url word: {token[:80]!r}")
        for t in hosts:
            _on(t, f"sh -c 'umask 022; mkdir -p {CHALLENGE_DIR} && cat > {CHALLENGE_DIR}/{token}'", key_authorization)

    def withdraw(token: str) -> None:
        # Best effort, on every host: a load balancer unreachable now must not undo a validated order.
        for t in hosts:
            try:
                _on(t, f"rm -f {CHALLENGE_DIR}/{token}")
            except (acme.AcmeError, subprocess.TimeoutExpired) as e:
                print(f"certificate: warning: token {token} left on {t.name}: {e}", file=sys.stderr)

    client = acme.Client(settings.acme_directory, account_key, ca_file=ca_file)
    client.account(settings.acme_email)
    key, chain = client.order(names, publish, withdraw)
    if not tls.key_matches_certificate(key, chain):
        raise acme.AcmeError("the issued certificate does not carry the requested key")
    data.update(tls_cert=chain, tls_key=key, acme_account_key=account_key)
    secrets.encrypt(inv, data)
    print(f"certificate: issued, valid until {tls.not_after(chain):%Y-%m-%d %H:%M} UTC; "
          f"stored in {inv / 'secrets.age'} (tls_cert, tls_key): commit it")
    return _push(inv) if push else 0

"""Generate the lab's own age key and secrets (never committed).

    python -m webstack.labsecrets [INVENTORY_DIR]

Creates ``~/.config/webstack/lab.agekey`` and ``inventories/lab/secrets.age``
if missing, then adds any secret the lab inventory needs and lacks, with fresh
random values. Existing values are kept, so reruns change nothing.
"""

from __future__ import annotations

import secrets as pysecrets
import subprocess
import sys
from pathlib import Path

import yaml

from webstack import secrets, sshkeys, tls
from webstack.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# Secrets the control machine uses and no host does (``webstack check`` does not call them unknown).
# Secrets no host needs, used on the control machine only (the ACME account: webstack certificate).
CONTROL_ONLY = frozenset({"lab_ca_key", "lab_ca_cert", "acme_account_key"})


def generate(key: str, data: dict[str, str] | None = None, addresses: dict[str, str] | None = None) -> str:
    """A value for a missing lab secret, by naming convention (``data``: the secrets so far, for the
    lab CA; ``addresses``: host name -> address, for certificates naming a host)."""
    if key.startswith("mailprovider_tls_") and data is not None:
        # Key and chain in one PEM, as Postfix's smtpd_tls_chain_files takes them: the
        # relays check the name they connect to (the host name) against the lab CA.
        name = key.removeprefix("mailprovider_tls_")
        ip = (addresses or {}).get(name)
        pem_key, chain = tls.issue(data["lab_ca_key"], data["lab_ca_cert"], [name], [ip] if ip else [])
        return pem_key + chain
    if key.startswith("password_hash_"):
        password = pysecrets.token_urlsafe(18)
        return subprocess.run(
            ["openssl", "passwd", "-6", "-stdin"], input=password, capture_output=True, text=True, check=True
        ).stdout.strip()
    if key.startswith("pgbackrest_sftp_key_"):
        return sshkeys.new_private_key()
    if key.startswith("pgbackrest_tls_ca_key_"):
        return tls.new_ed25519_key()
    if key.startswith("postgres_tls_ca_key_"):
        return tls.new_p256_key()
    if key.startswith("pgbackrest_cipher_pass_"):
        return pysecrets.token_urlsafe(48)  # pgBackRest suggests 48+ random bytes; 64 characters here
    return pysecrets.token_urlsafe(24)


def main(inv: Path) -> int:
    from webstack.inventory import load

    if not secrets.key_file(inv.name).exists() or not (inv / "secrets.recipients").exists():
        keyfile, public = secrets.ensure_identity(inv.name)
        (inv / "secrets.recipients").write_text(f"# the lab's own key ({keyfile})\n{public}\n")
        (inv / "secrets.age").unlink(missing_ok=True)
    data = secrets.decrypt(inv) if (inv / "secrets.age").exists() else {}
    added = []
    if "lab_ca_key" not in data:
        data["lab_ca_key"], data["lab_ca_cert"] = tls.make_ca()
        added += ["lab_ca_key", "lab_ca_cert"]
        data.pop("tls_cert", None)
    if "tls_cert" not in data:
        lb = yaml.safe_load((inv / "group_data" / "lb.yml").read_text()) if (inv / "group_data" / "lb.yml").exists() else {}
        names = lb.get("lb__server_names", ["www.webstack.test"])
        ips = [lb["lb__vip"]] if lb.get("lb__vip") else []
        data["tls_key"], data["tls_cert"] = tls.issue(data["lab_ca_key"], data["lab_ca_cert"], names, ips)
        added += ["tls_key", "tls_cert"]
    (inv / "ca.crt").write_text(data["lab_ca_cert"])
    hosts_file = inv / "hosts.yml"
    hosts = (yaml.safe_load(hosts_file.read_text()) or {}).get("hosts", {}) if hosts_file.exists() else {}
    addresses = {name: h["address"] for name, h in hosts.items() if isinstance(h, dict) and "address" in h}
    while True:
        try:
            load(inv, secrets=data)
            break
        except ConfigError as exc:
            if exc.message.startswith("missing secret") and exc.key:
                data[exc.key] = generate(exc.key, data, addresses)
                added.append(exc.key)
                continue
            raise
    if added or not (inv / "secrets.age").exists():
        secrets.encrypt(inv, data)
    print(f"lab secrets: {len(data)} in {inv / 'secrets.age'}" + (f" (added {', '.join(added)})" if added else ""))
    return 0


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "inventories" / "lab"
    try:
        sys.exit(main(target))
    except ConfigError as exc:
        print(f"webstack: error: {exc}", file=sys.stderr)
        sys.exit(2)

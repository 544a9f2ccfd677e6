"""Helpers to build small inventories in a temp dir."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from webstack.sshkeys import new_private_key
from webstack.tls import new_ed25519_key, new_p256_key

# The fact prefetch records of the runs unit tests simulate stay out of the operator's ~/.cache.
os.environ.setdefault("WEBSTACK_PREFETCH_DIR", tempfile.mkdtemp(prefix="webstack-unit-facts-"))

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@unit"
PG_CA_KEY = new_p256_key()  # one key for all: deriving certificates is what costs
SECRETS = {
    "password_hash_ops": "$6$salt$hash",
    "postgres_password_replicator": "repl-pw",
    "postgres_password_app": "app-pw",
    "tls_cert": "CERT",
    "tls_key": "KEY",
    "app_secret_key": "k3y",
    # The lab's mail provider mail1: the hosts' relay login, the application's sender, its TLS key and chain.
    "smtp_password_relay": "relay-pw",
    "smtp_password_app": "app-mail-pw",
    "mailprovider_tls_mail1": "KEY AND CHAIN",
    # The lab inventory's two clusters back up to backup1.
    **{f"pgbackrest_cipher_pass_{c}": f"cipher-{c}" for c in ("main", "legacy")},
    **{f"pgbackrest_sftp_key_{c}": new_private_key() for c in ("main", "legacy")},
    **{f"pgbackrest_tls_ca_key_{c}": new_ed25519_key() for c in ("main", "legacy")},
    # Every cluster's PostgreSQL CA (the unit tests' inventories name these clusters).
    **{f"postgres_tls_ca_key_{c}": PG_CA_KEY for c in ("main", "legacy", "drill", "one", "two", "reports", "other")},
}


def write_inventory(root: Path, hosts: dict[str, Any] | None = None, groups: dict[str, Any] | None = None,
                    host_data: dict[str, Any] | None = None, raw: dict[str, str] | None = None) -> Path:
    inv = root / "inv"
    (inv / "group_data").mkdir(parents=True, exist_ok=True)
    hosts = hosts if hosts is not None else {
        "web1": {"address": "10.1.0.11", "roles": [], "groups": ["web"]},
        "db1": {"address": "10.1.0.31", "roles": [], "groups": ["db"]},
    }
    (inv / "hosts.yml").write_text(yaml.safe_dump({"ssh": {"user": "ops"}, "hosts": hosts}))
    all_data = {"base__admin_users": [{"name": "ops", "ssh_keys": [KEY]}]}
    for name, data in {"all": all_data, **(groups or {})}.items():
        (inv / "group_data" / f"{name}.yml").write_text(yaml.safe_dump(data))
    for name, data in (host_data or {}).items():
        (inv / "host_data").mkdir(exist_ok=True)
        (inv / "host_data" / f"{name}.yml").write_text(yaml.safe_dump(data))
    for rel, text in (raw or {}).items():
        (inv / rel).parent.mkdir(parents=True, exist_ok=True)
        (inv / rel).write_text(text)
    return inv


@pytest.fixture
def make_inventory(tmp_path):
    def make(**kwargs):
        return write_inventory(tmp_path, **kwargs)

    return make

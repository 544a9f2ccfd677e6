"""SSH keys made and read on the control machine (repository access keys)."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def new_private_key() -> str:
    """A new ed25519 private key in OpenSSH format (what libssh2 and ssh both read)."""
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()


def public_key(private: str) -> str:
    """The ``ssh-ed25519 AAAA...`` line of an OpenSSH private key (unencrypted)."""
    try:
        key = serialization.load_ssh_private_key(private.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted OpenSSH private key: {exc}") from None
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

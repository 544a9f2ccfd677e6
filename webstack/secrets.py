"""Encrypted secrets: one age file per inventory, decrypted in memory only.

``inventories/<env>/secrets.age`` is an ASCII-armored age file (encrypted with
pyrage, the Python binding of the maintained ``rage`` implementation) holding a
flat YAML mapping of secret names to strings. It is encrypted to the X25519
recipients listed in ``inventories/<env>/secrets.recipients`` (public keys,
committed), so several operators can each hold their own key.

The identity (private key) comes from, in order:
``$WEBSTACK_AGE_KEY`` (the ``AGE-SECRET-KEY-...`` string itself),
``$WEBSTACK_AGE_KEY_FILE``, or ``~/.config/webstack/<env>.agekey``; never from
the repository. Decrypted values are wrapped by the loader in pyinfra's
``HiddenValue`` so they print as ``*MASKED*``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyrage
import yaml

from webstack.errors import ConfigError


def key_file(env: str) -> Path:
    """Where an environment's identity lives by default (outside the repo)."""
    configured = os.environ.get("WEBSTACK_AGE_KEY_FILE")
    if configured:
        return Path(configured)
    return Path.home() / ".config" / "webstack" / f"{env}.agekey"


def _identity(inv: Path) -> pyrage.x25519.Identity:
    raw = os.environ.get("WEBSTACK_AGE_KEY")
    source = "$WEBSTACK_AGE_KEY"
    if not raw:
        path = key_file(inv.name)
        source = str(path)
        if not path.exists():
            raise ConfigError(
                str(inv / "secrets.age"), None,
                f"no key to decrypt it: set $WEBSTACK_AGE_KEY or $WEBSTACK_AGE_KEY_FILE, or put the key in {path}",
            )
        raw = "\n".join(
            line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
        )
    try:
        return pyrage.x25519.Identity.from_str(raw.strip())
    except Exception:
        raise ConfigError(source, None, "not an age identity (AGE-SECRET-KEY-...)") from None


def recipients(inv: Path) -> list[pyrage.x25519.Recipient]:
    """The public keys the secrets file is encrypted to."""
    path = inv / "secrets.recipients"
    if not path.exists():
        raise ConfigError(str(path), None, "file not found: list the age public keys (age1...) to encrypt to")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append(pyrage.x25519.Recipient.from_str(line))
        except Exception:
            raise ConfigError(f"{path}:{n}", None, "not an age public key") from None
    if not out:
        raise ConfigError(str(path), None, "no recipients listed")
    return out


def decrypt(inv: Path) -> dict[str, str]:
    """Decrypt and parse an inventory's secrets; values stay in memory only."""
    path = inv / "secrets.age"
    if not path.exists():
        raise ConfigError(str(path), None, f"file not found: create it with `webstack secrets init {inv}`")
    try:
        plain = pyrage.decrypt(path.read_bytes(), [_identity(inv)])
    except pyrage.DecryptError:
        raise ConfigError(str(path), None, "cannot decrypt with the configured key (wrong key?)") from None
    return parse_plaintext(plain.decode("utf-8"), str(path))


def parse_plaintext(text: str, where: str) -> dict[str, str]:
    """Parse decrypted secrets YAML: a flat mapping of names to strings.

    Error messages name keys, never values.
    """
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(where, None, f"malformed YAML inside the encrypted file{line}") from None
    if not isinstance(data, dict):
        raise ConfigError(where, None, "must hold a mapping of secret names to strings")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(where, str(key), "secret values must be strings")
    return data


def encrypt(inv: Path, data: dict[str, str]) -> None:
    """Encrypt ``data`` to the inventory's recipients and write it atomically (0600)."""
    plain = yaml.safe_dump(dict(sorted(data.items())), default_flow_style=False).encode()
    blob = pyrage.encrypt(plain, recipients(inv), armored=True)
    target = inv / "secrets.age"
    tmp = target.with_suffix(".age.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    os.replace(tmp, target)


def new_identity(env: str, path: Path | None = None) -> tuple[Path, str]:
    """Generate an identity, store it 0600 outside the repo; return (path, public key)."""
    ident = pyrage.x25519.Identity.generate()
    path = path or key_file(env)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# webstack age identity for {env}; public key: {ident.to_public()}\n{ident}\n")
    os.replace(tmp, path)
    return path, str(ident.to_public())


def ensure_identity(env: str) -> tuple[Path, str]:
    """The environment's key file and public key, generating the key if there is none."""
    path = key_file(env)
    if not path.exists():
        return new_identity(env, path)
    lines = [x for x in path.read_text().splitlines() if x.startswith("AGE-SECRET-KEY-")]
    if not lines:
        raise ConfigError(str(path), None, "not an age identity (AGE-SECRET-KEY-...)")
    return path, str(pyrage.x25519.Identity.from_str(lines[0]).to_public())

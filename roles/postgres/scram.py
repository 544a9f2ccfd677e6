"""SCRAM-SHA-256 verifiers, computed on the control machine (RFC 5802 / 7677).

Roles get ``ALTER ROLE ... PASSWORD 'SCRAM-SHA-256$...'`` with a verifier built
here, so the plaintext never reaches the server's logs or process list, and a
password that is already right is recognised (no change reported) by checking
it against the stored verifier's salt and iteration count.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

ITERATIONS = 4096  # PostgreSQL's default scram_iterations


def _keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return stored_key, server_key


def verifier(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """A PostgreSQL SCRAM-SHA-256 verifier for ``password``."""
    salt = salt if salt is not None else os.urandom(16)
    stored, server = _keys(password, salt, iterations)
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"


def matches(password: str, stored: str | None) -> bool:
    """True when ``stored`` (from pg_authid) is a verifier of ``password``."""
    if not stored or not stored.startswith("SCRAM-SHA-256$"):
        return False
    try:
        head, keys = stored[len("SCRAM-SHA-256$"):].split("$")
        iterations, salt = head.split(":")
        return hmac.compare_digest(verifier(password, base64.b64decode(salt), int(iterations)), stored)
    except ValueError:
        return False

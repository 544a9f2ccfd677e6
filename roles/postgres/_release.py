"""Debian release differences for the postgres role (private: not settings)."""

from __future__ import annotations

from dataclasses import dataclass

VERSION = {"bookworm": "15", "trixie": "17"}


@dataclass(frozen=True)
class Paths:
    """Debian's layout for the 'main' cluster of one PostgreSQL major version."""

    etc: str
    data: str
    bin: str
    service: str


def paths(version: str) -> Paths:
    """Debian's layout for the 'main' cluster of a PostgreSQL major version."""
    return Paths(
        etc=f"/etc/postgresql/{version}/main",
        data=f"/var/lib/postgresql/{version}/main",
        bin=f"/usr/lib/postgresql/{version}/bin",
        service=f"postgresql@{version}-main",
    )

# pgBackRest: Debian 13 ships 2.55 with the SFTP repository type (2.46+);
# Debian 12 ships 2.45 without it, so there the same SFTP account is mounted
# with sshfs and used as a posix repository.
PGBACKREST_SFTP = {"bookworm": False, "trixie": True}

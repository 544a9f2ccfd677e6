"""Settings of the backup role (keys ``backup__<field>``)."""

from __future__ import annotations

from dataclasses import dataclass

from webstack.settings import setting


@dataclass(frozen=True)
class BackupSettings:
    """An off-site backup host: chrooted SFTP accounts holding pgBackRest ciphertext only."""

    root: str = setting("/srv/pgbackrest", "directory holding one chroot per database cluster")
    restore_groups: tuple[str, ...] = setting(
        (), "groups or roles of restore-drill hosts that may also reach the repositories (besides the members)"
    )

    def check(self) -> tuple[str, str] | None:
        """Field-level consistency; returns (key, message) on a problem."""
        if not self.root.startswith("/") or self.root.rstrip("/") in ("", "/srv", "/var", "/home"):
            return "root", f"needs a dedicated absolute directory: {self.root!r}"
        return None

"""Settings of the backup role (keys ``backup__<field>``)."""

from __future__ import annotations

from dataclasses import dataclass

from webstack.settings import setting


@dataclass(frozen=True)
class BackupSettings:
    """An off-site backup host: chrooted SFTP accounts holding pgBackRest ciphertext only."""

    root: str = setting("/srv/pgbackrest", "directory holding one chroot per database cluster")
    vault: str = setting("/srv/pgbackrest-vault", "directory of the root-owned hourly copies of every repository, "
                                                  "out of the SFTP accounts' reach (webstack-vault)")
    vault_keep_days: int = setting(35, "days the vault keeps a daily copy (the repository keeps weeklies a month)")
    restore_groups: tuple[str, ...] = setting(
        (), "groups or roles of restore-drill hosts that may also reach the repositories (besides the members)"
    )

    def check(self) -> tuple[str, str] | None:
        """Field-level consistency; returns (key, message) on a problem."""
        if not self.root.startswith("/") or self.root.rstrip("/") in ("", "/srv", "/var", "/home"):
            return "root", f"needs a dedicated absolute directory: {self.root!r}"
        vault, root = self.vault.rstrip("/"), self.root.rstrip("/")
        if not vault.startswith("/") or vault in ("", "/srv", "/var", "/home"):
            return "vault", f"needs a dedicated absolute directory: {self.vault!r}"
        if vault.startswith(root + "/") or root.startswith(vault + "/") or vault == root:
            return "vault", f"{self.vault!r} and root {self.root!r} must not contain each other (the vault " \
                            "would be inside a repository account's chroot)"
        if self.vault_keep_days < 28:
            return "vault_keep_days", f"{self.vault_keep_days} is shorter than the repository's 4-week retention"
        return None

"""Settings of the postgres role (keys ``postgres__<field>``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from webstack.settings import required, setting

NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Database:
    """A database, its owner and extensions."""

    name: str = required("database name")
    owner: str = required("owning login role (listed in postgres__users)")
    extensions: tuple[str, ...] = setting((), "extensions created in it (e.g. pg_trgm)")


@dataclass(frozen=True)
class PostgresSettings:
    """A PostgreSQL cluster member: the primary or a streaming replica."""

    cluster: str = setting("main", "replication cluster this host belongs to (hosts sharing it stream from one primary)")
    primary: str = setting("", "host name of the cluster's primary; every other member is a streaming replica")
    synchronous: bool = setting(False, "commit waits until a replica has applied it (synchronous_commit = remote_apply)")
    users: tuple[str, ...] = setting((), "login roles; each password comes from secret postgres_password_<user>")
    databases: tuple[Database, ...] = setting((), "databases with owner and extensions")
    clients: tuple[str, ...] = setting(("app", "worker"), "groups or roles whose hosts may connect (hostssl, scram-sha-256)")
    max_connections: int = setting(100, "max_connections")
    shared_buffers_mb: int = setting(0, "shared_buffers in MiB; 0 = a quarter of the host's memory (at most 8 GiB)")
    effective_cache_size_mb: int = setting(0, "effective_cache_size in MiB; 0 = three quarters of the host's memory")
    work_mem_mb: int = setting(4, "work_mem in MiB")
    fence_wait_s: int = setting(60, "a server starting as a primary waits this long for unreachable peers to answer "
                                         "(pg-fence) before it starts alone")
    archive_timeout_s: int = setting(10, "a WAL segment is archived at the latest this long after its first write "
                                         "(the recovery point when only the backup repository survives)")
    archive_command: str = setting("", "archive_command when backups are off (with backups it is pgBackRest's archive-push)")
    backup_host: str = setting("", "host (role backup) holding this cluster's pgBackRest repository over SFTP; empty = none")
    backup_s3_bucket: str = setting("", "S3 bucket for the repository instead of a backup host (keys in secrets)")
    backup_s3_endpoint: str = setting("s3.amazonaws.com", "S3 endpoint host")
    backup_s3_region: str = setting("us-east-1", "S3 region")
    backup_s3_uri_style: Literal["host", "path"] = setting("host", "S3 addressing: bucket in the host name or the path")
    backup_retention_full: int = setting(5, "full backups kept (weekly: about 4 weeks back, WAL from the oldest)")
    backup_retention_diff: int = setting(7, "full+differential backups kept (daily points for 7 days)")
    backup_queue_max: str = setting("4GiB", "WAL waiting for the repository beyond this is dropped (a gap, not a full disk)")
    backup_check_max_wal_lag_s: int = setting(300, "backup check fails when the oldest unarchived WAL is older (s)")
    backup_check_max_age_h: int = setting(2, "backup check fails when the newest backup of any type is older (h)")
    backup_check_max_diff_age_h: int = setting(26, "... when the newest differential or full is older (h)")
    backup_check_max_full_age_h: int = setting(192, "... when the newest full is older (h)")
    backup_check_max_slot_wal_mb: int = setting(1024, "... when an inactive replication slot holds more WAL (MiB)")
    max_slot_wal_keep_mb: int = setting(4096, "a replication slot holding more WAL than this is invalidated "
                                              "(max_slot_wal_keep_size); the next site run recreates it")
    wal_keep_mb: int = setting(256, "WAL kept for replicas regardless of slots (wal_keep_size)")

    def check(self) -> tuple[str, str] | None:
        """Field-level consistency; returns (key, message) on a problem."""
        for user in self.users:
            if not NAME.match(user) or user in ("postgres", "replicator"):
                return "users", f"not a usable role name: {user!r}"
        names = [d.name for d in self.databases]
        if len(set(names)) != len(names):
            return "databases", "a database is listed twice"
        for i, db in enumerate(self.databases):
            if not NAME.match(db.name):
                return f"databases[{i}].name", f"not a usable database name: {db.name!r}"
            if db.owner not in self.users:
                return f"databases[{i}].owner", f"{db.owner!r} is not in postgres__users"
        if self.backup_host and self.backup_s3_bucket:
            return "backup_s3_bucket", "choose one repository: backup_host (SFTP) or backup_s3_bucket"
        if self.backup_retention_full < 1 or self.backup_retention_diff < 1:
            return "backup_retention_full", "retention counts must be at least 1"
        if not re.match(r"^[0-9]+(KiB|MiB|GiB|TiB)$", self.backup_queue_max):
            return "backup_queue_max", f"not a size like 4GiB: {self.backup_queue_max!r}"
        if self.fence_wait_s < 0:
            return "fence_wait_s", "must be 0 or more seconds"
        if not 1 <= self.archive_timeout_s <= 3600:
            return "archive_timeout_s", "must be between 1 and 3600 seconds"
        if self.shared_buffers_mb < 0 or self.effective_cache_size_mb < 0:
            return "shared_buffers_mb", "must be 0 (automatic) or positive"
        return None

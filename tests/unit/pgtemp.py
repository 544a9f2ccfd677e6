"""A throwaway PostgreSQL server (unix socket only) for tests and local benchmarks.

``with TempPostgres() as pg: pg.dsn("postgres")``. Uses the PostgreSQL 15 binaries of the
control machine (PG_BINDIR to change); as root the server runs as the ``postgres`` user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

BINDIR = Path(os.environ.get("PG_BINDIR", "/usr/lib/postgresql/15/bin"))


def available() -> bool:
    return (BINDIR / "pg_ctl").exists() and (os.geteuid() != 0 or _has_user("postgres"))


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class TempPostgres:
    """initdb in a temp dir, start, and on exit stop (immediate) and remove it."""

    def __init__(self, fsync: bool = False, port: int = 5432, settings: dict[str, str] | None = None) -> None:
        self.fsync = fsync
        self.port = port
        self.settings = settings or {}
        self.dir = Path(tempfile.mkdtemp(prefix="webstack-pg-"))

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(prefix + list(args), check=True, capture_output=True, text=True)

    def __enter__(self) -> TempPostgres:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        data = self.dir / "data"
        self._run(str(BINDIR / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        opts = {"listen_addresses": "''", "unix_socket_directories": f"'{self.dir}'", "port": str(self.port),
                "fsync": "on" if self.fsync else "off", "max_connections": "60", **self.settings}
        self._run(str(BINDIR / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"), "-w", "-t", "30",
                  "-o", " ".join(f"-c {k}={v}" for k, v in opts.items()), "start")
        return self

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.dir} port={self.port} dbname={dbname} user=postgres"

    def __exit__(self, *exc: object) -> None:
        try:
            self._run(str(BINDIR / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

"""Schema migrations of the demo application: ``python3 -m migrate`` (``app__migrate_command``).

The files ``migrations/NNN_name.sql`` are applied in name order, each once, each in its own
transaction together with its row in ``schema_migrations``; an advisory lock makes concurrent
runs wait for each other. Prints what it applied. Exit status non-zero on the first failure,
naming the file (later files are not tried). DATABASE_URL comes from the application's
environment (webstack runs this on one host, in the new release, before any server switches).

Write migrations for expand/contract: while a release rolls out, the previous one runs against
the new schema, so a release adds (nullable columns, new tables) and a later one removes what
no running release uses any more.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psycopg2

LOCK = 7_201_001  # advisory lock key of the migrations
HERE = Path(__file__).resolve().parent / "migrations"


def pending(cur) -> list[Path]:
    cur.execute("create table if not exists schema_migrations "
                "(version text primary key, applied_at timestamptz not null default now())")
    cur.execute("select version from schema_migrations")
    done = {row[0] for row in cur.fetchall()}
    return [p for p in sorted(HERE.glob("*.sql")) if p.stem not in done]


def main() -> int:
    conn = psycopg2.connect(os.environ["DATABASE_URL"], connect_timeout=5)
    applied, path = 0, None
    try:
        while True:
            with conn, conn.cursor() as cur:  # one transaction per file: commit, or roll back on error
                cur.execute("select pg_advisory_xact_lock(%s)", (LOCK,))
                todo = pending(cur)
                if not todo:
                    break
                path = todo[0]
                cur.execute(path.read_text())
                cur.execute("insert into schema_migrations (version) values (%s)", (path.stem,))
            print(f"applied {path.name}", flush=True)
            applied += 1
    except psycopg2.Error as exc:
        print(f"migration {path.name if path else '(setup)'} failed: {exc}".strip(), file=sys.stderr)
        return 1
    finally:
        conn.close()
    print(f"schema up to date ({applied} applied)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

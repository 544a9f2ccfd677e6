"""Job queue measurements (examples/demoapp/jobs.py); a script, not a test.

No-op throughput: start K worker processes, enqueue N no-op jobs in one statement, time
until all are done:
    python bench/jobqueue.py noop --local --jobs 20000 --workers 2
    DATABASE_URL='host=... dbname=app user=app password=...' python bench/jobqueue.py noop --workers 4
(--local starts a throwaway PostgreSQL 15 with fsync on, like a server's.)

Sign-up to inbox latency: POST /signup to the app, watch a Maildir for the welcome mail
(matched by its To: address), print p50/p99:
    python bench/jobqueue.py signup --app-url https://www.webstack.test/app --cacert inventories/lab/ca.crt \\
        --maildir /path/to/Maildir --count 50
``signup_latency(url, arrived)`` takes any mailbox reader: ``arrived(address)`` returns the
arrival time (time.time()) of that address's mail, or None while it has not come.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from email import message_from_binary_file
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMOAPP = ROOT / "examples" / "demoapp"


def noop_throughput(dsn: str, jobs_n: int, workers: int, batch: int) -> dict[str, float]:
    import psycopg2

    sys.path.insert(0, str(DEMOAPP))
    import jobs

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    with conn.cursor() as c:
        c.execute("begin")
        jobs.ensure_schema(c)
        c.execute("commit")
    cur.execute("delete from jobs where kind = 'noop'")
    env = {**os.environ, "DATABASE_URL": dsn, "JOB_BATCH": str(batch)}
    procs = [subprocess.Popen([sys.executable, str(DEMOAPP / "jobs.py"), "work"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # wait until every worker LISTENs
            cur.execute("select count(*) from pg_stat_activity where application_name = 'webstack-jobs'")
            if cur.fetchone()[0] >= workers:
                break
            time.sleep(0.05)
        cur.execute("begin")
        jobs.enqueue_noop(cur, jobs_n)
        start = time.monotonic()
        cur.execute("commit")
        deadline = start + 600
        while time.monotonic() < deadline:
            cur.execute("select count(*) from jobs where kind = 'noop' and state = 'ready'")
            if cur.fetchone()[0] == 0:
                break
            time.sleep(0.02)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
    cur.execute("select count(*) from jobs where kind = 'noop' and state = 'done'")
    done = cur.fetchone()[0]
    conn.close()
    return {"jobs": done, "workers": workers, "batch": batch, "seconds": round(elapsed, 3),
            "jobs_per_second": round(done / elapsed, 1)}


def maildir_reader(maildir: Path) -> Callable[[str], float | None]:
    """arrived(address) for a Maildir: the mtime of the first message addressed To it."""
    seen: dict[str, float] = {}
    read: set[Path] = set()

    def arrived(address: str) -> float | None:
        for sub in ("new", "cur"):
            for path in (maildir / sub).glob("*"):
                if path in read:
                    continue
                read.add(path)
                with path.open("rb") as fh:
                    to = str(message_from_binary_file(fh).get("To", ""))
                seen.setdefault(to.strip(), path.stat().st_mtime)
        return seen.get(address)

    return arrived


def signup_latency(app_url: str, arrived: Callable[[str], float | None], count: int,
                   context: ssl.SSLContext | None = None, timeout: float = 60) -> dict[str, float]:
    import http.cookiejar
    import re

    url = urllib.parse.urljoin(app_url, "/signup")
    # As a browser: the form first (its session and CSRF cookies, the token in its hidden field).
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
                                          urllib.request.HTTPSHandler(context=context))
    with browser.open(app_url, timeout=10) as resp:
        token = re.search(rb"name=csrf value=([0-9a-f]{32})", resp.read()).group(1).decode()
    sent: dict[str, float] = {}
    for _ in range(count):
        address = f"bench-{uuid.uuid4().hex[:12]}@example.test"
        body = urllib.parse.urlencode({"email": address, "csrf": token}).encode()
        sent[address] = time.time()
        with browser.open(urllib.request.Request(url, data=body), timeout=10) as resp:
            assert resp.status == 201, resp.status
    latencies: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(latencies) < count and time.monotonic() < deadline:
        for address, t0 in sent.items():
            if address not in latencies and (t1 := arrived(address)) is not None:
                latencies[address] = t1 - t0
        time.sleep(0.02)
    values = sorted(latencies.values())
    if not values:
        return {"sent": count, "arrived": 0}
    return {"sent": count, "arrived": len(values), "p50_s": round(statistics.median(values), 3),
            "p99_s": round(values[min(len(values) - 1, int(len(values) * 0.99))], 3), "max_s": round(values[-1], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("noop", help="no-op jobs per second")
    p.add_argument("--local", action="store_true", help="start a throwaway PostgreSQL 15 here")
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=100)
    p = sub.add_parser("signup", help="sign-up to inbox latency")
    p.add_argument("--app-url", required=True)
    p.add_argument("--maildir", required=True, type=Path)
    p.add_argument("--cacert")
    p.add_argument("--count", type=int, default=50)
    args = parser.parse_args()
    if args.mode == "noop":
        if args.local:
            sys.path.insert(0, str(ROOT))
            from tests.unit.pgtemp import TempPostgres

            with TempPostgres(fsync=True) as pg:
                result = noop_throughput(pg.dsn(), args.jobs, args.workers, args.batch)
        else:
            result = noop_throughput(os.environ["DATABASE_URL"], args.jobs, args.workers, args.batch)
    else:
        context = ssl.create_default_context(cafile=args.cacert) if args.cacert else None
        result = signup_latency(args.app_url, maildir_reader(args.maildir), args.count, context)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

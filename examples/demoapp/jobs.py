"""PostgreSQL job queue of the demo app, and the worker program that runs it.

The app enqueues in its own transaction (``enqueue(cur, ...)``): a sign-up and its
welcome_email job commit or roll back together, and the ``NOTIFY webstack_jobs`` sent in
that transaction reaches idle workers only at commit, so they start within milliseconds.
Workers also poll (JOB_POLL_INTERVAL, and sooner when a retry falls due).

Claim and lock release. A worker claims jobs with ``SELECT ... FOR UPDATE SKIP LOCKED``
and runs them *inside the claiming transaction*; the row lock is the claim, and marking
the job done (or failed) is the commit of that transaction. Nothing ever has to "expire"
a lease: when the worker is gone its transaction is rolled back by the server and the job
is ready again, untouched (attempts not counted).
- process killed (SIGKILL, OOM): the kernel closes the socket, the server rolls back at once;
- host powered off, network cut, process hung: the session is ``idle in transaction``
  while the job runs, so ``idle_in_transaction_session_timeout`` (JOB_LOCK_TIMEOUT, 60 s)
  makes the server end it; TCP keepalives on both sides notice a dead peer sooner;
- database failover: the claim lived only on the old primary, the new one has the row
  ready; the worker reconnects with backoff and LISTENs again.
Every job must therefore finish well within JOB_LOCK_TIMEOUT: the SMTP dialogue has one
deadline (SMTP_TIMEOUT, 20 s) for all of it, and the worker refuses to start when
SMTP_TIMEOUT is not below JOB_LOCK_TIMEOUT. Chosen over a lease with heartbeats because
it needs no second writer, no clock agreement and no reaper, and a rollback restores the
job exactly. Its limit: a job that kills its worker every time is never counted and so
never dead-lettered (it shows as an old ``oldest_ready_age`` in ``stats``).

Duplicate window. A welcome mail is sent, then its ``done`` update and commit follow at
once (one round trip; jobs with outside effects are never batched behind other jobs). A
crash, kill or failover between the provider's "250 accepted" and that commit sends the
mail again on the retry, with the same ``Message-ID: <job-ID.welcome@MAIL_DOMAIN>``, so a
duplicate is recognisable (and many providers drop it). A worker that was stalled past
JOB_LOCK_TIMEOUT and then sends is the other way to a duplicate.

Retries. A failed job gets ``attempts + 1``, its error, and ``run_at = now + delay`` with
delay = min(JOB_RETRY_MAX, JOB_RETRY_BASE * 2**(attempts-1)) * uniform(0.5, 1) (so each
delay is at least the previous one); at JOB_MAX_ATTEMPTS it becomes ``dead`` and stays
(``dead``, ``requeue``). A PermanentFailure (SMTP 5xx on the recipient or the message)
is dead at once.

Throughput. No-op jobs are claimed in batches (JOB_BATCH, 100) and marked done in one
statement; a claim also takes a transaction-level advisory lock per job, which is how
``stats`` counts running jobs without writing anything.

Usage (from the release directory; DATABASE_URL in the environment):
    python3 jobs.py work                   run jobs until SIGTERM/SIGINT (finishes the current job, exit 0)
    python3 jobs.py stats                  JSON: ready, waiting, running, dead, done, oldest_ready_age
    python3 jobs.py dead [--limit N]       dead-lettered jobs, one JSON object a line
    python3 jobs.py requeue ID... | --all  dead jobs back to ready, attempts reset
    python3 jobs.py cleanup --older-than 7d   delete done jobs finished before that (s, m, h, d)
    python3 jobs.py enqueue-noop N         N no-op jobs (benchmarks)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras

CHANNEL = "webstack_jobs"
LOCK_CLASS = 0x4A0B  # advisory lock key space of running jobs (first int4 key); 0x4A0A: schema creation
SCHEMA_LOCK = 0x4A0A
log = logging.getLogger("jobs")

SCHEMA = """
create table if not exists jobs (
    id bigserial primary key,
    kind text not null,
    args jsonb not null default '{}',
    state text not null default 'ready' check (state in ('ready', 'done', 'dead')),
    attempts integer not null default 0,
    run_at timestamptz not null default now(),
    created_at timestamptz not null default now(),
    finished_at timestamptz,
    last_error text
);
create index if not exists jobs_due on jobs (run_at, id) where state = 'ready';
create index if not exists jobs_finished on jobs (finished_at) where state <> 'ready';
"""


def ensure_schema(cur: Any) -> None:
    """Create the queue table and indexes if missing (safe when app and workers start together)."""
    cur.execute("select pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
    cur.execute(SCHEMA)


def enqueue(cur: Any, kind: str, args: dict[str, Any] | None = None, delay: float = 0) -> int:
    """Insert a job in the caller's transaction and wake the workers at its commit; returns the job id."""
    cur.execute("insert into jobs (kind, args, run_at) values (%s, %s, now() + %s * interval '1 second') returning id",
                (kind, json.dumps(args or {}), delay))
    job_id = cur.fetchone()[0]
    cur.execute("select pg_notify(%s, '')", (CHANNEL,))
    return int(job_id)


# --- configuration ----------------------------------------------------------------------------------------------


def _seconds(text: str) -> float:
    """'90', '90s', '15m', '2h', '7d' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 30, 30s, 15m, 2h, 7d)")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


@dataclass(frozen=True)
class Settings:
    """Worker settings, from the environment."""

    dsn: str
    """DATABASE_URL: libpq connection string (never logged)"""
    lock_timeout: float = 60
    """JOB_LOCK_TIMEOUT: seconds after which the server ends a silent worker's session and frees its jobs"""
    max_attempts: int = 5
    """JOB_MAX_ATTEMPTS: runs before a job is dead-lettered"""
    retry_base: float = 10
    """JOB_RETRY_BASE: seconds of the first retry delay (doubling, jittered)"""
    retry_max: float = 3600
    """JOB_RETRY_MAX: longest retry delay, seconds"""
    poll_interval: float = 5
    """JOB_POLL_INTERVAL: seconds between polls when no notification arrives"""
    batch: int = 100
    """JOB_BATCH: jobs claimed at once (only jobs without outside effects share a transaction)"""
    smtp_timeout: float = 20
    """SMTP_TIMEOUT: seconds for one mail's whole SMTP dialogue; must be below JOB_LOCK_TIMEOUT"""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        s = cls(dsn=env["DATABASE_URL"],
                lock_timeout=_seconds(env.get("JOB_LOCK_TIMEOUT", "60")),
                max_attempts=int(env.get("JOB_MAX_ATTEMPTS", "5")),
                retry_base=_seconds(env.get("JOB_RETRY_BASE", "10")),
                retry_max=_seconds(env.get("JOB_RETRY_MAX", "3600")),
                poll_interval=_seconds(env.get("JOB_POLL_INTERVAL", "5")),
                batch=int(env.get("JOB_BATCH", "100")),
                smtp_timeout=_seconds(env.get("SMTP_TIMEOUT", "20")))
        if s.smtp_timeout >= s.lock_timeout * 0.8:
            raise ValueError(f"SMTP_TIMEOUT ({s.smtp_timeout:g}s) must stay well below JOB_LOCK_TIMEOUT "
                             f"({s.lock_timeout:g}s), or a slow provider turns into duplicate mails")
        if s.max_attempts < 1 or s.batch < 1:
            raise ValueError("JOB_MAX_ATTEMPTS and JOB_BATCH must be at least 1")
        return s


def connect(dsn: str, lock_timeout: float | None = None) -> Any:
    """A connection with keepalives (a dead peer is noticed in ~25 s) and, for workers, the lock timeout."""
    conn = psycopg2.connect(dsn, connect_timeout=5, keepalives=1, keepalives_idle=10, keepalives_interval=5,
                            keepalives_count=3, application_name="webstack-jobs" if lock_timeout else "webstack-jobs-admin")
    with conn.cursor() as cur:
        cur.execute("set tcp_keepalives_idle = 10; set tcp_keepalives_interval = 5; set tcp_keepalives_count = 3")
        if lock_timeout is not None:  # a worker: no statement may hang, no silent session may keep its claims
            cur.execute("select set_config('idle_in_transaction_session_timeout', %s, false), "
                        "set_config('statement_timeout', '30s', false)", (f"{int(lock_timeout * 1000)}ms",))
    conn.commit()
    return conn


class _Redact(logging.Formatter):
    """Masks the database and SMTP passwords wherever they would appear in a log line or traceback."""

    def __init__(self, fmt: str, secrets: list[str]) -> None:
        super().__init__(fmt)
        self.secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def setup_logging(env: dict[str, str] | None = None) -> None:
    env = dict(os.environ if env is None else env)
    secrets = [env.get("SMTP_PASSWORD", "")]
    try:
        secrets.append(psycopg2.extensions.parse_dsn(env.get("DATABASE_URL", "")).get("password", ""))
    except psycopg2.Error:
        pass
    if env.get("SMTP_PASSWORD_FILE"):
        try:
            with open(env["SMTP_PASSWORD_FILE"]) as fh:
                secrets.append(fh.read().strip())
        except OSError:
            pass
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Redact("%(levelname)s %(message)s", secrets))  # journald adds time and unit
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


# --- jobs -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    args: dict[str, Any]
    attempts: int


class Permanent(Exception):
    """A failure that no retry can fix: the job is dead-lettered at once."""


def _noop(job: Job, cur: Any) -> None:
    pass


def _welcome_email(job: Job, cur: Any) -> None:
    import mailer

    try:
        mailer.send_welcome(job.id, job.args["email"])
    except (mailer.PermanentFailure, KeyError, ValueError) as exc:  # ValueError: an address email refuses
        raise Permanent(str(exc)) from exc


HANDLERS: dict[str, Callable[[Job, Any], None]] = {"noop": _noop, "welcome_email": _welcome_email}
"""kind -> handler(job, cursor of the claiming transaction)"""
BATCHABLE = {"noop"}
"""kinds without outside effects: several may share a transaction; any other kind commits right after it runs"""
NO_SQL = {"noop"}
"""kinds whose handler does not use the cursor: no savepoint around them (two round trips saved per job)"""


def retry_delay(attempts: int, base: float, cap: float) -> float:
    """Delay before run ``attempts + 1``: doubling from ``base``, capped, 'equal jitter' (never shorter than the last)."""
    return min(cap, base * 2 ** (attempts - 1)) * random.uniform(0.5, 1.0)


CLAIM = f"""
with claimed as materialized (
    select id, kind, args, attempts from jobs
    where state = 'ready' and run_at <= now()
    order by run_at, id
    limit %s
    for update skip locked
)
select id, kind, args, attempts, pg_try_advisory_xact_lock({LOCK_CLASS}, (id %% 2147483647)::int) from claimed
order by id
"""


class Worker:
    """One worker process: claim, run, record; LISTEN between; reconnect after failures."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.stopping = False
        self.conn: Any = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # signals: a flag plus a byte on a socket, so a wait on the database socket ends at once
    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self.stopping:
            log.info("%s: finishing the current job, then exiting", signal.Signals(signum).name)
        self.stop()

    def stop(self) -> None:
        self.stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _sleep(self, seconds: float, also: Any = None) -> None:
        """Wait up to ``seconds`` for a stop request or (``also``) a readable database socket."""
        waiting = [self._wake_r] + ([also] if also is not None else [])
        select.select(waiting, [], [], max(0.0, seconds))

    def _connect(self) -> None:
        self.conn = connect(self.s.dsn, self.s.lock_timeout)
        with self.conn.cursor() as cur:
            ensure_schema(cur)
            cur.execute(f"listen {CHANNEL}")
        self.conn.commit()

    def run(self) -> int:
        failures = 0
        while not self.stopping:
            try:
                if self.conn is None or self.conn.closed:
                    self._connect()
                    if failures:
                        log.info("database reachable again, listening on %s", CHANNEL)
                    failures = 0
                if not self.step():
                    self._idle()
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                failures += 1
                self._drop()
                delay = min(30.0, 0.5 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0)
                log.warning("database connection lost (%s: %s); reconnecting in %.1fs",
                            exc.__class__.__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "", delay)
                self._sleep(delay)
            except Exception:
                failures += 1
                self._drop()
                log.exception("unexpected error; pausing before the next try")
                self._sleep(min(30.0, 2.0 * failures))
        self._drop()
        log.info("stopped")
        return 0

    def _drop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg2.Error:
                pass
        self.conn = None

    def step(self) -> bool:
        """Claim and run one batch; False when nothing was due."""
        conn = self.conn
        if self.stopping:
            return False
        with conn.cursor() as cur:
            cur.execute(CLAIM, (self.s.batch,))
            rows = [Job(r[0], r[1], r[2], r[3]) for r in cur.fetchall()]
            if not rows:
                conn.commit()
                return False
            done: list[int] = []
            ran = 0
            for job in rows:
                ran += 1
                self._run_one(cur, job, done)
                if self.stopping or job.kind not in BATCHABLE:
                    break  # commit now: the mail's done mark follows the send at once; the rest is released
            if done:
                cur.execute("update jobs set state = 'done', attempts = attempts + 1, finished_at = now(), "
                            "last_error = null where id = any(%s)", (done,))
            conn.commit()
            if len(done) > 1:
                log.info("done %d jobs (%s)", len(done), ",".join(sorted({j.kind for j in rows[:ran]})))
            elif len(done) == 1:
                log.info("job %d %s done", done[0], next(j.kind for j in rows if j.id == done[0]))
        return True

    def _run_one(self, cur: Any, job: Job, done: list[int]) -> None:
        handler = HANDLERS.get(job.kind)
        savepoint = job.kind not in NO_SQL
        started = time.monotonic()
        if handler is None:
            self._fail(cur, job, f"permanent: unknown job kind {job.kind!r}", dead=True)
            return
        try:
            if savepoint:
                cur.execute("savepoint job")
            handler(job, cur)
            if savepoint:
                cur.execute("release savepoint job")
        except Permanent as exc:
            if savepoint:
                cur.execute("rollback to savepoint job")
            self._fail(cur, job, f"permanent: {exc}", dead=True)
            return
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            raise  # the connection is gone: nothing can be recorded; the server frees the job
        except Exception as exc:
            if savepoint:
                cur.execute("rollback to savepoint job")
            self._fail(cur, job, f"{exc.__class__.__name__}: {exc}", dead=job.attempts + 1 >= self.s.max_attempts)
            return
        done.append(job.id)
        if job.kind not in BATCHABLE:
            log.debug("job %d ran in %.3fs", job.id, time.monotonic() - started)

    def _fail(self, cur: Any, job: Job, error: str, dead: bool) -> None:
        attempts = job.attempts + 1
        if dead:
            cur.execute("update jobs set state = 'dead', attempts = %s, last_error = %s, finished_at = now() "
                        "where id = %s", (attempts, error[:2000], job.id))
            log.error("job %d %s dead after %d attempt(s): %s", job.id, job.kind, attempts, error)
            return
        delay = retry_delay(attempts, self.s.retry_base, self.s.retry_max)
        cur.execute("update jobs set attempts = %s, last_error = %s, run_at = clock_timestamp() + %s * interval '1 second' "
                    "where id = %s", (attempts, error[:2000], delay, job.id))
        log.warning("job %d %s failed (attempt %d of %d), retry in %.1fs: %s",
                    job.id, job.kind, attempts, self.s.max_attempts, delay, error)

    def _idle(self) -> None:
        """Wait for a notification, a due retry, the poll interval, or a stop request."""
        conn = self.conn
        with conn.cursor() as cur:
            cur.execute("select extract(epoch from min(run_at) - now()) from jobs where state = 'ready'")
            nxt = cur.fetchone()[0]
        conn.commit()
        if conn.notifies or self.stopping:  # a notification came in with those answers: claim again
            conn.notifies.clear()
            return
        timeout = self.s.poll_interval if nxt is None else min(self.s.poll_interval, max(0.0, float(nxt)) + 0.01)
        self._sleep(timeout, also=conn)
        conn.poll()
        conn.notifies.clear()
        try:
            while self._wake_r.recv(64):
                pass
        except OSError:
            pass


# --- admin commands ---------------------------------------------------------------------------------------------


@contextmanager
def _cursor(dsn: str) -> Iterator[Any]:
    conn = connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            ensure_schema(cur)
            yield cur
    finally:
        conn.close()


def stats(cur: Any) -> dict[str, Any]:
    """Queue depth for monitoring (deploys/check.py)."""
    cur.execute(f"""
        with running as (
            select objid::bigint as key from pg_locks
            where locktype = 'advisory' and classid = {LOCK_CLASS} and objsubid = 2 and granted
              and database = (select oid from pg_database where datname = current_database())
        )
        select
            (select count(*) from running),
            (select count(*) from jobs where state = 'ready' and run_at <= now()
                and (id % 2147483647) not in (select key from running)),
            (select extract(epoch from now() - min(run_at)) from jobs where state = 'ready' and run_at <= now()
                and (id % 2147483647) not in (select key from running)),
            (select count(*) from jobs where state = 'ready' and run_at > now()),
            (select count(*) from jobs where state = 'dead'),
            (select count(*) from jobs where state = 'done')
    """)
    running, ready, age, waiting, dead, done = cur.fetchone()
    return {"ready": ready, "waiting": waiting, "running": running, "dead": dead, "done": done,
            "oldest_ready_age": round(float(age or 0), 3)}


def dead_jobs(cur: Any, limit: int = 100) -> list[dict[str, Any]]:
    cur.execute("select id, kind, attempts, last_error, finished_at, args from jobs where state = 'dead' "
                "order by finished_at desc, id desc limit %s", (limit,))
    return [{"id": r[0], "kind": r[1], "attempts": r[2], "last_error": r[3],
             "when": r[4].isoformat() if r[4] else None, "args": r[5]} for r in cur.fetchall()]


def requeue(cur: Any, ids: list[int] | None) -> int:
    """Dead jobs (all when ``ids`` is None) back to ready now, attempts reset; returns how many."""
    sql = ("update jobs set state = 'ready', attempts = 0, run_at = now(), finished_at = null "
           "where state = 'dead'")
    if ids is None:
        cur.execute(sql)
    else:
        cur.execute(sql + " and id = any(%s)", (ids,))
    count = int(cur.rowcount)
    cur.execute("select pg_notify(%s, '')", (CHANNEL,))
    return count


def cleanup(cur: Any, older_than: float) -> int:
    """Delete done jobs finished more than ``older_than`` seconds ago (dead ones are kept for ``requeue``)."""
    cur.execute("delete from jobs where state = 'done' and finished_at < now() - %s * interval '1 second'",
                (older_than,))
    return int(cur.rowcount)


def enqueue_noop(cur: Any, count: int) -> None:
    cur.execute("insert into jobs (kind) select 'noop' from generate_series(1, %s)", (count,))
    cur.execute("select pg_notify(%s, '')", (CHANNEL,))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs.py", description="webstack demo job queue (DATABASE_URL from the environment)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("work", help="run jobs until SIGTERM")
    sub.add_parser("stats", help="queue depth as JSON")
    p = sub.add_parser("dead", help="dead-lettered jobs, one JSON object a line")
    p.add_argument("--limit", type=int, default=100)
    p = sub.add_parser("requeue", help="dead jobs back to ready")
    p.add_argument("ids", nargs="*", type=int)
    p.add_argument("--all", action="store_true")
    p = sub.add_parser("cleanup", help="delete old done jobs")
    p.add_argument("--older-than", default="7d", help="age: seconds or 30m, 12h, 7d (default 7d)")
    p = sub.add_parser("enqueue-noop", help="enqueue N no-op jobs")
    p.add_argument("count", type=int)
    args = parser.parse_args(argv)
    setup_logging()
    if "DATABASE_URL" not in os.environ:
        parser.error("DATABASE_URL is not set")
    dsn = os.environ["DATABASE_URL"]
    if args.cmd == "work":
        try:
            settings = Settings.from_env()
        except ValueError as exc:
            log.error("configuration: %s", exc)
            return 2
        worker = Worker(settings)
        worker.install_signals()
        log.info("worker started (batch %d, lock timeout %gs, max attempts %d)",
                 settings.batch, settings.lock_timeout, settings.max_attempts)
        return worker.run()
    with _cursor(dsn) as cur:
        if args.cmd == "stats":
            print(json.dumps(stats(cur)))
        elif args.cmd == "dead":
            for row in dead_jobs(cur, args.limit):
                print(json.dumps(row, default=str))
        elif args.cmd == "requeue":
            if args.all == bool(args.ids):
                parser.error("requeue: give job ids or --all")
            print(f"requeued {requeue(cur, None if args.all else args.ids)}")
        elif args.cmd == "cleanup":
            print(f"deleted {cleanup(cur, _seconds(args.older_than))}")
        elif args.cmd == "enqueue-noop":
            enqueue_noop(cur, args.count)
            print(f"enqueued {args.count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The demo app's job queue (examples/demoapp/jobs.py) against a real throwaway PostgreSQL 15.

Mail goes to a small SMTP submission server in this file (STARTTLS with a throwaway CA,
AUTH PLAIN), which counts what it was given and can answer 4xx/5xx or hold a dialogue.
Workers run in threads or, where signals matter, as separate processes.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import os
import re
import shutil
import signal
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

psycopg2 = pytest.importorskip("psycopg2")

from tests.unit import pgtemp  # noqa: E402
from webstack.tls import issue, make_ca  # noqa: E402

DEMOAPP = Path(__file__).resolve().parents[2] / "examples" / "demoapp"
sys.path.insert(0, str(DEMOAPP))
jobs = importlib.import_module("jobs")

pytestmark = pytest.mark.skipif(not pgtemp.available(), reason="PostgreSQL 15 binaries not installed")


# --- a minimal SMTP submission server ---------------------------------------------------------------------------


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.rcpt_attempts: list[float] = []
        self.rcpt_reply = "250 2.1.5 ok"
        self.hold_at: str | None = None  # "rcpt" or "data": the next dialogue waits there until `release` is set
        self.held = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def message_ids(self) -> list[str]:
        return [m["message"]["Message-ID"] for m in self.messages]


class SmtpHandler(socketserver.BaseRequestHandler):
    server: SmtpServer

    def handle(self) -> None:
        box, sock = self.server.box, self.request
        sock.settimeout(20)
        rfile = sock.makefile("rb")
        tls, user, sender, rcpts = False, None, None, []
        hold = None
        with box.lock:
            hold, box.hold_at = box.hold_at, None

        def send(line: str) -> None:
            sock.sendall(line.encode() + b"\r\n")

        try:
            send("220 test ESMTP")
            while line := rfile.readline():
                text = line.decode().rstrip("\r\n")
                cmd = text.split(" ", 1)[0].upper()
                if cmd in ("EHLO", "HELO"):
                    exts = ["250-test"] + (["250-AUTH PLAIN"] if tls else ["250-STARTTLS"]) + ["250 8BITMIME"]
                    for ext in exts:
                        send(ext)
                elif cmd == "STARTTLS" and not tls:
                    send("220 2.0.0 ready")
                    sock = self.server.tls.wrap_socket(sock, server_side=True)
                    rfile, tls = sock.makefile("rb"), True
                elif cmd == "AUTH":
                    parts = text.split()
                    creds = base64.b64decode(parts[2]).split(b"\0") if len(parts) == 3 and parts[1].upper() == "PLAIN" else []
                    if tls and creds[1:] == [b"mailer", b"s3cret-pw"]:
                        user = "mailer"
                        send("235 2.7.0 ok")
                    else:
                        send("535 5.7.8 bad credentials")
                elif cmd == "MAIL":
                    if not user:
                        send("530 5.7.0 authentication required")
                        continue
                    sender, rcpts = text[10:].strip("<>"), []
                    send("250 2.1.0 ok")
                elif cmd == "RCPT":
                    box.rcpt_attempts.append(time.monotonic())
                    if hold == "rcpt":
                        box.held.set()
                        box.release.wait(15)
                    reply = box.rcpt_reply
                    if reply.startswith("250"):
                        rcpts.append(text[8:].strip("<>"))
                    send(reply)
                elif cmd == "DATA":
                    send("354 go ahead")
                    data = b""
                    while (chunk := rfile.readline()) not in (b".\r\n", b""):
                        data += chunk[1:] if chunk.startswith(b"..") else chunk
                    if hold == "data":
                        box.held.set()
                        box.release.wait(15)
                    box.messages.append({"from": sender, "rcpts": rcpts, "user": user, "tls": tls,
                                         "message": message_from_bytes(data)})
                    send("250 2.0.0 queued")
                elif cmd in ("RSET", "NOOP"):
                    send("250 2.0.0 ok")
                elif cmd == "QUIT":
                    send("221 2.0.0 bye")
                    return
                else:
                    send("502 5.5.2 unknown")
        except (OSError, ssl.SSLError):
            pass


class SmtpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, tls: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), SmtpHandler)
        self.tls = tls
        self.box = Mailbox()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("smtp-tls")
    ca_key, ca_cert = make_ca("queue test CA")
    key, chain = issue(ca_key, ca_cert, ["localhost"], ["127.0.0.1"])
    (d / "ca.crt").write_text(ca_cert)
    (d / "server.key").write_text(key)
    (d / "server.crt").write_text(chain)
    return d


@pytest.fixture
def smtp(tls_files, monkeypatch, tmp_path):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls_files / "server.crt", tls_files / "server.key")
    server = SmtpServer(ctx)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "smtp-password").write_text("s3cret-pw\n")
    for k, v in {"SMTP_HOST": "localhost", "SMTP_PORT": str(server.server_address[1]),
                 "SMTP_CA_FILE": str(tls_files / "ca.crt"), "SMTP_USER": "mailer",
                 "SMTP_PASSWORD_FILE": str(tmp_path / "smtp-password"), "MAIL_FROM": "hello@example.test",
                 "SMTP_TIMEOUT": "5"}.items():
        monkeypatch.setenv(k, v)
    yield server.box
    server.box.release.set()
    server.shutdown()
    server.server_close()


# --- database -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg():
    with pgtemp.TempPostgres() as server:
        yield server


@pytest.fixture
def dsn(pg, request, monkeypatch):
    name = "t_" + request.node.name.lower().replace("[", "_").replace("]", "")[:50]
    admin = psycopg2.connect(pg.dsn())
    admin.autocommit = True
    admin.cursor().execute(f"drop database if exists {name}")
    admin.cursor().execute(f"create database {name}")
    admin.close()
    monkeypatch.setenv("DATABASE_URL", pg.dsn(name))
    with psycopg2.connect(pg.dsn(name)) as conn, conn.cursor() as cur:
        jobs.ensure_schema(cur)
    return pg.dsn(name)


def query(dsn: str, sql: str, args: Any = None) -> list[tuple]:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def enqueue(dsn: str, kind: str, args: dict | None = None, count: int = 1) -> list[int]:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            return [jobs.enqueue(cur, kind, args) for _ in range(count)]
    finally:
        conn.close()


def wait_for(cond, timeout: float = 15, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def settings(dsn: str, **kw: Any):
    return jobs.Settings(dsn=dsn, **{"poll_interval": 0.5, "retry_base": 0.3, "lock_timeout": 10, **kw})


class ThreadWorker:
    def __init__(self, dsn: str, **kw: Any) -> None:
        self.worker = jobs.Worker(settings(dsn, **kw))
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self) -> ThreadWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


def drain(dsn: str, **kw: Any) -> None:
    worker = jobs.Worker(settings(dsn, **kw))
    worker._connect()
    while worker.step():
        pass
    worker._drop()


def spawn_worker(dsn: str, tmp_path: Path, name: str, extra: str = "", **env: str) -> subprocess.Popen:
    code = (f"import sys; sys.path.insert(0, {str(DEMOAPP)!r}); import jobs\n{extra}\n"
            "sys.exit(jobs.main(['work']))")
    full_env = {**os.environ, "DATABASE_URL": dsn, "JOB_POLL_INTERVAL": "0.5", "JOB_RETRY_BASE": "0.3", **env}
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-c", code], env=full_env, stdout=log, stderr=subprocess.STDOUT)


def state(dsn: str, job_id: int) -> tuple:
    return query(dsn, "select state, attempts, last_error from jobs where id = %s", (job_id,))[0]


def load_app(monkeypatch):
    """The demo app on a database its migrations brought up to date (as app__migrate_command does)."""
    assert importlib.import_module("migrate").main() == 0
    monkeypatch.setenv("SECRET_KEY", "unit-test-key")
    sys.modules.pop("app", None)
    return importlib.import_module("app")


def call(app, path: str, method: str = "GET", body: bytes = b"", cookie: str = "",
         length: str | None = None) -> tuple[str, dict[str, str], bytes]:
    """One request to the WSGI app: (status line, cookies it set (name -> full Set-Cookie), body)."""
    env = {"PATH_INFO": path, "REQUEST_METHOD": method, "CONTENT_LENGTH": str(len(body)) if length is None else length,
           "wsgi.input": io.BytesIO(body), "HTTP_COOKIE": cookie}
    seen: list = []
    out = b"".join(app.application(env, lambda s, h: seen.append((s, h))))
    status, headers = seen[0]
    return status, {v.split("=", 1)[0]: v for k, v in headers if k == "Set-Cookie"}, out


def form(app) -> tuple[str, str]:
    """(Cookie header, CSRF token) as a browser has them after loading the sign-up form."""
    _, cookies, body = call(app, "/app")
    token = re.search(rb"name=csrf value=([0-9a-f]{32})", body).group(1).decode()
    return "; ".join(v.split(";", 1)[0] for v in cookies.values()), token


def post_signup(app, email: str) -> tuple[str, bytes]:
    cookie, token = form(app)
    status, _, out = call(app, "/signup", "POST", f"email={email}&csrf={token}".encode(), cookie)
    return status, out


# --- tests ----------------------------------------------------------------------------------------------------------


def test_signup_enqueues_and_notifies_in_one_transaction(dsn, monkeypatch):
    app = load_app(monkeypatch)
    listener = psycopg2.connect(dsn)
    listener.autocommit = True
    listener.cursor().execute(f"listen {jobs.CHANNEL}")
    status, _ = post_signup(app, "ann@example.test")
    assert status.startswith("201")
    rows = query(dsn, "select kind, args, state from jobs")
    assert rows == [("welcome_email", {"email": "ann@example.test", "signup_id": 1}, "ready")]
    listener.poll()
    assert [n.channel for n in listener.notifies] == [jobs.CHANNEL]
    listener.notifies.clear()

    # A sign-up that fails at commit (a deferred check) leaves neither the user nor the job, nor a wake-up.
    query(dsn, """
        create function refuse() returns trigger language plpgsql as $$ begin raise exception 'refused'; end $$;
        create constraint trigger refuse_at_commit after insert on signups deferrable initially deferred
            for each row when (new.email like 'bad%%') execute function refuse();
    """)
    with pytest.raises(psycopg2.Error):
        post_signup(app, "bad@example.test")
    assert query(dsn, "select count(*) from signups") == [(1,)]
    assert query(dsn, "select count(*) from jobs") == [(1,)]
    time.sleep(0.1)
    listener.poll()
    assert listener.notifies == []
    listener.close()


def test_welcome_email_delivered_once_with_job_message_id(dsn, smtp, monkeypatch):
    app = load_app(monkeypatch)
    post_signup(app, "bob@example.test")
    (job_id,) = query(dsn, "select id from jobs")[0]
    drain(dsn)
    assert state(dsn, job_id) == ("done", 1, None)
    assert len(smtp.messages) == 1
    mail = smtp.messages[0]
    assert mail["rcpts"] == ["bob@example.test"] and mail["from"] == "hello@example.test"
    assert mail["tls"] and mail["user"] == "mailer"
    assert mail["message"]["Message-ID"] == f"<job-{job_id}.welcome@example.test>"
    assert mail["message"]["To"] == "bob@example.test"


def test_notify_wakes_idle_worker_fast(dsn, smtp):
    with ThreadWorker(dsn, poll_interval=30):
        time.sleep(0.5)  # the worker is idle, LISTENing, its next poll 30 s away
        start = time.monotonic()
        (job_id,) = enqueue(dsn, "welcome_email", {"email": "fast@example.test"})
        wait_for(lambda: state(dsn, job_id)[0] == "done", 5, "the job")
        assert time.monotonic() - start < 2
    assert len(smtp.messages) == 1


def test_4xx_retries_with_growing_delay_then_dead_then_requeue(dsn, smtp, capsys):
    smtp.rcpt_reply = "451 4.7.1 try again later"
    (job_id,) = enqueue(dsn, "welcome_email", {"email": "carl@example.test"})
    with ThreadWorker(dsn, max_attempts=4, retry_base=0.3):
        wait_for(lambda: state(dsn, job_id)[0] == "dead", 15, "dead letter")
    st, attempts, error = state(dsn, job_id)
    assert attempts == 4 and "451" in error
    assert smtp.messages == [] and len(smtp.rcpt_attempts) == 4
    gaps = [b - a for a, b in zip(smtp.rcpt_attempts, smtp.rcpt_attempts[1:], strict=False)]
    for n, gap in enumerate(gaps):  # delay n+1 is at least half of base * 2**n
        assert gap >= 0.3 * 2**n * 0.5
    assert gaps[2] > gaps[0] * 1.5
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        assert [(d["id"], d["kind"], d["attempts"]) for d in jobs.dead_jobs(cur)] == [(job_id, "welcome_email", 4)]
        assert jobs.requeue(cur, [job_id]) == 1
    conn.close()
    smtp.rcpt_reply = "250 2.1.5 ok"
    drain(dsn)
    assert state(dsn, job_id) == ("done", 1, None)
    assert smtp.message_ids() == [f"<job-{job_id}.welcome@example.test>"]


def test_5xx_recipient_is_dead_at_once(dsn, smtp):
    smtp.rcpt_reply = "550 5.1.1 no such user"
    (job_id,) = enqueue(dsn, "welcome_email", {"email": "nobody@example.test"})
    drain(dsn)
    st, attempts, error = state(dsn, job_id)
    assert (st, attempts) == ("dead", 1) and "550" in error and "permanent" in error
    assert smtp.messages == []


def test_two_workers_never_run_a_job_twice(dsn, smtp, tmp_path):
    query(dsn, "create table ran (job_id bigint not null)")
    record = ("jobs.HANDLERS['record'] = lambda job, cur: cur.execute('insert into ran values (%s)', (job.id,))\n"
              "jobs.BATCHABLE.add('record')")
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute("insert into jobs (kind) select 'record' from generate_series(1, 3000)")
        mails = [jobs.enqueue(cur, "welcome_email", {"email": f"u{i}@example.test"}) for i in range(20)]
    conn.close()
    workers = [spawn_worker(dsn, tmp_path, f"w{i}", record, JOB_BATCH="50") for i in range(2)]
    try:
        wait_for(lambda: query(dsn, "select count(*) from jobs where state <> 'done'") == [(0,)], 40, "all jobs")
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        assert [w.wait(10) for w in workers] == [0, 0]
    assert query(dsn, "select count(*), count(distinct job_id) from ran") == [(3000, 3000)]
    assert sorted(smtp.message_ids()) == sorted(f"<job-{i}.welcome@example.test>" for i in mails)
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert all("done" in text for text in logs), "both workers took part"


def test_sigterm_mid_job_finishes_the_job_and_claims_no_more(dsn, smtp, tmp_path):
    smtp.hold_at = "data"
    (job_id,) = enqueue(dsn, "welcome_email", {"email": "dora@example.test"})
    proc = spawn_worker(dsn, tmp_path, "w")
    assert smtp.held.wait(10)
    proc.send_signal(signal.SIGTERM)
    (later,) = enqueue(dsn, "welcome_email", {"email": "late@example.test"})
    time.sleep(0.3)
    assert proc.poll() is None, "still finishing its job"
    smtp.release.set()
    assert proc.wait(10) == 0
    assert state(dsn, job_id)[0] == "done"
    assert state(dsn, later) == ("ready", 0, None)
    assert smtp.message_ids() == [f"<job-{job_id}.welcome@example.test>"]


def test_killed_worker_job_is_completed_by_another(dsn, smtp, tmp_path):
    smtp.hold_at = "rcpt"
    (job_id,) = enqueue(dsn, "welcome_email", {"email": "eve@example.test"})
    first = spawn_worker(dsn, tmp_path, "first")
    assert smtp.held.wait(10)
    assert query(dsn, "select count(*) from pg_locks where locktype = 'advisory' and classid = %s", (jobs.LOCK_CLASS,)) == [(1,)]
    first.kill()
    first.wait(5)
    second = spawn_worker(dsn, tmp_path, "second")
    try:
        wait_for(lambda: state(dsn, job_id)[0] == "done", 10, "the job")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0
    assert smtp.message_ids() == [f"<job-{job_id}.welcome@example.test>"]
    smtp.release.set()


def test_stalled_worker_loses_its_job_after_lock_timeout(dsn, smtp, tmp_path):
    """A hung or powered-off worker: the server ends its idle transaction after JOB_LOCK_TIMEOUT."""
    smtp.hold_at = "rcpt"
    (job_id,) = enqueue(dsn, "welcome_email", {"email": "fred@example.test"})
    stalled = spawn_worker(dsn, tmp_path, "stalled", JOB_LOCK_TIMEOUT="2", SMTP_TIMEOUT="1.5")
    assert smtp.held.wait(10)
    stalled.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    second = spawn_worker(dsn, tmp_path, "second", JOB_LOCK_TIMEOUT="2", SMTP_TIMEOUT="1.5")
    try:
        wait_for(lambda: state(dsn, job_id)[0] == "done", 10, "the job")
        assert time.monotonic() - started > 1.0, "not before the lock timeout"
    finally:
        stalled.kill()
        stalled.wait(5)
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0
    assert smtp.message_ids() == [f"<job-{job_id}.welcome@example.test>"]
    smtp.release.set()


def test_stats_counts(dsn):
    query(dsn, """
        insert into jobs (kind, run_at) values ('noop', now() - interval '100 s'), ('noop', now() - interval '50 s'),
            ('noop', now());
        insert into jobs (kind, run_at) values ('noop', now() + interval '1 h'), ('noop', now() + interval '1 h');
        insert into jobs (kind, state, finished_at) values ('noop', 'dead', now()), ('noop', 'done', now());
    """)
    holder = psycopg2.connect(dsn)
    hcur = holder.cursor()
    hcur.execute(jobs.CLAIM, (1,))  # a worker in the middle of the oldest job
    assert len(hcur.fetchall()) == 1
    out = subprocess.run([sys.executable, str(DEMOAPP / "jobs.py"), "stats"], capture_output=True, text=True,
                         env={**os.environ, "DATABASE_URL": dsn}, check=True).stdout
    stats = json.loads(out)
    age = stats.pop("oldest_ready_age")
    assert stats == {"ready": 2, "waiting": 2, "running": 1, "dead": 1, "done": 1}
    assert 49 < age < 60
    holder.rollback()
    holder.close()


def test_cleanup_deletes_only_old_finished_jobs(dsn):
    query(dsn, """
        insert into jobs (kind, state, finished_at) values ('noop', 'done', now() - interval '8 days'),
            ('noop', 'done', now() - interval '1 day'), ('noop', 'dead', now() - interval '30 days');
        insert into jobs (kind, created_at, run_at) values ('noop', now() - interval '9 days', now() - interval '9 days');
    """)
    out = subprocess.run([sys.executable, str(DEMOAPP / "jobs.py"), "cleanup", "--older-than", "7d"],
                         capture_output=True, text=True, env={**os.environ, "DATABASE_URL": dsn}, check=True).stdout
    assert out.strip() == "deleted 1"
    rows = query(dsn, "select state, finished_at > now() - interval '2 days' from jobs order by id")
    assert rows == [("done", True), ("dead", False), ("ready", None)]


def test_reconnects_after_database_restart_and_keeps_listening(dsn, pg, smtp):
    with ThreadWorker(dsn, poll_interval=30) as tw:
        time.sleep(0.3)
        query(pg.dsn(), "select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'webstack-jobs'")
        wait_for(lambda: query(dsn, "select count(*) from pg_stat_activity where application_name = 'webstack-jobs'") == [(1,)],
                 10, "the worker back")
        time.sleep(0.2)
        start = time.monotonic()
        (job_id,) = enqueue(dsn, "welcome_email", {"email": "gus@example.test"})
        wait_for(lambda: state(dsn, job_id)[0] == "done", 5, "the job")
        assert time.monotonic() - start < 2, "woken by NOTIFY, not the 30 s poll"
        assert tw.thread.is_alive()


def test_noop_batches_and_secrets_stay_out_of_logs(dsn, tmp_path, capsys):
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        jobs.enqueue_noop(cur, 500)
    conn.close()
    drain(dsn)
    assert query(dsn, "select state, count(*) from jobs group by 1") == [("done", 500)]
    (tmp_path / "pw").write_text("smtp-hunter2\n")
    env = {"DATABASE_URL": "host=/nonexistent dbname=x user=u password=db-hunter2", "SMTP_PASSWORD_FILE": str(tmp_path / "pw")}
    jobs.setup_logging(env)
    jobs.log.warning("oops %s %s", env["DATABASE_URL"], "smtp-hunter2")
    out = capsys.readouterr().out
    assert "hunter2" not in out and "password=***" in out


def test_settings_refuse_smtp_timeout_not_below_lock_timeout():
    with pytest.raises(ValueError, match="SMTP_TIMEOUT"):
        jobs.Settings.from_env({"DATABASE_URL": "x", "JOB_LOCK_TIMEOUT": "30", "SMTP_TIMEOUT": "30"})
    s = jobs.Settings.from_env({"DATABASE_URL": "x", "JOB_LOCK_TIMEOUT": "1m", "JOB_RETRY_MAX": "2h"})
    assert (s.lock_timeout, s.retry_max, s.smtp_timeout) == (60, 7200, 20)


def test_migrations_apply_once_in_order_and_a_failure_names_the_file(dsn, tmp_path, monkeypatch, capsys):
    migrate = importlib.import_module("migrate")
    query(dsn, "create table signups (id serial primary key, email text not null, served_by text not null, "
               "at timestamptz not null default now())")  # what the releases before migrations made
    query(dsn, "insert into signups (email, served_by) values ('old@example.test', 'app1')")
    assert migrate.main() == 0
    assert "applied 001_signups.sql" in capsys.readouterr().out
    assert query(dsn, "select version from schema_migrations order by 1") == [("001_signups",), ("002_signups_source",)]
    assert query(dsn, "select email, source from signups") == [("old@example.test", None)]  # kept, column added
    assert migrate.main() == 0 and "schema up to date (0 applied)" in capsys.readouterr().out
    # A broken one: non-zero, named, not recorded, nothing of it left; later files not tried.
    shutil.copytree(migrate.HERE, tmp_path / "migrations")
    (tmp_path / "migrations" / "003_broken.sql").write_text("alter table signups add column plan text; select 1/0;")
    (tmp_path / "migrations" / "004_later.sql").write_text("create table later (id int);")
    monkeypatch.setattr(migrate, "HERE", tmp_path / "migrations")
    assert migrate.main() == 1
    assert "migration 003_broken.sql failed: division by zero" in capsys.readouterr().err
    assert query(dsn, "select count(*) from schema_migrations") == [(2,)]
    assert query(dsn, "select count(*) from information_schema.columns where column_name = 'plan'") == [(0,)]
    assert query(dsn, "select count(*) from information_schema.tables where table_name = 'later'") == [(0,)]


def test_demo_app_form_csrf_validation_and_sessions(dsn, monkeypatch):
    """What the demo app teaches: CSRF token on the form, validated addresses, 400/413 for bad bodies
    (never a 500), sessions that expire, no start without SECRET_KEY."""
    app = load_app(monkeypatch)
    cookie, token = form(app)
    _, cookies, _ = call(app, "/app")
    assert "SameSite=Strict" in cookies["__Host-csrf"] and "SameSite=Lax" in cookies["session"]
    # No token, a wrong one, or a token without its cookie: refused.
    assert call(app, "/signup", "POST", b"email=a@example.test", cookie)[0].startswith("403")
    assert call(app, "/signup", "POST", b"email=a@example.test&csrf=" + b"0" * 32, cookie)[0].startswith("403")
    assert call(app, "/signup", "POST", f"email=a@example.test&csrf={token}".encode())[0].startswith("403")
    # Addresses: one @, a dot in the domain, at most 254 characters.
    for bad in ("no-at-sign", "two@@example.test", "a@nodot", "a b@example.test", "x" * 60 + "@" + "d" * 190 + ".test"):
        status, _, _ = call(app, "/signup", "POST", f"email={bad}&csrf={token}".encode(), cookie)
        assert status.startswith("400"), (bad, status)
    # Malformed bodies: a 400 or 413, not a 500.
    assert call(app, "/signup", "POST", b"\xff\xfe", cookie)[0].startswith("400")
    assert call(app, "/signup", "POST", b"x", cookie, length="many")[0].startswith("400")
    assert call(app, "/signup", "POST", b"e" * 9000, cookie)[0].startswith("413")
    assert call(app, "/signup", "POST", f"email=ok@example.test&csrf={token}".encode(), cookie)[0].startswith("201")
    assert query(dsn, "select email from signups") == [("ok@example.test",)]
    # Sessions expire: a session older than SESSION_MAX_AGE starts again at visit 1.
    session = app.sign(f"abcd:41:{int(time.time()) - app.SESSION_MAX_AGE - 5}")
    assert b"Visit 1 in" in call(app, "/app", cookie=f"session={session}")[2]
    fresh = app.sign(f"abcd:41:{int(time.time()) - 60}")
    assert b"Visit 42 in" in call(app, "/app", cookie=f"session={fresh}")[2]
    assert b"Visit 1 in" in call(app, "/app", cookie="session=abcd:41:0.forged")[2]
    # No SECRET_KEY: it refuses to start.
    monkeypatch.delenv("SECRET_KEY")
    sys.modules.pop("app", None)
    with pytest.raises(SystemExit, match="SECRET_KEY is not set"):
        importlib.import_module("app")


# --- the application's writes -------------------------------------------------------------------------------------


def test_app_write_retries_a_connection_the_server_ends_mid_transaction(dsn, monkeypatch):
    """A primary's fast shutdown (a switchover) ends the connections in mid-transaction: psycopg2 then
    raises InterfaceError from the ``with conn`` block (its rollback on the dead connection), not
    OperationalError. The write is tried again on a new connection, and happens once."""
    app = load_app(monkeypatch)
    query(dsn, "create table marks (n int)")
    calls = []

    def work(cur):
        calls.append(1)
        cur.execute("insert into marks values (1)")
        if len(calls) == 1:  # the server ends this very session before the commit
            killer = psycopg2.connect(dsn)
            killer.autocommit = True
            killer.cursor().execute("select pg_terminate_backend(%s)", (cur.connection.get_backend_pid(),))
            killer.close()
            cur.execute("select 1")
        return len(calls)

    assert app.write(work) == 2
    assert query(dsn, "select count(*) from marks") == [(1,)]

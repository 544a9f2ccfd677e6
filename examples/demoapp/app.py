"""webstack demo application: a small WSGI app, no framework.

Pages say which application server answered; /signup writes to PostgreSQL;
a session cookie counts visits per browser; /healthz checks the database.
Configuration comes from the environment (the app role writes it from the
inventory and secrets): DATABASE_URL (a libpq connection string), SECRET_KEY
(required: the app refuses to start without it), SESSION_MAX_AGE (seconds, 12 h).
A sign-up enqueues its welcome_email job in the same transaction (jobs.py runs it).

What people copy from it, so it does the basics right: the sign-up form carries a
CSRF token (the double-submit pattern: a SameSite=Strict cookie and a hidden field,
which must match), addresses are validated (and limited to 254 characters), a
malformed or oversized body gets a 400 or 413 (never a 500), and sessions expire.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import os
import re
import secrets
import socket
import time
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

import jobs
import psycopg2
import psycopg2.errors

HOST = socket.gethostname()
# The release id is the name of the directory this release was unpacked into.
RELEASE = os.path.basename(os.path.dirname(os.path.realpath(__file__)))
if not os.environ.get("SECRET_KEY"):
    raise SystemExit("SECRET_KEY is not set: refusing to start (sessions and CSRF tokens are signed with it)")
SECRET = os.environ["SECRET_KEY"].encode()
SESSION_MAX_AGE = int(os.environ.get("SESSION_MAX_AGE", str(12 * 3600)))
MAX_BODY = 8 * 1024
CSRF_COOKIE = "__Host-csrf"
# One @, no spaces, a dot in the domain; 254 characters at most (RFC 5321's path limit).
EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s.]+")
# How long a write waits for a primary while the cluster changes its primary (a switchover
# stops writes for about a second, a failover for a few): the request waits, it does not fail.
WRITE_WAIT_S = float(os.environ.get("DB_WRITE_WAIT", "15"))


def db():
    """A new connection (libpq picks the read-write member of the cluster)."""
    return psycopg2.connect(os.environ["DATABASE_URL"], connect_timeout=3)


def write(work):
    """Run ``work(cursor)`` in one transaction on the primary and return its result; while there is
    no primary to write to (connection refused or dropped, a server shutting down, a standby not
    yet promoted), try again every 0.2 s for up to WRITE_WAIT_S. A connection lost after the
    commit was sent but before it was acknowledged can make one retry a duplicate.

    A connection the server ends in mid-transaction (a primary's fast shutdown at a switchover)
    surfaces as InterfaceError ("connection already closed": the ``with`` block's rollback on the
    dead connection replaces the OperationalError), so that is retried too."""
    deadline = time.monotonic() + WRITE_WAIT_S
    while True:
        try:
            conn = db()
            try:
                with conn, conn.cursor() as cur:
                    return work(cur)
            finally:
                conn.close()
        except (psycopg2.OperationalError, psycopg2.InterfaceError, psycopg2.errors.ReadOnlySqlTransaction):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def ensure_schema() -> None:
    with db() as conn, conn.cursor() as cur:
        jobs.ensure_schema(cur)  # first: its advisory lock serialises the creation when all workers start at once
        cur.execute("create table if not exists signups (id serial primary key, email text not null, "
                    "served_by text not null, at timestamptz not null default now())")


def sign(value: str) -> str:
    return value + "." + hmac.new(SECRET, value.encode(), hashlib.sha256).hexdigest()[:32]


def unsign(token: str) -> str | None:
    value, _, mac = token.rpartition(".")
    return value if value and hmac.compare_digest(sign(value), token) else None


def page(title: str, body: str) -> bytes:
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}<hr><p>served by <b id=server>{HOST}</b>, "
            f"release {html.escape(RELEASE)}</p></body></html>").encode()


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    method = environ.get("REQUEST_METHOD", "GET")
    headers = [("Content-Type", "text/html; charset=utf-8"), ("X-Served-By", HOST), ("X-Release", RELEASE)]
    if path == "/healthz":
        try:
            with db() as conn, conn.cursor() as cur:
                cur.execute("select 1")
            start_response("200 OK", [("Content-Type", "text/plain"), ("X-Served-By", HOST), ("X-Release", RELEASE)])
            return [b"ok\n"]
        except psycopg2.Error as exc:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [f"database: {exc.__class__.__name__}\n".encode()]
    if path == "/ping":  # a small page with no database work, for benchmarks
        # The client's address as the load balancer passed it (never the client's own claim).
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Served-By", HOST),
                                  ("X-Client-Address", environ.get("HTTP_X_FORWARDED_FOR", ""))])
        return [b"pong\n"]
    cookie = SimpleCookie()
    try:
        cookie.load(environ.get("HTTP_COOKIE", ""))
    except Exception:  # a malformed Cookie header is no session, not an error
        cookie = SimpleCookie()
    now = int(time.time())
    session = unsign(cookie["session"].value) if "session" in cookie else None
    fields = session.split(":") if session else []
    if len(fields) != 3 or not all(f.isdigit() for f in fields[1:]) or now - int(fields[2]) > SESSION_MAX_AGE:
        fields = [secrets.token_hex(8), "0", str(now)]  # none, forged or expired: a new session
    sid, visits, started = fields[0], int(fields[1]) + 1, fields[2]
    # The load balancer adds Secure and HttpOnly; SameSite is the application's choice.
    headers.append(("Set-Cookie", f"session={sign(f'{sid}:{visits}:{started}')}; Path=/; Max-Age={SESSION_MAX_AGE}; "
                                  "SameSite=Lax"))
    # __Host-: the browser keeps it only as set by this very host over HTTPS (Secure, Path=/, no Domain),
    # so a sibling subdomain cannot plant a token of its own (cookie tossing).
    held = cookie[CSRF_COOKIE].value if CSRF_COOKIE in cookie else ""
    csrf = held if re.fullmatch(r"[0-9a-f]{32}", held) else None
    if path == "/signup" and method == "POST":
        try:
            size = int(environ.get("CONTENT_LENGTH") or 0)
            if size > MAX_BODY:
                start_response("413 Content Too Large", headers)
                return [page("Sign up", "<p>That form is too large.</p>")]
            form = parse_qs(environ["wsgi.input"].read(size).decode("utf-8"), strict_parsing=size > 0)
        except (ValueError, UnicodeDecodeError):
            start_response("400 Bad Request", headers)
            return [page("Sign up", "<p>That form could not be read.</p>")]
        if not csrf or not hmac.compare_digest((form.get("csrf") or [""])[0], csrf):
            start_response("403 Forbidden", headers)
            return [page("Sign up", "<p>The form expired: load it again.</p>")]
        email = (form.get("email") or [""])[0].strip()
        source = (form.get("source") or ["web"])[0].strip()[:40] or "web"
        if len(email) > 254 or not EMAIL.fullmatch(email):
            start_response("400 Bad Request", headers)
            return [page("Sign up", "<p>That is not an e-mail address.</p>")]
        # One transaction: no welcome mail for a sign-up that rolls back, no sign-up without its mail;
        # the NOTIFY in it wakes a worker at commit.
        def sign_up(cur) -> int:
            # `source` comes with migration 002 (app__migrate_command runs it before this release serves).
            cur.execute("insert into signups (email, served_by, source) values (%s, %s, %s) returning id",
                        (email, HOST, source))
            new_id = cur.fetchone()[0]
            jobs.enqueue(cur, "welcome_email", {"email": email, "signup_id": new_id})
            return new_id

        new_id = write(sign_up)
        start_response("201 Created", headers)
        return [page("Thanks", f"<p>Signed up as #{new_id}.</p>")]
    if path in ("/app", "/signup"):
        if not csrf:
            csrf = secrets.token_hex(16)
            headers.append(("Set-Cookie", f"{CSRF_COOKIE}={csrf}; Path=/; Secure; SameSite=Strict"))
        start_response("200 OK", headers)
        form = (f'<form method=post action=/signup><input type=hidden name=csrf value={csrf}>'
                '<input name=email type=email maxlength=254 required><button>Sign up</button></form>')
        return [page("webstack demo", f"<p>Visit {visits} in this session.</p>{form}")]
    start_response("404 Not Found", headers)
    return [page("Not found", "")]


try:
    ensure_schema()
except (psycopg2.Error, KeyError):
    pass  # /healthz reports the database; the schema is made on the next start

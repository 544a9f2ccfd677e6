"""Clients for lab machines, shared by the integration tests and the benchmarks.

``host(name)`` is a testinfra host reached as the admin user over OpenSSH
with the lab key and strict host keys (commands run under sudo); the
PostgreSQL helpers speak to the lab's clusters with psql from a client host,
over TLS, as the application does.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlencode

import testinfra
import yaml

ROOT = Path(__file__).resolve().parent.parent
STATE = Path("/var/lib/webstack-lab")
KEY = STATE / "ssh" / "id_ed25519"
KNOWN_HOSTS = STATE / "ssh" / "known_hosts"
FLEET = yaml.safe_load((ROOT / "lab" / "fleet.yml").read_text())
# The standing lab (inventories/lab); on-demand machines (booted by the test that uses them) apart.
MACHINES = {m["name"]: m for m in FLEET["machines"] if not m.get("on_demand")}
ON_DEMAND = {m["name"]: m for m in FLEET["machines"] if m.get("on_demand") and "count" not in m}
ADDRESS = {m["name"]: m["address"] for m in FLEET["machines"] if "count" not in m}
PGPASS = "/root/.webstack-test-pgpass"
# PostgreSQL cluster of each database machine: the lab's groups pg_<cluster> (inventories/lab/group_data).
CLUSTER = {m["name"]: g.removeprefix("pg_") for m in FLEET["machines"] for g in m.get("groups", []) if g.startswith("pg_")}

SSH_CONFIG = Path(tempfile.mkdtemp(prefix="webstack-probe-")) / "ssh_config"
SSH_CONFIG.write_text(
    f"Host 10.77.0.*\n  IdentityFile {KEY}\n  IdentitiesOnly yes\n  UserKnownHostsFile {KNOWN_HOSTS}\n"
    "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 5\n"
)


def host(name: str):
    """A testinfra host: OpenSSH as the admin user with strict host keys, commands under sudo."""
    return testinfra.get_host(f"ssh://ops@{ADDRESS[name]}", ssh_config=str(SSH_CONFIG), sudo=True)


def conninfo(*hosts: str, **extra: str) -> str:
    parts = {"host": ",".join(ADDRESS[h] for h in hosts), "dbname": "app", "user": "app",
             # As the application connects (roles/postgres/certs.py): the member's certificate verified
             # against its cluster's CA, the password exchange bound to the TLS channel.
             "sslmode": "verify-full", "sslrootcert": f"/etc/webstack/postgres-{CLUSTER.get(hosts[0], 'main')}-ca.crt",
             "channel_binding": "require", "connect_timeout": "3", **extra}
    return " ".join(f"{k}={v}" for k, v in parts.items())


def sql(app1, target: str, statement: str, check: bool = True, **extra: str):
    cmd = app1.run(f"PGPASSFILE={PGPASS} psql \"{conninfo(target, **extra)}\" -XAtqc \"{statement}\"")
    if check:
        if cmd.rc != 0:
            raise RuntimeError(f"psql on {target}: {cmd.stderr.strip()}")
        return cmd.stdout.strip()
    return cmd


class Writer:
    """A steady client on app1 inserting ids 1, 2, 3... through a multi-host, read-write-only
    connection string; every id whose INSERT was acknowledged is appended to a file."""

    def __init__(self, app1, hosts: tuple[str, str], tag: str):
        self.app1, self.tag = app1, tag
        self.acked = f"/root/acked-{tag}"
        info = conninfo(*hosts, target_session_attrs="read-write", connect_timeout="1")
        script = f"""rm -f {self.acked} /root/stop-{tag}
i=0
while [ ! -f /root/stop-{tag} ]; do
    i=$((i+1))
    if PGPASSFILE={PGPASS} psql "{info}" -XAtqc "insert into writes_{tag} (id) values ($i)" 2>/dev/null; then
        echo $i >> {self.acked}
    fi
    sleep 0.02
done
"""
        # A writer of the same tag left running by an interrupted test or benchmark goes first.
        app1.run(f"systemctl stop writer-{tag} 2>/dev/null; systemctl reset-failed writer-{tag} 2>/dev/null; true")
        sql(app1, hosts[0], f"drop table if exists writes_{tag}; create table writes_{tag} (id bigint primary key)")
        app1.run(f"cat > /root/writer-{tag}.sh <<'EOF'\n{script}EOF")
        if app1.run(f"systemd-run --unit=writer-{tag} --collect sh /root/writer-{tag}.sh").rc != 0:
            raise RuntimeError("cannot start the writer")

    def acked_count(self) -> int:
        return int(self.app1.check_output(f"cat {self.acked} 2>/dev/null | wc -l"))

    def stop(self) -> set[int]:
        self.app1.run(f"touch /root/stop-{self.tag}; sleep 1; systemctl stop writer-{self.tag} 2>/dev/null")
        return {int(x) for x in self.app1.check_output(f"cat {self.acked}").split()}

    def stored(self, primary: str) -> set[int]:
        return {int(x) for x in sql(self.app1, primary, f"select id from writes_{self.tag}").split()}




# --- HTTPS through the load balancers' floating IP -------------------------------------------

import http.client  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

CA_FILE = ROOT / "inventories" / "lab" / "ca.crt"
SERVER_NAME = "www.webstack.test"


def vip() -> str:
    """The load balancers' floating IP from the lab inventory."""
    data = yaml.safe_load((ROOT / "inventories" / "lab" / "group_data" / "lb.yml").read_text())
    return data["lb__vip"]


class _ByName(http.client.HTTPSConnection):
    """An HTTPS connection to an address that sends and verifies the site's name (SNI)."""

    def __init__(self, address: str, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(SERVER_NAME, 443, context=context, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        raw = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=SERVER_NAME)  # type: ignore[attr-defined]


def https(path: str, method: str = "GET", body: str | None = None, timeout: float = 2.0,
          address: str | None = None, headers: dict[str, str] | None = None,
          cafile: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a new TLS connection, verified against the lab CA; (status, headers, body).
    ``headers`` are added (a ``Host`` among them replaces the site's name). With ``cafile`` (a
    certificate from elsewhere, e.g. ACME, names no address) the site's name is verified instead
    of the address, as a browser does."""
    context = ssl.create_default_context(cafile=cafile or str(CA_FILE))
    conn = (_ByName(address or vip(), context, timeout) if cafile
            else http.client.HTTPSConnection(address or vip(), 443, context=context, timeout=timeout))
    try:
        headers = {"Host": SERVER_NAME, **(headers or {})}
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        out: dict[str, str] = {}
        for key, value in response.getheaders():  # several Set-Cookie headers: one per line
            key = key.lower()
            out[key] = f"{out[key]}\n{value}" if key == "set-cookie" and key in out else value
        return response.status, out, response.read()
    finally:
        conn.close()


class SignupForm:
    """Sign-ups as a browser makes them: the form is loaded once (its session and CSRF cookies, and the
    token in its hidden field), then each POST carries both; a 403 (the form expired) loads it again."""

    def __init__(self, address: str | None = None, timeout: float = 10.0) -> None:
        self.address, self.timeout = address, timeout
        self.cookies: dict[str, str] = {}
        self.token = ""

    def _keep(self, headers: dict[str, str]) -> None:
        for line in headers.get("set-cookie", "").splitlines():
            name, _, rest = line.partition("=")
            self.cookies[name.strip()] = rest.split(";", 1)[0]

    def load(self) -> None:
        status, headers, body = https("/app", timeout=self.timeout, address=self.address,
                                      headers={"Cookie": self._cookie()} if self.cookies else None)
        if status != 200:
            raise http.client.HTTPException(f"the sign-up form answered HTTP {status}")
        self._keep(headers)
        found = re.search(rb"name=csrf value=([0-9a-f]{32})", body)
        if not found:
            raise http.client.HTTPException("no CSRF token in the sign-up form")
        self.token = found.group(1).decode()

    def _cookie(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items())

    def post(self, email: str, **fields: str) -> tuple[int, dict[str, str], bytes]:
        """POST /signup; (status, headers, body)."""
        for attempt in (1, 2):
            if not self.token:
                self.load()
            result = https("/signup", "POST", urlencode({"email": email, "csrf": self.token, **fields}),
                           timeout=self.timeout, address=self.address, headers={"Cookie": self._cookie()})
            self._keep(result[1])
            if result[0] != 403 or attempt == 2:
                return result
            self.token = ""
        raise AssertionError("unreachable")


class SteadyClient:
    """A client thread sending one request every ``interval`` seconds until stopped.

    Records (monotonic time, ok, detail) for each request; a request is ok when
    the answer is 2xx. Bounded: it stops by itself after ``limit`` seconds.
    """

    def __init__(self, path: str = "/app", interval: float = 0.05, limit: float = 300, timeout: float = 2.0,
                 address: str | None = None, retry_reset: bool = False, cafile: str | None = None):
        self.path, self.interval, self.limit, self.timeout = path, interval, limit, timeout
        self.cafile = cafile  # None: the lab CA
        self.address = address  # None: the VIP
        # As a browser does: a GET whose connection was reset before any answer (a VIP that moved
        # while it was in flight) is sent once more; the request fails if that fails too.
        self.retry_reset, self.resets = retry_reset, 0
        self.results: list[tuple[float, bool, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SteadyClient:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        end = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < end:
            start = time.monotonic()
            try:
                try:
                    status, headers, _ = https(self.path, timeout=self.timeout, address=self.address, cafile=self.cafile)
                except (ConnectionResetError, http.client.RemoteDisconnected):
                    if not self.retry_reset:
                        raise
                    self.resets += 1
                    status, headers, _ = https(self.path, timeout=self.timeout, address=self.address,
                                               cafile=self.cafile)
                self.results.append((start, 200 <= status < 300, f"{status} {headers.get('x-served-by', '')}"))
            except (OSError, http.client.HTTPException) as exc:
                self.results.append((start, False, type(exc).__name__))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - start)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def failures(self) -> list[tuple[float, bool, str]]:
        return [r for r in self.results if not r[1]]

    def longest_outage(self) -> float:
        """Longest time between two successful requests that had failures in between (seconds)."""
        worst, last_ok, failed_since = 0.0, None, False
        for t, ok, _ in self.results:
            if ok:
                if failed_since and last_ok is not None:
                    worst = max(worst, t - last_ok)
                last_ok, failed_since = t, False
            else:
                failed_since = True
        return worst

    def served_by(self) -> set[str]:
        return {detail.split(" ", 1)[1] for _, ok, detail in self.results if ok and " " in detail}


class SignupClient:
    """Signs up a new address through the VIP (or ``address``) every ``interval`` s; records (start,
    seconds, ok, email)."""

    def __init__(self, interval: float = 0.2, limit: float = 1800, address: str | None = None) -> None:
        self.interval, self.limit, self.tag = interval, limit, f"patch-{uuid.uuid4().hex[:8]}"
        self.address = address  # None: the VIP
        self.form = SignupForm(address, timeout=30)
        self.results: list[tuple[float, float, bool, str]] = []
        self.errors: dict[str, str] = {}  # email -> why its sign-up failed (status or exception)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SignupClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        end, n = time.monotonic() + self.limit, 0
        while not self._stop.is_set() and time.monotonic() < end:
            n += 1
            email = f"{self.tag}-{n}@customer.test"
            start = time.monotonic()
            try:
                status, _, _ = self.form.post(email)
                ok = status == 201
                if not ok:
                    self.errors[email] = f"HTTP {status}"
            except (OSError, http.client.HTTPException) as exc:
                ok = False
                self.errors[email] = f"{type(exc).__name__}: {exc}"
            self.results.append((start, time.monotonic() - start, ok, email))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - start)))

    def failures(self) -> list[tuple[float, float, bool, str]]:
        return [r for r in self.results if not r[2]]

    def acknowledged(self) -> set[str]:
        return {r[3] for r in self.results if r[2]}

    def explain(self, slower_than: float = 2.0) -> str:
        """The failed and the slow sign-ups, a line each, at wall-clock (UTC) times that can be
        matched with the servers' journals; why each failure failed."""
        epoch = time.time() - time.monotonic()
        return "\n".join(
            f"{time.strftime('%H:%M:%S', time.gmtime(epoch + start))}.{int((epoch + start) % 1 * 1000):03d} UTC "
            f"{seconds:6.2f} s {'ok' if ok else 'FAILED: ' + self.errors.get(email, '?')} {email}"
            for start, seconds, ok, email in self.results if not ok or seconds > slower_than)



def vip_holder(names: list[str]) -> str | None:
    """Which of the given load balancers currently has the VIP on an interface."""
    address = vip()
    for name in names:
        result = host(name).run(f"ip -4 -o addr show | grep -q ' {address}/'")
        if result.rc == 0:
            return name
    return None

"""The web tier from outside: a real HTTPS client through the floating IP, trusting the lab CA."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from cryptography import x509

from lab.probe import CA_FILE, SignupForm, SteadyClient, host, https, vip, vip_holder
from tests.integration.conftest import BIN, MACHINES, ROOT, drained_on, inventory_copy, lab, release_of, run, wait_for

pytestmark = pytest.mark.lab
LBS = sorted(n for n, m in MACHINES.items() if "lb" in m["roles"])
APPS = sorted(n for n, m in MACHINES.items() if "app" in m["roles"])


def served(client: SteadyClient, since: float = 0.0) -> int:
    """Successful requests of ``client`` sent at or after ``since`` (time.monotonic())."""
    return sum(1 for t, ok, _ in list(client.results) if ok and t >= since)


def test_http_redirects_to_https_except_acme(converged):
    conn = socket.create_connection((vip(), 80), timeout=3)
    conn.sendall(b"GET /pricing?x=1 HTTP/1.1\r\nHost: www.webstack.test\r\nConnection: close\r\n\r\n")
    answer = conn.recv(4096).decode()
    conn.close()
    assert answer.startswith("HTTP/1.1 301")
    assert "Location: https://www.webstack.test/pricing?x=1" in answer
    conn = socket.create_connection((vip(), 80), timeout=3)
    conn.sendall(b"GET /.well-known/acme-challenge/probe HTTP/1.1\r\nHost: www.webstack.test\r\nConnection: close\r\n\r\n")
    assert conn.recv(4096).decode().startswith("HTTP/1.1 404")  # served from the webroot, not redirected
    conn.close()


def test_https_headers_and_cookie_flags(converged):
    status, headers, body = https("/app")
    assert status == 200 and b"served by" in body
    assert headers["strict-transport-security"] == "max-age=63072000; includeSubDomains"
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    cookies = {line.split("=", 1)[0]: line for line in headers["set-cookie"].splitlines()}
    assert set(cookies) == {"session", "__Host-csrf"}
    assert all("; Secure" in c and "; HttpOnly" in c for c in cookies.values()), cookies
    # SameSite as the application set it: the load balancer never weakens Strict to Lax.
    assert "SameSite=Lax" in cookies["session"] and "Max-Age=" in cookies["session"]
    assert "SameSite=Strict" in cookies["__Host-csrf"] and "Lax" not in cookies["__Host-csrf"]
    assert headers["x-served-by"] in APPS


def test_edges_forwarded_for_unknown_host_names_and_the_health_check(converged):
    # X-Forwarded-For is the client's address as nginx saw it, not the client's own header.
    status, headers, _ = https("/ping", headers={"X-Forwarded-For": "198.51.100.66"})
    assert status == 200 and headers["x-client-address"] == "10.77.0.1"
    # A host name the site does not serve: the connection is closed without an answer, on both ports.
    with pytest.raises(http.client.RemoteDisconnected):
        https("/app", headers={"Host": "elsewhere.test"})
    conn = socket.create_connection((vip(), 80), timeout=3)
    conn.sendall(b"GET / HTTP/1.1\r\nHost: elsewhere.test\r\nConnection: close\r\n\r\n")
    assert conn.recv(4096) == b""
    conn.close()
    # The application's health check (a database query) answers the admin network only.
    assert https("/healthz")[0] == 200
    def status_from_spare1(path: str) -> str:
        probe = (f"import http.client, ssl; c = http.client.HTTPSConnection('{vip()}', 443, "
                 "context=ssl._create_unverified_context(), timeout=5); "
                 f"c.request('GET', '{path}', headers={{'Host': 'www.webstack.test'}}); print(c.getresponse().status)")
        return host("spare1").check_output(f"python3 -c \"{probe}\"")

    assert status_from_spare1("/healthz") == "403"
    assert status_from_spare1("/app") == "200"


def test_marketing_site_from_the_load_balancers(converged):
    for path, title in (("/", b"Example Co."), ("/pricing", b"Pricing")):
        status, headers, body = https(path)
        assert status == 200 and title in body and "x-served-by" not in headers
        assert "strict-transport-security" in headers


def _handshake(version: ssl.TLSVersion, address: str, port: int = 443) -> str:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(CA_FILE))
    context.check_hostname = False
    context.minimum_version = context.maximum_version = version
    context.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection((address, port), timeout=3) as raw:
        with context.wrap_socket(raw, server_hostname="www.webstack.test") as tls:
            return tls.version() or ""


def test_tls_versions(converged, tmp_path):
    # The client can speak TLS 1.0 and 1.1: proven against a local openssl server that allows them.
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-subj", "/CN=www.webstack.test", "-days", "1"], check=True, capture_output=True)
    server = subprocess.Popen(["openssl", "s_server", "-accept", "127.0.0.1:44330", "-key", str(key), "-cert", str(cert),
                               "-cipher", "ALL:@SECLEVEL=0", "-tls1", "-naccept", "1", "-quiet"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        # Connect once it listens (a refused connection is retried); that first connection is the test's,
        # as the server accepts only one.
        connected: list[socket.socket] = []

        def connect() -> bool:
            try:
                connected.append(socket.create_connection(("127.0.0.1", 44330), timeout=3))
            except ConnectionRefusedError:
                return False
            return True

        wait_for(connect, 10, "openssl s_server did not listen on 127.0.0.1:44330")
        with connected[0] as raw, ctx.wrap_socket(raw) as tls:
            assert tls.version() == "TLSv1"
    finally:
        server.kill()
    # The load balancers refuse them, and accept 1.2 and 1.3.
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises(ssl.SSLError):
            _handshake(old, vip())
    assert _handshake(ssl.TLSVersion.TLSv1_2, vip()) == "TLSv1.2"
    assert _handshake(ssl.TLSVersion.TLSv1_3, vip()) == "TLSv1.3"


def test_http2_offered(converged):
    context = ssl.create_default_context(cafile=str(CA_FILE))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection((vip(), 443), timeout=3) as raw:
        with context.wrap_socket(raw, server_hostname="www.webstack.test") as tls:
            assert tls.selected_alpn_protocol() == "h2"


def test_both_app_servers_answer_and_signup_writes(converged):
    with SteadyClient(interval=0.02, limit=10) as client:
        # At least 50 answers (the failures below need a sample), from every app server.
        wait_for(lambda: served(client) >= 50 and client.served_by() == set(APPS), 8,
                 f"not 50 answers from every app server ({APPS}) through the VIP")
    assert not client.failures()
    assert client.served_by() == set(APPS)
    email = f"t{int(time.time())}@example.com"
    # A POST without the form's CSRF token is refused; a browser's (the form loaded first) goes through.
    assert https("/signup", method="POST", body=f"email={email}")[0] == 403
    status, headers, body = SignupForm().post(email)
    assert status == 201 and b"Signed up as #" in body
    primary = host("db1")
    assert primary.check_output(f"runuser -u postgres -- psql -XAt -d app -c \"select served_by from signups "
                                f"where email = '{email}'\"") == headers["x-served-by"]


def test_killing_an_app_server_fails_no_request(converged):
    victim = host(APPS[0])
    with SteadyClient(interval=0.02, limit=60) as client:
        time.sleep(1)
        victim.run("systemctl kill -s KILL webapp")
        time.sleep(3)
        victim.run("systemctl start webapp")
        time.sleep(2)
    assert len(client.results) > 100
    assert client.failures() == []


def test_rollout_and_rollback_under_load(converged, tmp_path):
    v2 = tmp_path / "demoapp-v2"
    shutil.copytree(ROOT / "examples" / "demoapp", v2)
    with open(v2 / "app.py", "a") as f:
        f.write("\n# version 2 of the demo app\n")
    inv = inventory_copy(tmp_path, f"app__source: {v2}\n")
    before = https("/healthz")[1]["x-release"]
    with SteadyClient(interval=0.02, limit=240) as client:
        out = run(str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollout.py", "--limit", "web").output
        new = https("/healthz")[1]["x-release"]
        back = run(str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollback.py", "--limit", "web").output
    assert f"Drain {APPS[0]} (release)" in out and "Graceful reload" in out
    assert new != before
    assert f"Switch current -> {before}" in back
    assert https("/healthz")[1]["x-release"] == before
    assert len(client.results) > 100
    assert client.failures() == []


def test_bad_release_stops_at_the_first_server(converged, tmp_path):
    """A release that answers 500 everywhere (its health check included) is rolled out under load:
    app1 fails its health check and stays drained with it, app2 is not touched and keeps serving the
    old release, no request fails, the run exits non-zero saying how to roll back; a rerun stops
    the same way; the printed rollback puts app1 back in rotation."""
    bad = tmp_path / "demoapp-bad"
    shutil.copytree(ROOT / "examples" / "demoapp", bad)
    app = (bad / "app.py").read_text()
    assert '    if path == "/healthz":\n' in app
    (bad / "app.py").write_text(app.replace('    if path == "/healthz":\n', (
        '    if path:  # a broken release\n'
        '        start_response("500 Internal Server Error", [("Content-Type", "text/plain")])\n'
        '        return [b"broken\\n"]\n'
        '    if path == "/healthz":\n'), 1))
    inv = inventory_copy(tmp_path, f"app__source: {bad}\napp__health_timeout: 8\n")
    before = {a: release_of(a) for a in APPS}
    assert len(set(before.values())) == 1
    with SteadyClient(interval=0.02, limit=600) as client:
        first = run(str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollout.py", "--limit", "web", check=False)
        again = run(str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollout.py", "--limit", "web", check=False)
    for result in (first, again):
        assert result.returncode != 0
        assert f"{APPS[0]} is not healthy with release" in result.output
        assert f"deploys/rollback.py --limit {APPS[0]} {' '.join(f'--limit {lb}' for lb in LBS)} " \
               f"--data release={before[APPS[0]]}" in result.output
    assert f"Drain {APPS[0]} (unhealthy)" in again.output  # the rerun knows app1 is out
    assert release_of(APPS[0]) != before[APPS[0]] and release_of(APPS[1]) == before[APPS[1]]
    assert all(drained_on(lb, APPS[0]) and not drained_on(lb, APPS[1]) for lb in LBS)
    assert len(client.results) > 100 and client.failures() == []
    assert {https("/healthz")[1]["x-served-by"] for _ in range(6)} == {APPS[1]}
    # The way back the run printed.
    back = run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/rollback.py", "--limit", APPS[0],
               *[x for lb in LBS for x in ("--limit", lb)], "--data", f"release={before[APPS[0]]}")
    assert f"Put {APPS[0]} back" in back.output
    assert {a: release_of(a) for a in APPS} == before
    assert not any(drained_on(lb, a) for lb in LBS for a in APPS)
    assert host(APPS[0]).run("test -e /srv/webapp/unverified").rc != 0


def test_database_down_during_a_rollout_stops_it_at_the_first_server(converged, tmp_path):
    """The primary database stops as the rollout starts (its pre-rollout hook stops it), under load on
    a page without database work. With a migration to run (the lab's app__migrate_command), the
    migration fails and no server is switched or drained. Without one, app1's health check (it
    queries the database) fails with the new release: app1 stays drained, app2 is not touched. No
    request fails either way. With the database back, the rollout finishes, and a rollback returns
    both servers to the release they had."""
    v3 = tmp_path / "demoapp-v3"
    shutil.copytree(ROOT / "examples" / "demoapp", v3)
    with open(v3 / "app.py", "a") as f:
        f.write("\n# version 3 of the demo app\n")
    db = yaml.safe_load((ROOT / "inventories" / "lab" / "group_data" / "pg_main.yml").read_text())["postgres__primary"]
    unit = "postgresql@17-main"  # cluster main runs on Debian 13
    stop = f"{BIN / 'python'} -m lab exec {db} -- sudo systemctl stop {unit}"
    hook = f"app__pre_rollout_hook: \"{stop}\"\n"
    inv = inventory_copy(tmp_path, f"app__source: {v3}\napp__health_timeout: 8\n{hook}")
    app_yml = inv.parent / "lab" / "group_data" / "app.yml"
    before = {a: release_of(a) for a in APPS}
    try:
        with SteadyClient(path="/ping", interval=0.05, limit=300) as client:
            migrating = run(str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollout.py", "--limit", "web", check=False)
            assert migrating.returncode != 0 and "no server was switched" in migrating.output, migrating.output[-3000:]
            assert {a: release_of(a) for a in APPS} == before
            assert not any(drained_on(lb, a) for lb in LBS for a in APPS)
            host(db).run(f"systemctl start {unit}")
            app_yml.write_text(re.sub(r"(?m)^app__migrate_command:.*$", 'app__migrate_command: ""', app_yml.read_text()))
            first = run(str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollout.py", "--limit", "web", check=False)
        assert first.returncode != 0 and f"{APPS[0]} is not healthy with release" in first.output, first.output[-3000:]
        assert release_of(APPS[0]) != before[APPS[0]] and release_of(APPS[1]) == before[APPS[1]]
        assert all(drained_on(lb, APPS[0]) and not drained_on(lb, APPS[1]) for lb in LBS)
        assert len(client.results) > 50 and client.failures() == []
    finally:
        host(db).run(f"systemctl start {unit}")
    app_yml.write_text(app_yml.read_text().replace(hook, ""))
    done = run(str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollout.py", "--limit", "web")
    assert f"Put {APPS[0]} back" in done.output or not any(drained_on(lb, APPS[0]) for lb in LBS)
    assert release_of(APPS[0]) == release_of(APPS[1]) != before[APPS[0]]
    run(str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollback.py", "--limit", "web")
    assert {a: release_of(a) for a in APPS} == before
    assert not any(drained_on(lb, a) for lb in LBS for a in APPS)


def test_power_off_active_lb_moves_the_vip(converged):
    holder = vip_holder(LBS)
    assert holder == "lb1"  # the higher priority
    others = [n for n in LBS if n != holder]
    with SteadyClient(interval=0.05, limit=120, timeout=1.0) as client:
        # The outage is measured from the last success before the power-off: wait for one.
        wait_for(lambda: served(client) >= 20, 10, "the client got no answers before the power-off")
        lab("poweroff", holder)
        wait_for(lambda: vip_holder(others) is not None, 15, f"the VIP did not move to {others}")
        moved = time.monotonic()
        wait_for(lambda: served(client, moved) >= 20, 10, "no answers through the other load balancer")
        lab("start", holder)  # returns once its SSH answers, so vip_holder(LBS) can ask it again
        wait_for(lambda: vip_holder(LBS) == "lb1", 30, "the VIP did not come back to lb1")
        back = time.monotonic()
        wait_for(lambda: served(client, back) >= 20, 10, "no answers once the VIP came back to lb1")
    assert vip_holder(LBS) == "lb1"  # preempts back once healthy
    outage = client.longest_outage()
    assert 0 < outage < 5, f"outage {outage:.2f}s"
    assert client.results[-1][1]


def test_clean_stop_costs_at_most_a_second(converged):
    holder = vip_holder(LBS)
    try:
        with SteadyClient(interval=0.02, limit=60, timeout=0.3) as client:
            # The outage is measured from the last success before the stop: wait for one.
            wait_for(lambda: served(client) >= 20, 10, "the client got no answers before the stop")
            host(holder).run("systemctl stop keepalived")
            wait_for(lambda: vip_holder(LBS) not in (holder, None), 10, f"the VIP did not leave {holder}")
            moved = time.monotonic()
            wait_for(lambda: served(client, moved) >= 20, 10, "no answers once the VIP moved")
        assert vip_holder(LBS) not in (holder, None)
        assert client.longest_outage() <= 1.0, f"outage {client.longest_outage():.2f}s"
        assert client.results[-1][1]
    finally:
        host(holder).run("systemctl start keepalived")
    deadline = time.monotonic() + 15
    while vip_holder(LBS) != holder:  # preempts back once its check passes
        assert time.monotonic() < deadline, "the VIP did not come back to the preferred load balancer"
        time.sleep(0.5)


def test_a_request_in_flight_when_the_vip_moves_is_answered(converged):
    """The fault: a sign-up accepted by the VIP holder, its answer still being made (both application
    servers paused), when the VIP moves: the holder's keepalived stopped, then started (the VIP comes
    back by preemption, so the peer loses it). Each time the answer still reaches the client, from
    the load balancer that lost the VIP and keeps it as a route on lo for the drain; without that,
    the kernel could not send from the address and the client waited out its timeout."""
    holder = vip_holder(LBS)
    assert holder == "lb1"
    peer = next(n for n in LBS if n != holder)
    address = vip()
    drain_route, drain_table = f"local {address} dev lo", "table inet webstack_vip_drain"
    state = "ip route show table local; nft list tables"

    def signal_app(sig: str) -> str:  # the gunicorn master and its workers
        return f"main=$(systemctl show -P MainPID webapp) && kill -{sig} $main && pkill -{sig} -P $main"

    def in_flight(via: str, move: Callable[[], None], moved_to: str) -> None:
        form = SignupForm(timeout=25)
        form.load()
        email = f"inflight-{uuid.uuid4().hex[:8]}@customer.test"
        with ThreadPoolExecutor(1) as pool:
            for name in APPS:
                host(name).check_output(signal_app("STOP"))
            try:
                started = time.monotonic()
                answer = pool.submit(form.post, email)
                wait_for(lambda: host(via).run(f"ss -Htn state established src {address}:443 | grep -q .").rc == 0,
                         5, f"the sign-up never reached {via}")
                time.sleep(0.5)  # its request sent and acknowledged: now waiting for the answer
                move()
                wait_for(lambda: vip_holder(LBS) == moved_to, 15, f"the VIP did not move to {moved_to}")
                draining = host(via).check_output(state)
                # A new connection to the VIP on the draining host is dropped (from itself: the one path
                # to it that does not depend on which host the bridge's ARP names).
                fresh = host(via).run(f"timeout 2 bash -c ': </dev/tcp/{address}/443'")
            finally:
                for name in APPS:
                    host(name).run(signal_app("CONT"))
            status, _, _ = answer.result(timeout=30)
        took = time.monotonic() - started
        assert status == 201 and took < 10, f"HTTP {status} after {took:.1f} s (moved from {via} to {moved_to})"
        # The route drains what was accepted; the drain's table drops new connections there meanwhile;
        # the new holder has neither (its notify removes what a drain of its own left).
        assert drain_route in draining and drain_table in draining, draining
        assert fresh.rc != 0, "a new connection to the VIP was accepted by the load balancer that lost it"
        wait_for(lambda: not any(piece in host(moved_to).check_output(state) for piece in (drain_route, drain_table)),
                 5, f"{moved_to} holds the VIP and still drains it")
        assert email in host("db1").check_output(
            f"runuser -u postgres -- psql -XAt -d app -c \"select email from signups where email = '{email}'\"")

    try:
        in_flight(holder, lambda: host(holder).check_output("systemctl stop keepalived"), peer)
        in_flight(peer, lambda: host(holder).check_output("systemctl start keepalived"), holder)
    finally:
        host(holder).run("systemctl start keepalived")
    wait_for(lambda: vip_holder(LBS) == holder, 15, "the VIP did not come back to the preferred load balancer")


def test_check_deploy_flags_an_expiring_certificate(converged, tmp_path):
    assert run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/check.py", "--limit", "lb").returncode == 0
    inv = inventory_copy(tmp_path)
    with open(inv.parent / "lab" / "group_data" / "lb.yml", "a") as f:
        f.write("lb__cert_warning_days: 1000\n")
    result = run(str(BIN / "pyinfra"), "-y", str(inv), "deploys/check.py", "--limit", "lb", check=False)
    assert result.returncode != 0 and "certificate expires in" in result.output


def _served(address: str, cafile: str) -> x509.Certificate:
    """The certificate a load balancer serves for the site's name, verified against ``cafile``."""
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection((address, 443), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="www.webstack.test") as conn:
        return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))


@pytest.fixture
def pebble(tmp_path):
    """Debian's pebble on the control machine's loopback, validating for real: its DNS is
    pebble-challtestsrv answering every name with the VIP, so HTTP-01 goes to the pair."""
    from webstack import tls

    ca_key, ca_cert = tls.make_ca("pebble API CA")
    key, chain = tls.issue(ca_key, ca_cert, ["localhost"], ["127.0.0.1"])
    for name, text in (("ca.crt", ca_cert), ("key.pem", key), ("cert.pem", chain)):
        (tmp_path / name).write_text(text)
    (tmp_path / "pebble.json").write_text(json.dumps({"pebble": {
        "listenAddress": "127.0.0.1:14000", "managementListenAddress": "127.0.0.1:15000",
        "certificate": str(tmp_path / "cert.pem"), "privateKey": str(tmp_path / "key.pem"),
        "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
    dns = subprocess.Popen(["pebble-challtestsrv", "-defaultIPv4", vip(), "-defaultIPv6", "", "-dns01", "127.0.0.1:8053",
                            "-http01", "", "-https01", "", "-tlsalpn01", "", "-management", "127.0.0.1:8055"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ca = subprocess.Popen(["pebble", "-config", str(tmp_path / "pebble.json"), "-dnsserver", "127.0.0.1:8053"],
                          env={**os.environ, "PEBBLE_VA_NOSLEEP": "1"},
                          stdout=open(tmp_path / "pebble.log", "w"), stderr=subprocess.STDOUT)
    try:
        for port, what in ((8055, "pebble-challtestsrv"), (14000, "pebble")):
            wait_for(lambda port=port: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 20, f"{what} listening")
        root = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        with urllib.request.urlopen("https://127.0.0.1:15000/roots/0", context=root, timeout=10) as resp:
            issuing_root = resp.read().decode()
        (tmp_path / "trust.pem").write_text(CA_FILE.read_text() + issuing_root)
        yield {"ca": str(tmp_path / "ca.crt"), "trust": str(tmp_path / "trust.pem"), "log": tmp_path / "pebble.log"}
    finally:
        for proc in (ca, dns):
            proc.terminate()
            proc.wait()


def test_acme_certificate_through_the_pair_served_by_both_renewed_without_a_dropped_request(converged, tmp_path, pebble):
    """webstack certificate against a real ACME server: HTTP-01 answered through the VIP (the token
    on both load balancers), one certificate served by both, nothing done when not due, and a
    renewal pushed under load with a graceful reload. The lab's own certificate is put back after."""
    inv = inventory_copy(tmp_path)
    inv_dir = inv.parent / "lab"
    shutil.copy(pebble["ca"], inv_dir / "acme-ca.crt")
    with open(inv_dir / "group_data" / "lb.yml", "a") as f:
        f.write("lb__acme_directory: https://127.0.0.1:14000/dir\nlb__acme_ca_file: acme-ca.crt\n"
                "lb__acme_email: ops@webstack.test\n")
    webstack = str(BIN / "webstack")
    lbs = [MACHINES[n]["address"] for n in MACHINES if "lb" in MACHINES[n]["roles"]]
    try:
        first = run(webstack, "certificate", str(inv_dir), "--force", check=False)
        assert first.returncode == 0, first.output[-3000:]
        assert "ordering www.webstack.test" in first.output
        served = [_served(a, pebble["trust"]) for a in lbs]
        assert len({c.serial_number for c in served}) == 1  # one certificate on both
        assert "Pebble" in served[0].issuer.rfc4514_string()
        # Validated for real: pebble fetched the token through the VIP from the holder's nginx.
        holder = host(vip_holder(["lb1", "lb2"]))
        assert "acme-challenge" in holder.check_output("grep -h 'GET /.well-known/acme-challenge/' "
                                                        "/var/log/nginx/access.log | tail -n 2")
        for name in ("lb1", "lb2"):
            assert host(name).check_output("ls /var/www/acme/.well-known/acme-challenge | wc -l") == "0"

        secrets_file = inv_dir / "secrets.age"
        before = secrets_file.read_bytes()
        again = run(webstack, "certificate", str(inv_dir))
        assert "nothing to do" in again.output and secrets_file.read_bytes() == before

        with SteadyClient(interval=0.05, cafile=pebble["trust"]) as client:
            renewed = run(webstack, "certificate", str(inv_dir), "--renew-days", "3650", check=False)
            time.sleep(1)
        assert renewed.returncode == 0 and "within 3650 days" in renewed.output, renewed.output[-3000:]
        fresh = [_served(a, pebble["trust"]) for a in lbs]
        assert len({c.serial_number for c in fresh}) == 1 and fresh[0].serial_number != served[0].serial_number
        failures = [r for r in client.results if not r[1]]
        assert len(client.results) > 20 and failures == [], failures[:5]
        print(f"renewal: {len(client.results)} requests during it, none failed")
    finally:
        run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/site.py", "--limit", "lb")
    assert _served(lbs[0], str(CA_FILE)).issuer.rfc4514_string().endswith("webstack lab CA")


def test_site_still_changes_nothing(converged):
    assert run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/site.py").totals()["changed"] == "-"

"""Web-tier benchmark: HTTPS vs plain HTTP throughput, and VIP outage on failover.

    .venv/bin/python bench/web.py [--seconds 15] [--connections 16] [--trials 10] [--moves N [--away S]]
                                  [--soak MINUTES] [--no-throughput] [--events poweroff,clean_stop]

Needs a converged lab (`make demo`) and `wrk` on the control machine
(installed from Debian if missing).

1. Requests/s through the VIP on the same small proxied page (/ping, no
   database) with keepalive: HTTPS on 443 versus plain HTTP. Plain HTTP only
   exists for this measurement: a temporary nginx server on port 8080 of the
   VIP holder proxies to the same upstream, opened in its firewall for the
   control machine, and both are removed afterwards.
2. VIP outage, TRIALS times each: power-off of the active load balancer, and
   a clean `systemctl stop keepalived` on it. A client requests /ping every
   20 ms (0.3 s timeout); the outage is the time between the last answer
   before the event and the first answer after it.
3. With ``--moves N``: planned VIP moves under load, N times: the holder's
   keepalived is stopped (the VIP moves to the peer), started again ``--away``
   seconds later (the VIP comes back by preemption), while a client signs up
   every 0.2 s (30 s timeout) and another loads /app every 50 ms. Counted:
   sign-ups failed, slower than 1 s, the slowest; pages failed. A request in
   flight on the load balancer that loses the VIP is what this measures (its
   answer is sent from the VIP's drain route, lb-notify).
4. With ``--soak MINUTES``: false takeovers on the loaded lab. For that long,
   wrk keeps 16 connections busy on /app (a database read each) while a client
   signs up every 0.2 s; every VRRP transition either load balancer logs meanwhile
   (keepalived's notify lines) is a false takeover, since nothing failed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.probe import CA_FILE, MACHINES, SignupClient, SteadyClient, host, vip, vip_holder  # noqa: E402

BIN = Path(sys.executable).parent
LBS = sorted(n for n, m in MACHINES.items() if "lb" in m["roles"])
PLAIN = """server {
    listen 8080;
    location / {
        proxy_pass http://app;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
    }
}
"""


def wrk(url: str, seconds: int, connections: int) -> float:
    out = subprocess.run(["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "-H",
                          "Host: www.webstack.test", url], capture_output=True, text=True, check=True).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        sys.exit(f"wrk saw {errors.group(1)} failed responses:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def throughput(seconds: int, connections: int) -> dict[str, float]:
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)
    holder = vip_holder(LBS)
    lb = host(holder)
    lb.run(f"cat > /etc/nginx/conf.d/zz-bench-plain.conf <<'EOF'\n{PLAIN}EOF\nnginx -t -q && systemctl reload nginx")
    lb.run("nft insert rule inet webstack input ip saddr 10.77.0.1 tcp dport 8080 accept comment bench-temporary")
    try:
        time.sleep(1)
        wrk(f"https://{vip()}/ping", 3, connections)  # warm up (TLS session cache, upstream keepalive)
        https_rps = wrk(f"https://{vip()}/ping", seconds, connections)
        http_rps = wrk(f"http://{vip()}:8080/ping", seconds, connections)
    finally:
        lb.run("rm -f /etc/nginx/conf.d/zz-bench-plain.conf && nginx -t -q && systemctl reload nginx")
        lb.run("nft -f /etc/nftables.conf")  # the managed ruleset, without the temporary rule
    return {"https_rps": https_rps, "http_rps": http_rps, "ratio": https_rps / http_rps}


def outage(event: str) -> float:
    holder = vip_holder(LBS)
    with SteadyClient(path="/ping", interval=0.02, limit=60, timeout=0.3) as client:
        time.sleep(1)
        if event == "poweroff":
            subprocess.run([str(BIN / "python"), "-m", "lab", "poweroff", holder], cwd=ROOT, check=True,
                           capture_output=True)
        else:
            host(holder).run("systemctl stop keepalived")
        time.sleep(5)
    if event == "poweroff":
        subprocess.run([str(BIN / "python"), "-m", "lab", "start", holder], cwd=ROOT, check=True, capture_output=True)
    else:
        host(holder).run("systemctl start keepalived")
    deadline = time.monotonic() + 60
    while vip_holder(LBS) != holder:
        if time.monotonic() > deadline:
            sys.exit(f"the VIP did not return to {holder}")
        time.sleep(0.5)
    time.sleep(3)
    if not client.results[-1][1]:
        sys.exit(f"{event}: the client did not recover")
    return client.longest_outage()


def moves(count: int, away: float) -> dict:
    """Planned VIP moves (keepalived stopped on the holder, started ``away`` s later) under sign-ups."""
    holder = vip_holder(LBS)
    peer = next(n for n in LBS if n != holder)

    def wait_holder(name: str) -> None:
        deadline = time.monotonic() + 30
        while vip_holder(LBS) != name:
            if time.monotonic() > deadline:
                sys.exit(f"the VIP did not move to {name}")
            time.sleep(0.2)

    limit = count * (away + 20) + 30
    with SteadyClient(interval=0.05, limit=limit, timeout=5.0, retry_reset=True) as pages, \
            SignupClient(limit=limit) as signups:
        time.sleep(2)
        for n in range(count):
            host(holder).run("systemctl stop keepalived")
            wait_holder(peer)
            time.sleep(away)
            host(holder).run("systemctl start keepalived")
            wait_holder(holder)
            time.sleep(3)
            print(f"  move {n + 1}: {len(signups.results)} sign-ups so far, {len(signups.failures())} failed", flush=True)
    latencies = sorted(r[1] for r in signups.results)
    return {"moves": count, "away_s": away, "signups": len(latencies), "signups_failed": len(signups.failures()),
            "signups_over_1s": sum(1 for x in latencies if x > 1.0), "slowest_s": latencies[-1],
            "pages": len(pages.results), "pages_failed": len(pages.failures()), "pages_resent": pages.resets,
            "slow": signups.explain(1.0).splitlines()}


def soak(minutes: float) -> dict:
    """VRRP transitions logged by the load balancers during ``minutes`` of load (none should happen)."""
    since = {lb: host(lb).check_output("date +%s.%N") for lb in LBS}
    holder = vip_holder(LBS)
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)
    load = subprocess.Popen(["wrk", "-t", "2", "-c", "16", "-d", f"{int(minutes * 60)}s", "-H",
                             "Host: www.webstack.test", f"https://{vip()}/app"], stdout=subprocess.PIPE, text=True)
    with SignupClient(limit=minutes * 60 + 30) as signups:
        load.wait()
    transitions = {lb: [line for line in host(lb).check_output(
        f"journalctl -q -o cat -t webstack-vrrp --since @{since[lb]}").splitlines() if line] for lb in LBS}
    summary = load.stdout.read() if load.stdout else ""
    rps = re.search(r"Requests/sec:\s*([\d.]+)", summary)
    return {"minutes": minutes, "holder": holder, "holder_after": vip_holder(LBS), "transitions": transitions,
            "false_takeovers": sum(len(v) for v in transitions.values()),
            "app_rps": float(rps.group(1)) if rps else 0.0,
            "signups": len(signups.results), "signups_failed": len(signups.failures())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--moves", type=int, default=0, help="planned VIP moves (out and back) under sign-ups")
    parser.add_argument("--away", type=float, default=8, help="seconds the VIP stays on the peer at each move")
    parser.add_argument("--soak", type=float, default=0, help="minutes of load counting false takeovers")
    parser.add_argument("--no-throughput", action="store_true", help="skip the HTTPS/HTTP throughput part")
    parser.add_argument("--events", default="poweroff,clean_stop", help="VIP outage events to measure")
    args = parser.parse_args()
    if not CA_FILE.exists():
        sys.exit("no lab CA: run `make demo` first")
    rps: dict = {}
    if not args.no_throughput:
        rps = throughput(args.seconds, args.connections)
        print(f"/ping through the VIP, {args.connections} keepalive connections, {args.seconds} s: "
              f"HTTPS {rps['https_rps']:.0f} req/s, plain HTTP {rps['http_rps']:.0f} req/s, "
              f"ratio {rps['ratio']:.2f}", flush=True)
    if args.moves:
        m = rps["moves"] = moves(args.moves, args.away)
        print(f"{m['moves']} planned VIP moves out and back ({m['away_s']:g} s away each): {m['signups']} sign-ups, "
              f"{m['signups_failed']} failed, {m['signups_over_1s']} over 1 s, slowest {m['slowest_s']:.2f} s; "
              f"{m['pages']} pages, {m['pages_failed']} failed, {m['pages_resent']} sent again after a reset",
              flush=True)
        for line in m["slow"]:
            print(f"  {line}")
    if args.soak:
        rps["soak"] = soak(args.soak)
        s = rps["soak"]
        print(f"soak {args.soak:g} min under load ({s['app_rps']:.0f} req/s on /app, {s['signups']} sign-ups, "
              f"{s['signups_failed']} failed): {s['false_takeovers']} VRRP transitions "
              f"(VIP on {s['holder']} before, {s['holder_after']} after)", flush=True)
        for lb, lines in s["transitions"].items():
            for line in lines:
                print(f"  {lb}: {line}")
    outages: dict[str, list[float]] = {e: [] for e in args.events.split(",") if e}
    for event in outages:
        for n in range(args.trials):
            outages[event].append(outage(event))
            print(f"  {event} trial {n + 1}: {outages[event][-1]:.2f} s", flush=True)
    print(f"\n{'event':<12}{'trials':>7}{'median s':>10}{'max s':>8}")
    for event, values in outages.items():
        if values:
            print(f"{event:<12}{len(values):>7}{statistics.median(values):>10.2f}{max(values):>8.2f}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"web-{stamp}.json").write_text(json.dumps({**rps, **outages}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Database-tier benchmark: replay lag under load, failover time, writes lost async vs sync.

    .venv/bin/python bench/database.py [--cluster main] [--trials 10] [--rate 200] [--seconds 60]

Needs a converged lab (`make demo`). Works on a copy of the lab inventory, so
the committed inventory is never rewritten; every failover is undone (rejoin,
switchover back) before the next trial. Prints a table and writes
bench/results/database-<utc>.json.

1. lag: `pgbench -R RATE` (rate-limited TPC-B-like load) on the primary for
   SECONDS; pg_stat_replication.replay_lag of the replica sampled every 100 ms.
2. failover: a steady writer on app1 inserts into the primary only and records
   each acknowledged id; the primary is powered off (no clean shutdown); the
   clock runs from the failover command to the first successful INSERT on the
   promoted replica (probed every 0.2 s while the command runs); then
   acknowledged ids missing on the new primary are
   counted. TRIALS times with asynchronous replication, TRIALS times with
   synchronous_commit = remote_apply.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.probe import PGPASS, Writer, conninfo, host  # noqa: E402
from webstack.inventory import load  # noqa: E402

BIN = Path(sys.executable).parent


def sh(*args: str) -> str:
    proc = subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def deploy(inv: Path, name: str, *args: str) -> str:
    return sh(str(BIN / "pyinfra"), "-y", str(inv), f"deploys/{name}.py", *args)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure_lag(primary: str, replica: str, rate: int, seconds: int) -> list[float]:
    db = host(primary)
    version = db.check_output("ls /etc/postgresql")
    pgbench = f"/usr/lib/postgresql/{version}/bin/pgbench"
    db.run(f"runuser -u postgres -- {pgbench} -q -i -s 5 app >/dev/null 2>&1")
    db.run(f"systemd-run --unit=bench-pgbench --collect runuser -u postgres -- {pgbench} -n -c 4 -R {rate} "
           f"-T {seconds} app")
    samples = []
    end = time.monotonic() + seconds
    time.sleep(2)
    while time.monotonic() < end - 1:
        out = db.check_output(
            "runuser -u postgres -- psql -XAtc \"select coalesce(extract(epoch from replay_lag), 0) "
            f"from pg_stat_replication where application_name = '{replica}'\"")
        if out:
            samples.append(float(out) * 1000)
        time.sleep(0.1)
    time.sleep(2)
    return samples


def failover_trial(inv: Path, group: str, primary: str, replica: str, tag: str) -> tuple[float, int, int]:
    app1 = host("app1")
    writer = Writer(app1, (primary,), tag)
    deadline = time.monotonic() + 30
    while writer.acked_count() < 50:
        if time.monotonic() > deadline:
            sys.exit("writer did not start")
        time.sleep(0.2)
    sh(str(BIN / "python"), "-m", "lab", "poweroff", primary)
    acked = writer.stop()
    # The clock starts with the failover command. A loop on app1 tries an INSERT on the
    # replica every 50 ms meanwhile and stamps the first that succeeds with app1's clock
    # (lab machines share the control machine's kernel clock), so the figure is when writes
    # work again, not when the command (which goes on configuring) returns, and not blurred
    # by an SSH round trip per attempt.
    stamp = f"/root/first-write-{tag}"
    info = conninfo(replica, connect_timeout="1")
    app1.run(f"rm -f {stamp}; systemd-run --unit=first-write-{tag} --collect sh -c "
             f"'until PGPASSFILE={PGPASS} psql \"{info}\" -XAtqc \"insert into writes_{tag} (id) values (-1)\" "
             f"2>/dev/null; do sleep 0.05; done; date +%s.%N > {stamp}'")
    t0 = time.time()
    command = subprocess.Popen([str(BIN / "pyinfra"), "-y", str(inv), "deploys/failover.py", "--limit", replica,
                                "--data", "write_inventory=yes"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    first_write = None
    while first_write is None:
        written = app1.run(f"cat {stamp} 2>/dev/null").stdout.strip()
        if written:
            first_write = float(written) - t0
        elif time.time() - t0 > 120:
            sys.exit("no write succeeded within 120 s of the failover command")
        else:
            time.sleep(0.2)
    if command.wait() != 0:
        sys.exit("the failover command failed")
    lost = len(acked - writer.stored(replica))
    sh(str(BIN / "python"), "-m", "lab", "start", primary)
    deploy(inv, "rejoin", "--limit", group)
    deploy(inv, "switchover", "--limit", group, "--data", f"to={primary}", "--data", "write_inventory=yes")
    return first_write, lost, len(acked)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", default="main")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()
    group = f"pg_{args.cluster}"
    tmp = Path(tempfile.mkdtemp(prefix="webstack-bench-"))
    shutil.copytree(ROOT / "inventories" / "lab", tmp / "lab")
    shutil.copy(ROOT / "inventories" / "lab.py", tmp / "lab.py")
    inv = tmp / "lab.py"
    group_file = tmp / "lab" / "group_data" / f"{group}.yml"
    primary = yaml.safe_load(group_file.read_text())["postgres__primary"]
    fleet = yaml.safe_load((ROOT / "lab" / "fleet.yml").read_text())
    replica = next(m["name"] for m in fleet["machines"] if group in m.get("groups", ()) and m["name"] != primary)
    app1 = host("app1")
    app1.run("DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-client >/dev/null")
    # The probes connect as the application does: its password in a private pgpass file on app1.
    db = next(c for c in load(ROOT / "inventories" / "lab") if "postgres" in c.roles)
    app1.run(f"umask 077; echo '*:5432:app:app:{db.secret('postgres_password_app').unmask()}' > {PGPASS}")

    print(f"cluster {args.cluster}: primary {primary}, replica {replica}", flush=True)
    lag = measure_lag(primary, replica, args.rate, args.seconds)
    print(f"replay lag at {args.rate} tps: p50 {percentile(lag, .5):.1f} ms, p99 {percentile(lag, .99):.1f} ms "
          f"({len(lag)} samples)", flush=True)

    results: dict[str, dict[str, list]] = {}
    original = group_file.read_text()
    for mode in ("async", "sync"):
        group_file.write_text(original + f"\npostgres__synchronous: {'true' if mode == 'sync' else 'false'}\n")
        deploy(inv, "site", "--limit", group)
        runs: dict[str, list] = {"first_write_s": [], "lost": [], "acked": []}
        for n in range(args.trials):
            first, lost, acked = failover_trial(inv, group, primary, replica, f"{mode}{n}")
            runs["first_write_s"].append(first)
            runs["lost"].append(lost)
            runs["acked"].append(acked)
            print(f"  {mode} trial {n + 1}: first write {first:.1f} s after the failover command, "
                  f"lost {lost} of {acked} acknowledged", flush=True)
        results[mode] = runs
    group_file.write_text(original)
    deploy(inv, "site", "--limit", group)

    print(f"\n{'mode':<6}{'failovers':>10}{'first write median s':>22}{'max s':>7}{'lost total':>12}{'lost max':>10}")
    for mode, runs in results.items():
        print(f"{mode:<6}{len(runs['lost']):>10}{statistics.median(runs['first_write_s']):>22.1f}"
              f"{max(runs['first_write_s']):>7.1f}{sum(runs['lost']):>12}{max(runs['lost']):>10}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"database-{stamp}.json").write_text(json.dumps(
        {"cluster": args.cluster, "rate": args.rate, "lag_ms": lag, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

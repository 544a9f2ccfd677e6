"""Failure-mode benchmark: rows acknowledged and lost, and time to a healthy cluster, per fault.

    .venv/bin/python bench/faults.py [--cluster main] [--scenarios partition-async,partition-sync,
                                      killed-old-stopped,killed-promoted]

Needs a converged lab (`make demo`). Works on a copy of the lab inventory (the committed one
is never rewritten) and puts the cluster back (rejoin, switchover to the committed primary)
after each scenario. A writer on app1 inserts ids 1, 2, 3... every 20 ms through the
application's read-write connection string (both members) and records each id whose INSERT
was acknowledged. Per scenario it prints and stores (bench/results/faults-<utc>.json):

- acked: rows acknowledged to the client during the scenario;
- lost: acknowledged rows missing from the primary at the end;
- told: transactions the rejoin reported (and saved) before discarding them (partition);
- stall_s: the longest time without an acknowledged write (sampled every 0.2 s);
- healthy_s: from the fault to a healthy cluster (a primary taking writes, the other member
  streaming from it), the operator's commands run at once as the README documents them.

Scenarios:
- partition-async / partition-sync: the primary is cut off from its replica and the control
  machine, not from app1; failover to the replica 10 s later; the partition heals 10 s after
  that; rejoin (refused while divergent transactions exist), rejoin with
  discard_divergent=yes. In sync mode the cut-off primary can acknowledge nothing.
- killed-old-stopped / killed-promoted: the switchover's control process is killed
  (WEBSTACK_FAULT) after the old primary stopped / right after the promotion; then the
  documented fix: site.py / rejoin.py --data write_inventory=yes.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.probe import PGPASS, Writer, host  # noqa: E402
from webstack.inventory import load  # noqa: E402

BIN = Path(sys.executable).parent


def run(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    proc = subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env} if env else None)
    if check and proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def deploy(inv: Path, name: str, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    out = run(str(BIN / "pyinfra"), "-y", str(inv), f"deploys/{name}.py", *args, check=check, env=env)
    return out.stdout + out.stderr


def lab(*args: str) -> None:
    run(str(BIN / "python"), "-m", "lab", *args)


class Stall:
    """Samples the writer's acknowledged count every 0.2 s; the longest time without progress."""

    def __init__(self, writer: Writer) -> None:
        self.writer, self.longest, self._stop = writer, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last, since = -1, time.monotonic()
        while not self._stop.is_set():
            try:
                count = self.writer.acked_count()
            except Exception:  # an SSH hiccup to app1: sample again
                count = last
            now = time.monotonic()
            if count != last:
                last, since = count, now
            self.longest = max(self.longest, now - since)
            time.sleep(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.longest, 1)


def streaming(name: str) -> bool:
    out = host(name).run("runuser -u postgres -- psql -XAtc 'select status from pg_stat_wal_receiver'")
    return out.stdout.strip() == "streaming"


def wait(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit(f"timed out: {what}")
        time.sleep(0.2)


def partition(inv: Path, group: str, primary: str, replica: str, tag: str) -> dict:
    app1 = host("app1")
    writer = Writer(app1, (primary, replica), tag)
    wait(lambda: writer.acked_count() > 50, 30, "the writer never got going")
    stall = Stall(writer)
    t0 = time.monotonic()
    lab("partition", primary, replica)
    lab("partition", primary, "control")
    try:
        time.sleep(10)
        deploy(inv, "failover", "--limit", replica, "--data", "write_inventory=yes")
        time.sleep(10)
    finally:
        lab("heal")
    wait(lambda: host(primary).run(f"systemctl is-active -q postgresql@{version(primary)}-main").rc != 0, 60,
         "pg-watch did not stop the old primary")
    refused = deploy(inv, "rejoin", "--limit", group, check=False)
    told = re.search(r"(\d+) committed transaction\(s\)", refused)
    if "discard_divergent=yes" in refused:
        deploy(inv, "rejoin", "--limit", group, "--data", "discard_divergent=yes")
    wait(lambda: streaming(primary), 120, "the old primary does not stream")
    healthy = time.monotonic() - t0
    time.sleep(2)
    acked = writer.stop()
    result = {"acked": len(acked), "lost": len(acked - writer.stored(replica)),
              "told": int(told.group(1)) if told else 0, "stall_s": stall.stop(), "healthy_s": round(healthy, 1)}
    deploy(inv, "switchover", "--limit", group, "--data", f"to={primary}", "--data", "write_inventory=yes")
    return result


def killed(inv: Path, group: str, primary: str, replica: str, tag: str, point: str) -> dict:
    app1 = host("app1")
    writer = Writer(app1, (primary, replica), tag)
    wait(lambda: writer.acked_count() > 50, 30, "the writer never got going")
    stall = Stall(writer)
    t0 = time.monotonic()
    out = deploy(inv, "switchover", "--limit", group, check=False, env={"WEBSTACK_FAULT": f"switchover:{point}"})
    if f"killed at switchover:{point}" not in out:
        sys.exit(f"the fault was not injected:\n{out[-2000:]}")
    if point == "old-stopped":
        deploy(inv, "site", "--limit", group)
        now_primary, other = primary, replica
    else:
        deploy(inv, "rejoin", "--limit", group, "--data", "write_inventory=yes")
        now_primary, other = replica, primary
    wait(lambda: streaming(other), 120, f"{other} does not stream")
    healthy = time.monotonic() - t0
    time.sleep(2)
    acked = writer.stop()
    result = {"acked": len(acked), "lost": len(acked - writer.stored(now_primary)), "told": 0,
              "stall_s": stall.stop(), "healthy_s": round(healthy, 1)}
    if now_primary != primary:
        deploy(inv, "switchover", "--limit", group, "--data", f"to={primary}", "--data", "write_inventory=yes")
    return result


def version(name: str) -> str:
    return host(name).check_output("ls /etc/postgresql")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", default="main")
    parser.add_argument("--scenarios", default="partition-async,partition-sync,killed-old-stopped,killed-promoted")
    args = parser.parse_args()
    group = f"pg_{args.cluster}"
    tmp = Path(tempfile.mkdtemp(prefix="webstack-bench-"))
    shutil.copytree(ROOT / "inventories" / "lab", tmp / "lab")
    shutil.copy(ROOT / "inventories" / "lab.py", tmp / "lab.py")
    inv = tmp / "lab.py"
    group_file = tmp / "lab" / "group_data" / f"{group}.yml"
    original = group_file.read_text()
    primary = yaml.safe_load(original)["postgres__primary"]
    fleet = yaml.safe_load((ROOT / "lab" / "fleet.yml").read_text())
    replica = next(m["name"] for m in fleet["machines"] if group in m.get("groups", ()) and m["name"] != primary)
    app1 = host("app1")
    app1.run("DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-client >/dev/null")
    db = next(c for c in load(ROOT / "inventories" / "lab") if "postgres" in c.roles)
    app1.run(f"umask 077; echo '*:5432:app:app:{db.secret('postgres_password_app').unmask()}' > {PGPASS}")

    results = {}
    for n, scenario in enumerate(s for s in args.scenarios.split(",") if s):
        mode = "sync" if scenario.endswith("-sync") else "async"
        group_file.write_text(original.replace(f"postgres__primary: {replica}", f"postgres__primary: {primary}")
                              + f"\npostgres__synchronous: {'true' if mode == 'sync' else 'false'}\n")
        deploy(inv, "site", "--limit", group)
        tag = f"fault{n}"
        if scenario.startswith("partition"):
            results[scenario] = partition(inv, group, primary, replica, tag)
        elif scenario.startswith("killed-"):
            results[scenario] = killed(inv, group, primary, replica, tag, scenario.removeprefix("killed-"))
        else:
            sys.exit(f"unknown scenario {scenario}")
        print(f"{scenario}: {json.dumps(results[scenario])}", flush=True)
    group_file.write_text(original)
    deploy(inv, "site", "--limit", group)

    print(f"\n{'scenario':<22}{'acked':>7}{'lost':>6}{'told':>6}{'stall s':>9}{'healthy s':>11}")
    for scenario, r in results.items():
        print(f"{scenario:<22}{r['acked']:>7}{r['lost']:>6}{r['told']:>6}{r['stall_s']:>9}{r['healthy_s']:>11}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"faults-{stamp}.json").write_text(json.dumps({"cluster": args.cluster, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The monthly patch run on the lab under load (make demo first); a script, not a test.

    .venv/bin/python bench/patch.py [--always-reboot] [--limit GROUP ...]

Runs ``deploys/patch.py`` against inventories/lab while two clients go through the VIP: one
GET /app every 50 ms (pages) and one POST /signup every 200 ms (writes, which wait while a
cluster switches its primary). Prints the run's wall time in total and, per tier, the sum of its
hosts' seconds from the run's JSON report (each host's upgrade, reboot or restarts and health
check; draining, VIP moves and switchovers are in the total only), how many hosts rebooted,
failed pages and sign-ups, the slowest sign-up (the longest write pause), and the acknowledged
sign-ups missing from the database. ``--always-reboot`` reboots every host
(``--data always_reboot=yes``); without it only hosts whose upgrade needs one do. Results are
also written to bench/results/patch-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.probe import SignupClient, SteadyClient, host  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--always-reboot", action="store_true")
    parser.add_argument("--limit", action="append", default=[])
    args = parser.parse_args()
    report = Path("/tmp/webstack-bench-patch.json")
    cmd = [str(ROOT / ".venv/bin/pyinfra"), "-y", "inventories/lab.py", "deploys/patch.py", "--data", f"report={report}"]
    if args.always_reboot:
        cmd += ["--data", "always_reboot=yes"]
    for group in args.limit:
        cmd += ["--limit", group]
    with SteadyClient(interval=0.05, limit=7200, timeout=10.0) as pages, SignupClient(limit=7200) as signups:
        time.sleep(2)
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        total = time.monotonic() - started
        time.sleep(2)
    if proc.returncode != 0:
        print(proc.stdout[-5000:] + proc.stderr[-3000:])
        print(f"patch run failed (exit {proc.returncode})")
    rows = json.loads(report.read_text())
    tiers: dict[str, dict[str, float]] = {}
    for r in rows:
        t = tiers.setdefault(r["tier"], {"hosts": 0, "host_seconds": 0.0, "rebooted": 0})
        t["hosts"] += 1
        t["host_seconds"] = round(t["host_seconds"] + r["seconds"], 1)
        t["rebooted"] += int(r["rebooted"])
    emails = host("db1").check_output(
        "runuser -u postgres -- psql -XAt -d app -c "
        f"\"select email from signups where email like '{signups.tag}-%'\"").splitlines()
    slowest = max((r[1] for r in signups.results), default=0.0)
    # When each failure happened (UTC), and the host whose own patching window held it ("between
    # hosts": a drain, a VIP move or a switchover, which the hosts' windows do not cover).
    wall = time.time() - time.monotonic()
    windows = [(datetime.fromisoformat(r["finished"]).timestamp() - r["seconds"],
                datetime.fromisoformat(r["finished"]).timestamp(), r["host"]) for r in rows if r.get("finished")]

    def when(t: float) -> str:
        at = t + wall
        where = next((h for a, b, h in windows if a <= at <= b), "between hosts")
        return f"{datetime.fromtimestamp(at, UTC):%H:%M:%S.%f}"[:-3] + f" ({where})"

    failures = [f"page {when(t)}: {detail}" for t, _ok, detail in pages.failures()]
    failures += [f"sign-up {when(t)} after {secs:.2f} s: {signups.errors.get(email, '?')}"
                 for t, secs, _ok, email in signups.failures()]
    result = {
        "command": " ".join(cmd[1:]),
        "exit": proc.returncode,
        "total_s": round(total, 1),
        "tiers": tiers,
        "hosts": {r["host"]: {k: r[k] for k in ("tier", "seconds", "rebooted", "health")} | {"upgraded": len(r["upgraded"])}
                  for r in rows},
        "pages": len(pages.results), "pages_failed": len(pages.failures()),
        "signups": len(signups.results), "signups_failed": len(signups.failures()),
        "slowest_signup_s": round(slowest, 2),
        "acknowledged_missing": len(signups.acknowledged() - set(emails)),
        "failures": failures,
    }
    print(json.dumps(result, indent=2))
    report.write("patch", result)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

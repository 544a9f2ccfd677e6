"""Foundation benchmark: lab boot, cold site deploy, no-change rerun.

    .venv/bin/python bench/run.py [--rounds N] [--reruns M]

Each round: `lab down`, then times `lab up` (9 machines from the cached base
images), the cold deploy of fresh servers (`webstack onboard`, which runs
deploys/site.py as root on every fresh host: packages, users, sshd, firewall),
and M no-change reruns of `pyinfra inventories/lab.py deploys/site.py` as the
admin user. Prints a table and writes bench/results/foundation-<utc>.json.
This destroys and rebuilds the lab: do not run it beside the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def timed(*args: str, roles: dict[str, float] | None = None, ops: dict[str, float] | None = None) -> float:
    """Seconds ``args`` took; with ``roles``, adds to it the seconds spent in each role's operations
    (from one operation's start to the next's, all hosts together, keyed by the name's first part:
    "Base", "PostgreSQL"...; before the first operation: "(connect, prepare)"); with ``ops``, the same
    per operation (its whole name)."""
    start = time.monotonic()
    proc = subprocess.Popen(list(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    current, since = "(connect, prepare)", start
    op = current
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if roles is not None and "--> Starting operation: " in line:
            now = time.monotonic()
            roles[current] = roles.get(current, 0.0) + now - since
            if ops is not None:
                ops[op] = ops.get(op, 0.0) + now - since
            op = line.split("--> Starting operation: ", 1)[1].strip()
            current, since = op.split(" | ")[0].strip(), now
    proc.wait()
    elapsed = time.monotonic() - start
    if roles is not None:
        roles[current] = roles.get(current, 0.0) + time.monotonic() - since
        if ops is not None:
            ops[op] = ops.get(op, 0.0) + time.monotonic() - since
    output = "".join(lines)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{output[-3000:]}")
    if "deploys/site.py" in args and "Grand total" in output:
        total = next(line for line in output.splitlines() if "Grand total" in line).split()
        print(f"    {' '.join(args[-2:])}: Grand total {' '.join(total[2:])}", flush=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reruns", type=int, default=3)
    args = parser.parse_args()
    py, pyinfra = str(BIN / "python"), str(BIN / "pyinfra")
    results: dict[str, list[float]] = {"lab_up": [], "cold_deploy": [], "rerun": []}
    per_role: list[dict[str, float]] = []
    for n in range(args.rounds):
        print(f"round {n + 1}/{args.rounds}", flush=True)
        timed(py, "-m", "lab", "down")
        results["lab_up"].append(timed(py, "-m", "lab", "up"))
        timed(py, "-m", "webstack.labsecrets", "inventories/lab")
        roles: dict[str, float] = {}
        ops: dict[str, float] = {}
        results["cold_deploy"].append(timed(str(BIN / "webstack"), "onboard", "inventories/lab", roles=roles, ops=ops))
        per_role.append(roles)
        print("    cold deploy per role (s): " + ", ".join(f"{k} {v:.1f}" for k, v in roles.items()), flush=True)
        slowest = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
        print("    slowest operations (s): " + "; ".join(f"{k} {v:.1f}" for k, v in slowest), flush=True)
        for _ in range(args.reruns):
            results["rerun"].append(timed(pyinfra, "-y", "inventories/lab.py", "deploys/site.py"))
    machines = sum(1 for line in (ROOT / "inventories/lab/hosts.yml").read_text().splitlines() if "address:" in line)
    print(f"\n{machines} machines, {args.rounds} rounds, {args.reruns} reruns each")
    print(f"{'measure':<14}{'median s':>10}{'min s':>8}{'max s':>8}")
    for key, values in results.items():
        print(f"{key:<14}{statistics.median(values):>10.1f}{min(values):>8.1f}{max(values):>8.1f}")
    for role in per_role[0] if per_role else {}:
        values = [r.get(role, 0.0) for r in per_role]
        print(f"  cold: {role:<22}{statistics.median(values):>8.1f}{min(values):>8.1f}{max(values):>8.1f}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"foundation-{stamp}.json").write_text(json.dumps({"machines": machines, **results, "cold_deploy_per_role": per_role}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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


def timed(*args: str) -> float:
    start = time.monotonic()
    proc = subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    if "deploys/site.py" in args and "Grand total" in proc.stdout:
        total = next(line for line in proc.stdout.splitlines() if "Grand total" in line).split()
        print(f"    {' '.join(args[-2:])}: Grand total {' '.join(total[2:])}", flush=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reruns", type=int, default=3)
    args = parser.parse_args()
    py, pyinfra = str(BIN / "python"), str(BIN / "pyinfra")
    results: dict[str, list[float]] = {"lab_up": [], "cold_deploy": [], "rerun": []}
    for n in range(args.rounds):
        print(f"round {n + 1}/{args.rounds}", flush=True)
        timed(py, "-m", "lab", "down")
        results["lab_up"].append(timed(py, "-m", "lab", "up"))
        timed(py, "-m", "webstack.labsecrets", "inventories/lab")
        results["cold_deploy"].append(timed(str(BIN / "webstack"), "onboard", "inventories/lab"))
        for _ in range(args.reruns):
            results["rerun"].append(timed(pyinfra, "-y", "inventories/lab.py", "deploys/site.py"))
    machines = sum(1 for line in (ROOT / "inventories/lab/hosts.yml").read_text().splitlines() if "address:" in line)
    print(f"\n{machines} machines, {args.rounds} rounds, {args.reruns} reruns each")
    print(f"{'measure':<14}{'median s':>10}{'min s':>8}{'max s':>8}")
    for key, values in results.items():
        print(f"{key:<14}{statistics.median(values):>10.1f}{min(values):>8.1f}{max(values):>8.1f}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"foundation-{stamp}.json").write_text(json.dumps({"machines": machines, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

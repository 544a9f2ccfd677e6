"""Rollout time with a schema migration against one without, on the lab; a script, not a test.

    .venv/bin/python bench/rollout.py [--rounds 3]     (the lab up: make demo first)

Each round rolls out to the application servers (``deploys/rollout.py --limit web``), under a
client requesting a page every 20 ms:
1. a release that differs from the lab's only by a comment (no migration to apply: the migrate
   command runs and finds nothing to do);
2. a release with one more migration (``alter table signups add column ...``: a catalog-only
   change in PostgreSQL, so the cost measured is the mechanism's, not the DDL's);
3. back to the lab's release.
Prints the seconds of 1 and 2 per round, their medians and the failed requests. Results are
also written to bench/results/rollout-<time>.json.

``--bad-releases N``: afterwards, N rollouts of a release that answers 500 everywhere (its
health check included), each followed by the rollback the run prints, under the same client:
the requests that failed (goal: 0) and the seconds until the rollout stopped.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.probe import SteadyClient, host  # noqa: E402

BIN = Path(sys.executable).parent


def rollout(inv: Path, check: bool = True) -> float:
    start = time.monotonic()
    subprocess.run([str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollout.py", "--limit", "web"], cwd=ROOT,
                   check=check, capture_output=True, text=True)
    return time.monotonic() - start


def bad_release(tmp: Path, n: int) -> tuple[float, int, int]:
    """Roll out a release whose every page (its /healthz too) answers 500, then roll app1 back as the
    run says: (seconds until the rollout stopped, requests, failed requests)."""
    import re

    bad = tmp / f"bad{n}"
    shutil.copytree(ROOT / "examples" / "demoapp", bad)
    app = (bad / "app.py").read_text()
    (bad / "app.py").write_text(app.replace('    if path == "/healthz":\n', (
        '    if path:  # a broken release\n'
        '        start_response("500 Internal Server Error", [("Content-Type", "text/plain")])\n'
        '        return [b"broken\\n"]\n'
        '    if path == "/healthz":\n'), 1))
    inv = inventory(tmp, f"b{n}", bad)
    with open(inv.parent / "lab" / "group_data" / "app.yml", "a") as f:
        f.write("app__health_timeout: 15\n")
    with SteadyClient(interval=0.02, limit=900) as client:
        start = time.monotonic()
        out = subprocess.run([str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollout.py", "--limit", "web"],
                             cwd=ROOT, capture_output=True, text=True)
        stopped = time.monotonic() - start
        if out.returncode == 0:
            sys.exit("the bad release was rolled out")
        back = re.search(r"deploys/rollback\.py (.*?--data release=\S+)", out.stdout + out.stderr)
        if not back:
            sys.exit(f"no rollback command in the output:\n{(out.stdout + out.stderr)[-2000:]}")
        subprocess.run([str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/rollback.py",
                        *back.group(1).split()], cwd=ROOT, check=True, capture_output=True, text=True)
    return stopped, len(client.results), len(client.failures())


def inventory(tmp: Path, name: str, source: Path) -> Path:
    inv = tmp / name / "inventories"
    shutil.copytree(ROOT / "inventories" / "lab", inv / "lab")
    shutil.copy(ROOT / "inventories" / "lab.py", inv / "lab.py")
    with open(inv / "lab" / "group_data" / "app.yml", "a") as f:
        f.write(f"app__source: {source}\n")
    return inv / "lab.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bad-releases", type=int, default=0)
    args = parser.parse_args()
    plain_s, migrate_s, failed, requests = [], [], 0, 0
    with tempfile.TemporaryDirectory(prefix="webstack-rollout-") as tmp_dir:
        tmp = Path(tmp_dir)
        for n in range(args.rounds):
            plain = tmp / f"plain{n}"
            shutil.copytree(ROOT / "examples" / "demoapp", plain)
            with open(plain / "app.py", "a") as f:
                f.write(f"\n# bench round {n}\n")
            migrating = tmp / f"migrating{n}"
            shutil.copytree(plain, migrating)
            (migrating / "migrations" / f"900_bench_{n}.sql").write_text(
                f"alter table signups add column if not exists bench_{n} text;\n")
            with SteadyClient(interval=0.02, limit=900) as client:
                plain_s.append(rollout(inventory(tmp, f"p{n}", plain)))
                migrate_s.append(rollout(inventory(tmp, f"m{n}", migrating)))
                rollout(ROOT / "inventories" / "lab.py")
            failed += len(client.failures())
            requests += len(client.results)
            print(f"round {n + 1}: without migration {plain_s[-1]:.1f} s, with one {migrate_s[-1]:.1f} s", flush=True)
        bad = [bad_release(tmp, n) for n in range(args.bad_releases)]
        for n, (stopped, sent, lost) in enumerate(bad):
            print(f"bad release {n + 1}: stopped after {stopped:.1f} s; {sent} requests, {lost} failed", flush=True)
    drops = "; ".join(f"alter table signups drop column if exists bench_{n}" for n in range(args.rounds))
    host("db1").run(f"runuser -u postgres -- psql -XAtq -d app -c \"{drops}; delete from schema_migrations "
                    "where version like '900_bench_%'\"")
    result = {"rounds": args.rounds, "without_migration_s": [round(x, 1) for x in plain_s],
              "with_migration_s": [round(x, 1) for x in migrate_s], "requests": requests, "failed": failed,
              "bad_releases": [{"stopped_s": round(a, 1), "requests": b, "failed": c} for a, b, c in bad]}
    if plain_s:
        print(f"median: without {statistics.median(plain_s):.1f} s, with {statistics.median(migrate_s):.1f} s; "
              f"{requests} page requests meanwhile, {failed} failed")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"rollout-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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


def rollout(inv: Path) -> float:
    start = time.monotonic()
    subprocess.run([str(BIN / "pyinfra"), "-y", str(inv), "deploys/rollout.py", "--limit", "web"], cwd=ROOT,
                   check=True, capture_output=True, text=True)
    return time.monotonic() - start


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
    drops = "; ".join(f"alter table signups drop column if exists bench_{n}" for n in range(args.rounds))
    host("db1").run(f"runuser -u postgres -- psql -XAtq -d app -c \"{drops}; delete from schema_migrations "
                    "where version like '900_bench_%'\"")
    result = {"rounds": args.rounds, "without_migration_s": [round(x, 1) for x in plain_s],
              "with_migration_s": [round(x, 1) for x in migrate_s], "requests": requests, "failed": failed}
    print(f"median: without {statistics.median(plain_s):.1f} s, with {statistics.median(migrate_s):.1f} s; "
          f"{requests} page requests meanwhile, {failed} failed")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"rollout-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

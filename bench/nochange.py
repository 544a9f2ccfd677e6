"""No-change run: time and remote commands per host, with and without the fact cache and prefetch.

    .venv/bin/python bench/nochange.py [--runs N] [--limit HOST ...] [--inventory inventories/lab.py]
                                       [--modes off,cache,prefetch]

Needs the converged lab (after `make demo` or the integration tests). For each mode
(``off``: no fact cache, ``WEBSTACK_FACT_CACHE=0``; ``cache``: the cache without the prefetch,
``WEBSTACK_FACT_PREFETCH=0``; ``prefetch``: both, as a normal run) it runs
``pyinfra -y INVENTORY deploys/site.py`` N times, alternating the modes so all see the same
load (one unmeasured run first, so the prefetch has its record), and reports the median wall
time, the fact commands sent per host (``WEBSTACK_FACT_STATS``; a prefetch counts one) and the
operations changed (must be 0). The floor is ``pyinfra INVENTORY exec -- true`` (connect plus
one command per host). Writes bench/results/nochange-<utc>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYINFRA = str(Path(sys.executable).parent / "pyinfra")


MODES = {"off": {"WEBSTACK_FACT_CACHE": "0"}, "cache": {"WEBSTACK_FACT_PREFETCH": "0"}, "prefetch": {}}


def one(args: list[str], mode: str | None, inventory: str = "inventories/lab.py") -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as stats:
        env = dict(os.environ, WEBSTACK_FACT_STATS=stats.name, **MODES.get(mode or "", {}))
        start = time.monotonic()
        proc = subprocess.run([PYINFRA, "-y", inventory, *args], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            sys.exit(f"{' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        per_host = json.loads(Path(stats.name).read_text() or "{}")
    total = next((line for line in (proc.stdout + proc.stderr).splitlines() if "Grand total" in line), "")
    cols = re.split(r"\s{2,}", total.strip())
    return {"seconds": seconds, "facts": per_host, "grand_total": cols[1:] if total else []}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--limit", action="append", default=[])
    parser.add_argument("--inventory", default="inventories/lab.py")
    parser.add_argument("--modes", default="off,cache,prefetch")
    args = parser.parse_args()
    limit = [x for name in args.limit for x in ("--limit", name)]
    modes = args.modes.split(",")
    floor = [one([*limit, "exec", "--", "true"], None, args.inventory)["seconds"] for _ in range(args.runs)]
    one([*limit, "deploys/site.py"], "prefetch", args.inventory)  # the prefetch's record
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.runs):
        for mode in modes:
            runs[mode].append(one([*limit, "deploys/site.py"], mode, args.inventory))
    print(f"hosts: {', '.join(args.limit) or 'all'}; {args.runs} runs per mode")
    print(f"floor (exec -- true): median {statistics.median(floor):.2f} s")
    result: dict = {"inventory": args.inventory, "limit": args.limit, "floor_s": floor}
    for mode, items in runs.items():
        secs = [r["seconds"] for r in items]
        facts = items[-1]["facts"]
        per_host = sorted(v["sent"] for v in facts.values())
        print(f"{mode:8}: median {statistics.median(secs):5.1f} s (min {min(secs):.1f}, max {max(secs):.1f}); "
              f"fact commands per host: median {statistics.median(per_host):.0f}, max {max(per_host)} "
              f"({max(facts, key=lambda h: facts[h]['sent'])}); grand total {items[-1]['grand_total']}")
        result[mode] = {"seconds": secs, "facts": facts, "grand_total": items[-1]["grand_total"]}
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"nochange-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage 1 -> full stack on the lab's on-demand machines grow1-grow5; a script, not a test.

    .venv/bin/python bench/growth.py     (the lab up: make demo first)

Walks ``tests/integration/growth.py`` (stage 1 on grow1; replicas and backups; switchover;
the web tier with the floating IP; site again) while a client requests a page every 50 ms and
another signs up every 200 ms through grow1's address. Prints each step's seconds, failed
pages and sign-ups, the slowest acknowledged sign-up (the longest time a write waited), the
acknowledged sign-ups missing from the new primary, and the same for the minute through the new
floating IP. Results are also written to bench/results/growth-<time>.json.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from tests.integration.growth import grow, stored_signups, write_pause  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="webstack-growth-") as tmp:
        g = grow(Path(tmp))
    assert g.pages and g.signups and g.vip_pages and g.vip_signups
    stored = stored_signups("grow3", g.signups.tag) | stored_signups("grow3", g.vip_signups.tag)
    acked = g.signups.acknowledged() | g.vip_signups.acknowledged()
    result = {
        "steps_s": {k: round(v, 1) for k, v in g.seconds.items()},
        "pages": len(g.pages.results), "pages_failed": len(g.pages.failures()),
        "signups": len(g.signups.results), "signups_failed": len(g.signups.failures()),
        "longest_write_wait_s": round(write_pause(g.signups), 2),
        "acked_missing": len(acked - stored),
        "vip_pages": len(g.vip_pages.results), "vip_pages_failed": len(g.vip_pages.failures()),
        "vip_signups": len(g.vip_signups.results), "vip_signups_failed": len(g.vip_signups.failures()),
    }
    for step, seconds in result["steps_s"].items():
        print(f"{step:24} {seconds:7.1f} s")
    for key, value in result.items():
        if key != "steps_s":
            print(f"{key:24} {value}")
    report.write("growth", result)
    return 0 if result["pages_failed"] == result["signups_failed"] == result["acked_missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

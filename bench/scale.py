"""How the no-change run grows with the fleet: the lab's standing hosts, then 26 and 52 hosts.

    .venv/bin/python bench/scale.py [--runs N] [--sizes 26,52]

Needs the converged lab (make demo). Boots the on-demand machines scale1..scaleN
(``lab/fleet.yml``, base role only), writes inventories holding the standing lab plus
enough of them for each size, onboards them (``webstack onboard``), and for each size runs
``deploys/site.py`` once to converge (every host's ``/etc/hosts`` lists the whole inventory)
and then N times measured with nothing to change. Prints per size the floor (``exec --
true``), the median no-change run and the added cost per host beyond the standing lab; then
converges the standing lab back to its own inventory. Writes bench/results/scale-<utc>.json.
With ``--interleave``, every size runs from the one inventory of the largest (smaller sizes by
``--limit``), the sizes in turn within each round.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.nochange import one  # noqa: E402
from lab.config import DEFAULT_FLEET, load_fleet  # noqa: E402
from lab.probe import MACHINES  # noqa: E402

BIN = Path(sys.executable).parent


def inventory(tmp: Path, extra: list) -> str:
    """The lab inventory plus ``extra`` machines (no roles: the base only), as tmp/<N>/lab.py (named
    lab: its secrets' key is the lab's)."""
    where = tmp / str(len(MACHINES) + len(extra))
    where.mkdir()
    shutil.copytree(ROOT / "inventories" / "lab", where / "lab")
    shutil.copy(ROOT / "inventories" / "lab.py", where / "lab.py")
    with open(where / "lab" / "hosts.yml", "a") as hosts:
        for m in extra:
            hosts.write(f"  {m.name}: {{address: {m.address}, release: {m.release}, roles: [], groups: []}}\n")
    return str(where / "lab.py")


def interleaved(result: dict, inv: str, sizes: list[int], scale: list, runs: int) -> None:
    """Every size from the one inventory of the largest: the first N hosts by ``--limit``, sizes in
    turn within each round."""
    names = [*MACHINES, *(m.name for m in scale)]
    limits = {n: [x for name in names[:n] for x in ("--limit", name)] if n < max(sizes) else [] for n in sizes}
    one(["deploys/site.py"], "prefetch", inv)  # converge every host to the largest inventory
    floors: dict[int, list[float]] = {n: [] for n in sizes}
    secs: dict[int, list[float]] = {n: [] for n in sizes}
    last: dict[int, dict] = {}
    for _ in range(runs):
        for n in sizes:
            floors[n].append(one(["exec", *limits[n], "--", "true"], None, inv)["seconds"])
            last[n] = one(["deploys/site.py", *limits[n]], "prefetch", inv)
            secs[n].append(last[n]["seconds"])
    for n in sizes:
        sent = sorted(v["sent"] for v in last[n]["facts"].values())
        result["sizes"][n] = {"floor_s": floors[n], "seconds": secs[n], "interleaved": True,
                              "fact_commands_per_host_median": statistics.median(sent),
                              "grand_total": last[n]["grand_total"]}
        print(f"{n:3} hosts: floor {statistics.median(floors[n]):.2f} s, no-change median {statistics.median(secs[n]):.2f} s "
              f"(min {min(secs[n]):.2f}, max {max(secs[n]):.2f}), fact commands per host {statistics.median(sent):.0f}, "
              f"grand total {last[n]['grand_total']} (interleaved)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="26,52")
    parser.add_argument("--interleave", action="store_true",
                        help="one inventory of the largest size, smaller sizes by --limit, the sizes alternating "
                             "run by run (no converging run between sizes, so drift of the machine's speed over "
                             "the minutes of the bench falls on every size alike)")
    parser.add_argument("--no-onboard", action="store_true", help="the scale machines are onboarded already")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    scale = [m for m in load_fleet(DEFAULT_FLEET).machines if m.name.startswith("scale")]
    need = max(sizes) - len(MACHINES)
    if need > len(scale):
        sys.exit(f"lab/fleet.yml has {len(scale)} scale machines; {need} needed")
    subprocess.run([str(BIN / "python"), "-m", "lab", "up", *(m.name for m in scale[:need])], cwd=ROOT, check=True)
    result: dict = {"standing": len(MACHINES), "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="webstack-scale-") as tmp:
        invs = {len(MACHINES): "inventories/lab.py"}
        invs.update({n: inventory(Path(tmp), scale[:n - len(MACHINES)]) for n in sizes})
        if not args.no_onboard:
            onboard = subprocess.run([str(BIN / "webstack"), "onboard", str(Path(invs[max(sizes)]).with_suffix(""))],
                                     cwd=ROOT, capture_output=True, text=True)
            if onboard.returncode != 0:
                sys.exit(f"onboarding failed:\n{(onboard.stdout + onboard.stderr)[-3000:]}")
        if args.interleave:
            interleaved(result, invs[max(sizes)], [len(MACHINES), *sizes], scale, args.runs)
        for n, inv in sorted(invs.items()) if not args.interleave else ():
            floor = [one(["exec", "--", "true"], None, inv)["seconds"] for _ in range(args.runs)]
            converge = one(["deploys/site.py"], "prefetch", inv)
            runs = [one(["deploys/site.py"], "prefetch", inv) for _ in range(args.runs)]
            secs = [r["seconds"] for r in runs]
            sent = sorted(v["sent"] for v in runs[-1]["facts"].values())
            result["sizes"][n] = {"floor_s": floor, "converge_s": converge["seconds"], "seconds": secs,
                                  "fact_commands_per_host_median": statistics.median(sent),
                                  "grand_total": runs[-1]["grand_total"]}
            print(f"{n:3} hosts: floor {statistics.median(floor):.2f} s, no-change median {statistics.median(secs):.2f} s "
                  f"(min {min(secs):.2f}, max {max(secs):.2f}), fact commands per host {statistics.median(sent):.0f}, "
                  f"grand total {runs[-1]['grand_total']}")
    base = statistics.median(result["sizes"][len(MACHINES)]["seconds"])
    for n in sizes:
        added = (statistics.median(result["sizes"][n]["seconds"]) - base) / (n - len(MACHINES))
        result["sizes"][n]["added_per_host_s"] = added
        print(f"{n:3} hosts: {added:.3f} s added per host beyond the standing {len(MACHINES)}")
    one(["deploys/site.py"], "prefetch")  # the standing lab back to its own inventory's /etc/hosts
    out = report.write("scale", result)
    print(f"written: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

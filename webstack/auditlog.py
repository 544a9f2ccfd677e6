"""Where the deploy audit trail lives, and its merged reading (``webstack audit``).

The records are written by roles/audit.py: one JSON line per run on the control machine
(``control_log``), one per changed server in ``SERVER_LOG``. Both carry the run's id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

SERVER_LOG = "/var/log/webstack/audit.log"


def control_log(env: str) -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "webstack" / "audit" / f"{env}.jsonl"


def _lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn line (a run cut off mid-write) is skipped, not fatal
    return out


def merged(inv: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Runs newest first (control machine and servers merged by run id), and hosts not read."""
    from webstack.remote import ssh_argv, targets

    runs: dict[str, dict[str, Any]] = {}
    path = control_log(inv.name)
    for rec in _lines(path.read_text()) if path.exists() else []:
        runs[rec["run"]] = {**rec, "hosts": sorted(set(rec.get("hosts_changed", [])))}
    unreachable = []

    def read(t: Any) -> tuple[str, str | None]:
        proc = subprocess.run(ssh_argv(t, f"cat {SERVER_LOG} 2>/dev/null || true"), capture_output=True,
                              text=True, timeout=60)
        return t.name, proc.stdout if proc.returncode == 0 else None

    with ThreadPoolExecutor(8) as pool:
        for name, text in pool.map(read, targets(inv, "all")):
            if text is None:
                unreachable.append(name)
                continue
            for rec in _lines(text):
                run = runs.setdefault(rec["run"], {**rec, "outcome": "unknown (no record on this control machine)",
                                                   "hosts": []})
                run["hosts"] = sorted({*run["hosts"], rec["host"]})
    for run in runs.values():
        run.pop("host", None)
    return sorted(runs.values(), key=lambda r: r["at"], reverse=True), unreachable


def show(inv: Path, json_file: Path | None = None) -> int:
    runs, unreachable = merged(inv)
    for r in runs:
        commit = r.get("commit", "?")[:12] + ("+dirty" if r.get("dirty") else "")
        notes = " ".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(r.get("notes", {}).items()))
        options = " ".join(f"{k}={v}" for k, v in sorted(r.get("options", {}).items()))
        failed = f" failed on {', '.join(r['hosts_failed'])}" if r.get("hosts_failed") else ""
        print(f"{r['at']}  {r['deploy']:<11} {r.get('operator', '?')} as {r.get('login', '?')}  {commit}  "
              f"{r['outcome']}{failed}  hosts: {', '.join(r['hosts']) or '-'}"
              + (f"  options: {options}" if options else "") + (f"  {notes}" if notes else ""))
    if unreachable:
        print(f"webstack: not read (unreachable): {', '.join(unreachable)}", file=sys.stderr)
    if json_file:
        json_file.write_text(json.dumps(runs, indent=2, sort_keys=True) + "\n")
    return 0

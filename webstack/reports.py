"""``webstack drift`` and ``webstack status``: a dry pyinfra run that writes a JSON report, printed as text.

Both run ``pyinfra INVENTORY deploys/<site|status>.py --dry`` (read-only: facts
are gathered, no operation runs) with an environment variable naming the JSON
file the roles write when pyinfra exits (``roles/_lib.py`` for drift,
``roles/status.py`` for status).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DRIFT_ENV = "WEBSTACK_DRIFT_REPORT"
STATUS_ENV = "WEBSTACK_STATUS_REPORT"
ROOT = Path(__file__).resolve().parent.parent


def shim(inventory: Path) -> Path:
    """``inventories/lab`` or ``inventories/lab.py`` -> the pyinfra inventory file."""
    return inventory if inventory.suffix == ".py" else inventory.with_suffix(".py")


def dry_run(inventory: Path, deploy: str, env_key: str, extra: list[str]) -> tuple[dict[str, Any] | None, str, int]:
    """(report or None, pyinfra's output, its exit code)."""
    with tempfile.TemporaryDirectory(prefix="webstack-report-") as tmp:
        out = Path(tmp) / "report.json"
        cmd = [str(Path(sys.executable).parent / "pyinfra"), str(shim(inventory)), str(ROOT / "deploys" / f"{deploy}.py"),
               "--dry", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, env_key: str(out)}, capture_output=True, text=True)
        report = json.loads(out.read_text()) if out.exists() else None
    return report, proc.stdout + proc.stderr, proc.returncode


def format_drift(report: dict[str, Any]) -> str:
    """Per host: 'no drift', or the operations site would run and each file's diff (secrets masked)."""
    lines = []
    for name, row in report.items():
        if row.get("error"):
            lines.append(f"{name}: {row['error']}")
            continue
        if not row["changes"]:
            lines.append(f"{name}: no drift")
            continue
        lines.append(f"{name}: {len(row['changes'])} change(s)")
        lines += [f"    - {c}" for c in row["changes"]]
        for f in row["files"]:
            if f.get("meta"):
                lines.append(f"    {f['path']}: owner/mode {f['meta']}")
            if f.get("diff"):
                lines += ["    " + d for d in f["diff"].rstrip("\n").splitlines()]
    return "\n".join(lines)


def drifted(report: dict[str, Any]) -> bool:
    return any(row.get("error") or row.get("changes") for row in report.values())


def _age(stamp: Any) -> str:
    """A Unix time (pgBackRest) or ISO time as 'N h ago'."""
    import datetime as dt

    if not stamp:
        return "-"
    now = dt.datetime.now(dt.UTC)
    when = (dt.datetime.fromtimestamp(stamp, dt.UTC) if isinstance(stamp, (int, float))
            else dt.datetime.fromisoformat(str(stamp)))
    seconds = (now - when).total_seconds()
    return f"{seconds / 3600:.1f} h ago" if seconds >= 3600 else f"{seconds / 60:.0f} min ago"


def format_status(report: dict[str, Any]) -> str:
    """One table of the stack, then the clusters' backups and the queue."""
    head = f"{'host':9} {'roles':18} {'pending':>7} {'sec':>4} {'reboot':6} {'last patch':32} state"
    lines, extra = [head], []
    for name, row in report.items():
        if row.get("error"):
            lines.append(f"{name:9} {'':18} {row['error']}")
            continue
        state = []
        if row.get("vip"):
            state.append(f"holds VIP {row['vip']}")
        if "pg" in row:
            pg = row["pg"]
            if pg == "standby":
                state.append(f"{row['cluster']} standby, lag {row.get('replay_lag_s', '?')} s")
            elif pg == "primary":
                state.append(f"{row['cluster']} primary, {row.get('streaming', 0)} streaming, tl {row.get('timeline')}")
            else:
                state.append(f"{row.get('cluster', '')} {pg}")
            if pg == "primary" and row.get("inventory_primary") != name:
                state.append(f"(inventory says {row.get('inventory_primary')})")
        if row.get("release"):
            state.append(f"release {row['release']} {row.get('app_active', '')}")
        patch = row.get("last_patch") if isinstance(row.get("last_patch"), dict) else {}
        patched = f"{patch.get('finished', '-')}" + (f" ({patch['health'][:6]})" if patch.get("health") else "")
        lines.append(f"{name:9} {','.join(row.get('roles', [])):18} {row.get('pending', '?'):>7} "
                     f"{row.get('security', '?'):>4} {row.get('reboot_required', '?'):6} {patched:32} {'; '.join(state)}")
        if isinstance(row.get("backups"), dict) and row.get("pg") == "primary":
            b = row["backups"]
            extra.append(f"backups of {row['cluster']} (from {name}): full {_age(b.get('full'))}, diff {_age(b.get('diff'))}, "
                         f"incr {_age(b.get('incr'))}; WAL archived {_age(row.get('last_archived'))}, "
                         f"{row.get('wal_ready', '?')} segment(s) waiting")
        if isinstance(row.get("queue"), dict):
            q = row["queue"]
            extra.append(f"job queue (from {name}): {q.get('ready')} ready, {q.get('waiting')} waiting for a retry, "
                         f"{q.get('running')} running, {q.get('dead')} dead")
    return "\n".join(lines + [""] + extra)

"""Backup-tier benchmark: backup durations, repository size, restore time, recovery point after power loss.

    .venv/bin/python bench/backup.py [--scale 70] [--rpo-trials 5] [--skip-size] [--growth-minutes 10]

Needs a converged lab (`make demo`); uses cluster main (db1 primary, db2
replica, PostgreSQL 17, pgBackRest 2.55 over SFTP to backup1) and the drill
host drill1. Prints a table and writes bench/results/backup-<utc>.json.

1. size: `pgbench -i -s SCALE` into the app database on db1 (scale 70 is about 1 GB).
2. backups: a full, then 20 s of pgbench writes and an incremental, then a
   differential, each timed (`webstack-backup scheduled --type ...` as the timer runs it);
   repository size on backup1 (`du`) against the database size.
3. restore: latest state onto drill1 with deploys/restore.py (wall time of the
   deploy) and the restore step alone (`webstack-backup restore`: copy, start, recovery).
4. recovery point after a power loss: a writer on app1 commits a row every
   50 ms with its acknowledgement time; after a random 20-80 s, db1 AND db2 are
   powered off together (the whole site); the latest state is restored onto
   drill1 from backup1 alone; seconds of acknowledged commits missing = ack time
   of the last acknowledged row − ack time of the newest restored row. Then power
   comes back and the cluster resumes.
5. archive growth (``--growth-minutes M``): for archive_timeout 60 s and then the
   inventory's setting (a copy of the inventory, applied with site.py to cluster main),
   M minutes of the lab's ordinary background (job ticks, health checks) plus a writer
   committing one row per second: WAL segments and bytes added to the repository's
   archive on backup1, extrapolated to a day.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from lab.probe import PGPASS, conninfo, host  # noqa: E402

BIN = Path(sys.executable).parent
SCRIPT = "/usr/local/lib/webstack/webstack-backup"
LAB = "inventories/lab.py"


def sh(*args: str) -> str:
    proc = subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def psql(name: str, sql: str, db: str = "app") -> str:
    return host(name).check_output("runuser -u postgres -- psql -XAtq -v ON_ERROR_STOP=1 -d %s -c %s", db, sql)


def timed(fn) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def restore_drill() -> float:
    return timed(lambda: sh(str(BIN / "pyinfra"), "-y", LAB, "deploys/restore.py", "--limit", "drill1",
                            "--limit", "backup1", "--data", "from=main", "--data", "confirm=drill1"))


def sizes() -> dict[str, int]:
    db = int(psql("db1", "select sum(pg_database_size(datname)) from pg_database", db="postgres"))
    repo = int(host("backup1").check_output("du -sb /srv/pgbackrest/main/repo | cut -f1"))
    return {"database_bytes": db, "repository_bytes": repo}


def backups_and_restore(scale: int) -> dict:
    out: dict = {"scale": scale}
    db1 = host("db1")
    out["pgbench_init_s"] = timed(lambda: db1.check_output(
        f"runuser -u postgres -- pgbench -i -q -s {scale} app 2>&1 | tail -1"))
    out["after_init"] = sizes()
    for kind in ("full", "incr", "diff"):
        if kind == "incr":
            db1.check_output("runuser -u postgres -- pgbench -n -N -c 4 -T 20 app >/dev/null")
        out[f"{kind}_backup_s"] = timed(lambda k=kind: db1.check_output(
            f"runuser -u postgres -- {SCRIPT} scheduled --stanza main --type {k}"))
    st = json.loads(db1.check_output("runuser -u postgres -- pgbackrest --stanza=main --output=json info"))[0]
    out["backups"] = [{"label": b["label"], "type": b["type"], "db_bytes": b["info"]["size"],
                       "repo_delta_bytes": b["info"]["repository"]["delta"]} for b in st["backup"][-3:]]
    out["after_backups"] = sizes()
    host("db1").check_output("runuser -u postgres -- pgbackrest --stanza=main check")
    out["restore_deploy_s"] = restore_drill()
    data = "/var/lib/postgresql/17/main"
    line = host("drill1").check_output(
        f"{SCRIPT} restore --stanza main --data {data} --service postgresql@17-main --archive-off | tail -1")
    out["restore_step_s"] = json.loads(line)["seconds"]
    out["restored_rows"] = int(psql("drill1", "select count(*) from pgbench_accounts"))
    psql("db1", "drop table if exists pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers")
    return out


def rpo_trial(app1, trial: int, seconds: float) -> dict:
    psql("db1", "create table if not exists rpo_trials (trial int, id bigint, at timestamptz not null, "
                "primary key (trial, id)); grant all on rpo_trials to app")
    info = conninfo("db1", "db2", target_session_attrs="read-write", connect_timeout="1")
    script = f"""rm -f /root/rpo-acked /root/rpo-stop; date +%s.%N > /root/rpo-start; i=0
while [ ! -f /root/rpo-stop ]; do i=$((i+1))
  if PGPASSFILE={PGPASS} psql "{info}" -XAtqc "insert into rpo_trials values ({trial}, $i, clock_timestamp())" 2>/dev/null
  then echo "$i $(date +%s.%N)" >> /root/rpo-acked; fi
  sleep 0.05
done
"""
    app1.run(f"cat > /root/rpo.sh <<'EOF'\n{script}EOF")
    app1.run("systemctl stop rpo-writer 2>/dev/null; systemctl reset-failed rpo-writer 2>/dev/null; true")
    app1.check_output("systemd-run --unit=rpo-writer --collect sh /root/rpo.sh")
    time.sleep(seconds)
    sh(str(BIN / "python"), "-m", "lab", "poweroff", "db1", "db2")
    time.sleep(2)
    app1.run("touch /root/rpo-stop; sleep 1; systemctl stop rpo-writer 2>/dev/null")
    lines = app1.check_output("cat /root/rpo-acked 2>/dev/null || true").splitlines()
    acked = {int(i): float(t) for i, t in (line.split() for line in lines)}
    if not acked:
        sys.exit("the writer got no insert acknowledged: see journalctl -u rpo-writer on app1")
    started = float(app1.check_output("cat /root/rpo-start"))
    restore_s = restore_drill()
    restored = psql("drill1", f"select coalesce(max(id), 0) from rpo_trials where trial = {trial}") \
        if psql("drill1", "select to_regclass('rpo_trials') is not null") == "t" else "0"
    newest = int(restored)
    # A row can be restored without its acknowledgement (power lost between commit and reply):
    # measure from the newest restored row that was acknowledged, or from the trial's start.
    restored_acked = max((i for i in acked if i <= newest), default=0)
    lost_s = max(acked.values()) - (acked[restored_acked] if restored_acked else started)
    sh(str(BIN / "python"), "-m", "lab", "start", "db1", "db2")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if psql("db1", "select pg_is_in_recovery()", db="postgres") == "f" and \
                    psql("db2", "select pg_is_in_recovery()", db="postgres") == "t":
                break
        except AssertionError:
            pass
        time.sleep(1)
    return {"trial": trial, "write_s": round(seconds, 1), "acked": len(acked), "restored_max_id": newest,
            "lost_rows": sum(1 for i in acked if i > newest), "lost_s": round(lost_s, 2),
            "restore_deploy_s": round(restore_s, 1)}


def archived_since(epoch: float) -> tuple[int, int]:
    """(files, bytes) that reached cluster main's WAL archive on backup1 since ``epoch`` (retention
    may expire older ones meanwhile: only new files are counted)."""
    out = host("backup1").check_output("find /srv/pgbackrest/main/repo/archive/main -type f -name '0000*' "
                                       f"-newermt @{epoch:.0f} -printf '%s\\n'").split()
    return len(out), sum(int(x) for x in out)


def growth(app1, minutes: float) -> dict:
    """Archive growth per day at archive_timeout 60 s and at the inventory's setting."""
    import shutil
    import tempfile

    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="webstack-bench-"))
    shutil.copytree(ROOT / "inventories" / "lab", tmp / "lab")
    shutil.copy(ROOT / "inventories" / "lab.py", tmp / "lab.py")
    group = tmp / "lab" / "group_data" / "pg_main.yml"
    original = group.read_text()
    configured = yaml.safe_load((ROOT / "inventories" / "lab" / "group_data" / "db.yml").read_text()).get(
        "postgres__archive_timeout_s", 10)
    psql("db1", "create table if not exists growth_ticks (at timestamptz); grant all on growth_ticks to app")
    info = conninfo("db1", "db2", target_session_attrs="read-write")
    app1.run("systemctl stop growth-writer 2>/dev/null; true")
    app1.check_output(f"systemd-run --unit=growth-writer --collect sh -c 'while :; do PGPASSFILE={PGPASS} "
                      f"psql \"{info}\" -XAtqc \"insert into growth_ticks values (now())\"; sleep 1; done'")
    out = {}
    try:
        for timeout in (60, configured):
            group.write_text(original + f"\npostgres__archive_timeout_s: {timeout}\n")
            sh(str(BIN / "pyinfra"), "-y", str(tmp / "lab.py"), "deploys/site.py", "--limit", "pg_main")
            start = time.time()
            time.sleep(minutes * 60)
            files, size = archived_since(start)
            per_day = 24 * 60 / minutes
            out[str(timeout)] = {"segments_per_day": round(files * per_day),
                                 "mib_per_day": round(size * per_day / 2**20, 1),
                                 "wal_switched_gib_per_day": round(files * per_day * 16 / 1024, 1)}
            print(json.dumps({"archive_timeout": timeout, **out[str(timeout)]}), flush=True)
    finally:
        app1.run("systemctl stop growth-writer 2>/dev/null; true")
        sh(str(BIN / "pyinfra"), "-y", LAB, "deploys/site.py", "--limit", "pg_main")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=70)
    ap.add_argument("--rpo-trials", type=int, default=5)
    ap.add_argument("--skip-size", action="store_true", help="skip the pgbench load, backups and restore timing")
    ap.add_argument("--growth-minutes", type=float, default=0, help="measure archive growth (0: skip)")
    args = ap.parse_args()
    app1 = host("app1")
    app1.run("DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-client >/dev/null")
    from webstack.inventory import load

    db = next(c for c in load(ROOT / "inventories" / "lab") if c.name == "db1")
    app1.run(f"umask 077; echo '*:5432:app:app:{db.secret('postgres_password_app').unmask()}' > {PGPASS}")
    results: dict = {"when": datetime.now(UTC).isoformat(timespec="seconds")}
    if not args.skip_size:
        results["size"] = backups_and_restore(args.scale)
        print(json.dumps(results["size"]), flush=True)
    if args.growth_minutes:
        results["growth"] = growth(app1, args.growth_minutes)
    rng = random.Random(7)
    results["rpo"] = []
    base = int(time.time())
    for n in range(args.rpo_trials):
        results["rpo"].append(rpo_trial(app1, base + n, rng.uniform(20, 80)))
        print(json.dumps(results["rpo"][-1]), flush=True)
    report.write("backup", results)
    for timeout, g in results.get("growth", {}).items():
        print(f"archive_timeout {timeout} s: {g['segments_per_day']} segments/day, {g['mib_per_day']} MiB/day "
              f"in the repository ({g['wal_switched_gib_per_day']} GiB/day of 16 MiB WAL files)")
    if results["rpo"]:
        lost = [t["lost_s"] for t in results["rpo"]]
        print(f"power loss of db1+db2, restore from backup1: committed data lost "
              f"{', '.join(f'{x:.1f}' for x in lost)} s (median {statistics.median(lost):.1f} s; "
              f"rows lost {[t['lost_rows'] for t in results['rpo']]})")
    if "size" not in results:
        return
    s = results["size"]
    gib = 1024 ** 3
    print(f"database {s['after_init']['database_bytes'] / gib:.2f} GiB (pgbench scale {s['scale']}, "
          f"init {s['pgbench_init_s']:.0f} s)")
    print(f"full backup {s['full_backup_s']:.1f} s, incremental {s['incr_backup_s']:.1f} s, "
          f"differential {s['diff_backup_s']:.1f} s")
    print(f"repository {s['after_backups']['repository_bytes'] / gib:.2f} GiB for "
          f"{s['after_backups']['database_bytes'] / gib:.2f} GiB of database "
          f"(ratio {s['after_backups']['repository_bytes'] / s['after_backups']['database_bytes']:.2f})")
    print(f"restore onto drill1: deploy {s['restore_deploy_s']:.1f} s, restore step {s['restore_step_s']:.1f} s "
          f"({s['restored_rows']} pgbench_accounts rows)")


if __name__ == "__main__":
    main()

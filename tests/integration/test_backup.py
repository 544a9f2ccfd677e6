"""The backup tier against the lab: encrypted off-site repository, PITR, outage, retention, disaster.

Cluster main (Debian 13, pgBackRest 2.55 over SFTP) carries the accident,
outage and retention tests; cluster legacy (Debian 12, pgBackRest 2.45 over
sshfs) is destroyed last and restored onto two new machines. These tests run
after every other module (conftest orders them).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from datetime import UTC, datetime

import pytest
import yaml

from lab.probe import KEY
from roles.postgres.retention import Backup, add, expire
from tests.integration.conftest import (
    BIN,
    ROOT,
    deploy,
    host_for,
    inventory_copy,
    lab,
    run,
    wait_for,
)
from webstack.inventory import load

pytestmark = pytest.mark.lab

SCRIPT = "/usr/local/lib/webstack/webstack-backup"
LAB = ROOT / "inventories" / "lab.py"


def psql(name: str, sql: str, db: str = "app") -> str:
    return host_for(name).check_output("runuser -u postgres -- psql -XAtq -v ON_ERROR_STOP=1 -d %s -c %s", db, sql)


def archive_now(primary: str, stanza: str) -> None:
    """pgbackrest check: switch WAL and wait until that segment is in the repository."""
    host_for(primary).check_output(f"runuser -u postgres -- pgbackrest --stanza={stanza} check")


def restore_drill(*data: str, check: bool = True):
    args = [a for d in data for a in ("--data", d)]
    return deploy(LAB, "restore", "--limit", "drill1", "--limit", "backup1", "--data", "from=main",
                  "--data", "confirm=drill1", *args, check=check)


def stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def info(primary: str, stanza: str) -> dict:
    out = host_for(primary).check_output(f"runuser -u postgres -- pgbackrest --stanza={stanza} --output=json info")
    return json.loads(out)[0]


def ready_count(primary: str) -> int:
    return int(host_for(primary).check_output("ls /var/lib/postgresql/*/main/pg_wal/archive_status | grep -c ready || true"))


@pytest.fixture(scope="module")
def canaries(converged):
    """A random value in each cluster, inside a backup and the WAL archive."""
    out = {}
    for cluster, primary in (("main", "db1"), ("legacy", "db3")):
        value = f"canary-{secrets.token_hex(12)}"
        psql(primary, f"create table if not exists canary (v text); insert into canary values ('{value}')")
        host_for(primary).check_output(f"runuser -u postgres -- {SCRIPT} scheduled --stanza {cluster} --type incr")
        archive_now(primary, cluster)
        out[cluster] = value
    return out


def tar_of(machine: str, paths: str) -> bytes:
    proc = subprocess.run([str(BIN / "python"), "-m", "lab", "exec", machine, "--",
                           f"tar -C / -cf - {paths} 2>/dev/null; true"], cwd=ROOT, capture_output=True, timeout=300)
    assert len(proc.stdout) > 1_000_000, proc.stderr
    return proc.stdout


def test_first_site_run_took_a_full_backup_of_each_cluster(converged):
    for cluster, primary in (("main", "db1"), ("legacy", "db3")):
        st = info(primary, cluster)
        assert st["status"]["code"] == 0 and st["cipher"] == "aes-256-cbc"
        assert [b["type"] for b in st["backup"]][:1] == ["full"]


def test_check_deploy_passes_on_a_healthy_cluster(converged):
    result = run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/check.py", "--limit", "db1", check=False)
    assert result.returncode == 0, result.output[-3000:]
    assert '"stanza": "main"' in result.output and '"problems": []' in result.output


def test_check_finds_a_gap_in_the_wal_archive_and_the_next_backup_closes_it(converged):
    """A WAL segment archived after the newest backup disappears from the repository (held aside on
    backup1): the check fails naming it; the next backup starts past it, and the check passes."""
    archive = "/srv/pgbackrest/main/repo/archive/main"
    for n in range(3):
        psql("db1", f"create table if not exists gap_marks (n int); insert into gap_marks values ({n})")
        archive_now("db1", "main")
    backup1 = host_for("backup1")
    names = sorted(backup1.check_output(f"find {archive} -type f -name '0000*' ! -name '*.partial*' "
                                        "! -name '*.history*' -printf '%P\\n'").split())
    held = names[-2]  # the newest but one: later segments exist, so it is a gap, not the tail
    backup1.check_output(f"install -d -m 700 /root/held && mv {archive}/{held} /root/held/")
    try:
        check = run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/check.py", "--limit", "db1", check=False)
        assert check.returncode != 0 and "WAL archive gap: " + held.rsplit("/", 1)[-1][:24] in check.output, \
            check.output[-3000:]
        host_for("db1").check_output(f"runuser -u postgres -- {SCRIPT} scheduled --stanza main --type incr")
        check = run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/check.py", "--limit", "db1", check=False)
        assert check.returncode == 0 and '"problems": []' in check.output, check.output[-3000:]
    finally:
        backup1.check_output(f"mv /root/held/{held.rsplit('/', 1)[-1]} {archive}/{held}")


@pytest.mark.parametrize("cluster,primary", [("main", "db1"), ("legacy", "db3")])
def test_scheduled_backup_reads_from_the_standby(converged, cluster, primary):
    out = host_for(primary).check_output(f"runuser -u postgres -- {SCRIPT} scheduled --stanza {cluster} --type incr 2>&1")
    assert f"incr backup of {cluster} from a standby" in out
    assert "wait for replay on the standby to reach" in out and "replay on the standby reached" in out


def test_backup_host_holds_ciphertext_only(canaries):
    """Every repository file is aes-256 ciphertext (``Salted__``); nowhere on the host (logs,
    spool, configuration, repository) is the passphrase or a known row value in the clear."""
    # Positive control: the same search finds the canary in the database host's own files.
    psql("db1", "checkpoint", db="postgres")
    assert canaries["main"].encode() in tar_of("db1", "var/lib/postgresql")
    everything = tar_of("backup1", "srv etc home root var")
    lab_secrets = {c.name: c for c in load(ROOT / "inventories" / "lab")}
    passphrases = [lab_secrets["db1"].secret("pgbackrest_cipher_pass_main").unmask(),
                   lab_secrets["db3"].secret("pgbackrest_cipher_pass_legacy").unmask()]
    for needle in [*canaries.values(), *passphrases]:
        assert needle.encode() not in everything
    heads = host_for("backup1").check_output(
        "find /srv/pgbackrest -type f | while read -r f; do printf '%s %s\\n' \"$(head -c 8 \"$f\")\" \"$f\"; done")
    files = heads.splitlines()
    assert len(files) > 10 and all(line.startswith("Salted__ ") for line in files), files


def test_repository_account_is_sftp_only_inside_its_chroot(converged):
    db1 = host_for("db1")
    opts = ("-i /etc/pgbackrest/sftp_key -o UserKnownHostsFile=/etc/pgbackrest/sftp_known_hosts "
            "-o StrictHostKeyChecking=yes -o BatchMode=yes")
    listing = db1.run(f"echo 'ls /repo' | runuser -u postgres -- sftp -b - {opts} pgbr-main@10.77.0.51")
    assert listing.rc == 0 and "/repo/archive" in listing.stdout
    outside = db1.run(f"echo 'ls /etc' | runuser -u postgres -- sftp -b - {opts} pgbr-main@10.77.0.51")
    assert outside.rc != 0  # the chroot holds only repo/
    shell = db1.run(f"runuser -u postgres -- ssh -v {opts} pgbr-main@10.77.0.51 id </dev/null")
    assert "Authenticated to 10.77.0.51" in shell.stderr  # the key works...
    assert "uid=" not in shell.stdout  # ...but the forced internal-sftp runs no command
    # An operator's key stolen onto a database host opens nothing on backup1: from there, sshd lets in
    # the repository account only (AllowUsers).
    db1.check_output(f"install -m 600 /dev/null /root/stolen && cat > /root/stolen <<'EOF'\n{KEY.read_text()}EOF")
    try:
        # (ssh's own exit status 255 would look like a lost connection to testinfra: it is printed instead)
        stolen = db1.run("ssh -i /root/stolen -o UserKnownHostsFile=/etc/pgbackrest/sftp_known_hosts "
                         "-o StrictHostKeyChecking=yes -o BatchMode=yes ops@10.77.0.51 id </dev/null; echo exit=$?")
    finally:
        db1.run("rm -f /root/stolen")
    assert "exit=0" not in stolen.stdout and "uid=" not in stolen.stdout, stolen.stdout
    assert "not listed in AllowUsers" in host_for("backup1").check_output(
        "journalctl -u ssh --no-pager -n 50 | grep -F 'User ops from 10.77.0.31' || true")
    # A host that is neither a member nor a drill host never reaches backup1's sshd.
    probe = host_for("app1").run(
        "python3 -c \"import socket; s=socket.socket(); s.settimeout(2); print(s.connect_ex(('10.77.0.51', 22)))\"")
    assert probe.stdout.strip() not in ("0", "111")


def test_dropped_table_comes_back_to_the_second(converged):
    db1 = host_for("db1")
    psql("db1", "drop table if exists orders; create table orders (id int primary key, at timestamptz not null)")
    db1.check_output("for i in $(seq 1 20); do runuser -u postgres -- psql -XAtq -d app "
                     "-c \"insert into orders values ($i, clock_timestamp())\"; sleep 0.25; done")
    at = {int(i): float(t) for i, t in (row.split("|") for row in
                                        psql("db1", "select id, extract(epoch from at) from orders").splitlines())}
    time.sleep(1.5)
    psql("db1", "drop table orders")
    archive_now("db1", "main")
    # Just before the DROP: every row is back.
    result = restore_drill(f"time={stamp(at[20] + 0.5)}", "check_sql=select count(*), max(id) from orders",
                           "check_db=app")
    assert "check: 20|20" in result.output
    assert psql("drill1", "select count(*), max(id) from orders") == "20|20"
    # Between two rows: exactly the rows committed before that instant.
    restore_drill(f"time={stamp(at[10] + 0.1)}")
    assert psql("drill1", "select count(*), max(id) from orders") == "10|10"
    # The copy does not archive into the source's repository, keeps no recovery target
    # (a replica cloned from it would inherit it), and the drill host keeps no key to the repository.
    assert psql("drill1", "show archive_mode", db="postgres") == "off"
    assert psql("drill1", "show recovery_target_time", db="postgres") == ""
    assert host_for("drill1").run("test -e /etc/pgbackrest/conf.d/secrets.conf || test -e /etc/pgbackrest/sftp_key").rc == 1


def test_restore_outlives_its_control_machine_and_cleans_up_on_failure(converged):
    """The restore runs as a unit on the target: killing the deploy (SIGKILL: its SSH connections
    drop) halfway leaves it running to the end, and the drill host keeps no repository key. A
    restore that fails (a target before the oldest backup) also removes the key, puts the
    previous data back, and shows the unit's last lines."""
    drill = host_for("drill1")
    keys = "test -e /etc/pgbackrest/conf.d/secrets.conf || test -e /etc/pgbackrest/sftp_key"
    psql("db1", "create table if not exists restore_marks (id int); insert into restore_marks values (1)")
    archive_now("db1", "main")
    proc = subprocess.Popen([str(BIN / "pyinfra"), "-y", str(LAB), "deploys/restore.py", "--limit", "drill1",
                             "--limit", "backup1", "--data", "from=main", "--data", "confirm=drill1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: drill.run("systemctl is-active -q webstack-restore-main").rc == 0, 120,
                 "the restore unit never started")
    finally:
        proc.kill()
        proc.wait()
    wait_for(lambda: drill.run("systemctl is-active -q webstack-restore-main").rc != 0, 600, "the restore never ended")
    assert drill.check_output("cat /run/webstack-restore-main.result") == "success"
    assert psql("drill1", "select count(*) from restore_marks") == "1"
    assert drill.run(keys).rc == 1, "the drill host kept the repository key"
    failed = restore_drill("time=2000-01-01 00:00:00+00", check=False)
    assert failed.returncode != 0 and "webstack-restore-main: exit-code" in failed.output, failed.output[-3000:]
    assert "putting the previous data directory back" in failed.output
    assert drill.run(keys).rc == 1, "a failed restore left the repository key on the drill host"
    assert psql("drill1", "select count(*) from restore_marks") == "1", "the previous data did not come back"


def test_restore_refuses_to_replace_data_without_confirmation(converged):
    result = deploy(LAB, "restore", "--limit", "drill1", "--limit", "backup1", "--data", "from=main", check=False)
    assert result.returncode != 0
    assert "drill1 already holds a PostgreSQL data directory" in result.output
    assert "repeat with --data confirm=drill1" in result.output


def test_backup_host_outage_queues_wal_and_loses_nothing(converged, tmp_path):
    psql("db1", "drop table if exists outage; create table outage (id int primary key)")
    archive_now("db1", "main")
    failed_before = int(psql("db1", "select failed_count from pg_stat_archiver", db="postgres"))
    lab("partition", "db1", "backup1")
    try:
        for i in range(1, 6):
            psql("db1", f"insert into outage values ({i})")
            psql("db1", "select pg_switch_wal()", db="postgres")
        wait_for(lambda: ready_count("db1") >= 3, 90, "WAL did not queue on the primary")
        wait_for(lambda: int(psql("db1", "select failed_count from pg_stat_archiver", db="postgres")) > failed_before,
                 90, "archive_command never failed")
        check = host_for("db1").run(f"runuser -u postgres -- {SCRIPT} check --stanza main --max-wal-lag-s 1 --timeout 5")
        assert check.rc == 1, check.stdout
        problems = json.loads(check.stdout.strip().splitlines()[-1])["problems"]
        assert any("pgbackrest check failed" in p for p in problems)
        assert any("wait for the archive" in p for p in problems)
        # A switchover now would leave those segments out of the archive for good: refused.
        refused = deploy(inventory_copy(tmp_path), "switchover", "--limit", "pg_main", check=False)
        assert refused.returncode != 0 and "wait for the backup repository" in refused.output
        assert psql("db1", "select pg_is_in_recovery()", db="postgres") == "f"
        assert psql("db2", "select pg_is_in_recovery()", db="postgres") == "t"
    finally:
        lab("heal")
    # A new segment wakes the archiver at once (it otherwise retries every minute).
    psql("db1", "insert into outage values (6)")
    psql("db1", "select pg_switch_wal()", db="postgres")
    wait_for(lambda: ready_count("db1") == 0, 240, "the archive did not catch up")
    archive_now("db1", "main")
    restore_drill()
    assert psql("drill1", "select count(*) from outage") == "6"
    assert host_for("db1").run("grep -rl 'dropped WAL' /var/log/pgbackrest/").rc == 1
    assert host_for("db1").run(f"runuser -u postgres -- {SCRIPT} check --stanza main").rc == 0


def test_retention_keeps_exactly_the_models_set(converged):
    """Count-based retention depends on order and type only, so real backups taken back to back, with the
    counts scaled down (full=2, diff=3), must leave exactly what the model predicts."""
    db1 = host_for("db1")
    db1.check_output("systemctl stop webstack-backup.timer")
    # A run the timer started is not stopped with it: its lock would fail this test's backups (error 50).
    wait_for(lambda: db1.run("systemctl is-active --quiet webstack-backup.service").rc != 0, 600,
             "the timer's backup did not finish")
    try:
        st = info("db1", "main")
        model = [Backup(b["label"], b["type"], b.get("prior")) for b in st["backup"]]
        for i, kind in enumerate("FIIDIDFDIIF"):
            k = {"F": "full", "D": "diff", "I": "incr"}[kind]
            psql("db1", f"insert into canary values ('retention-{i}')")
            db1.check_output(f"runuser -u postgres -- pgbackrest --stanza=main --type={k} "
                             "--repo1-retention-full=2 --repo1-retention-diff=3 backup")
            newest = info("db1", "main")["backup"][-1]
            model = add(model, k, newest["label"])
            assert (newest["type"], newest.get("prior")) == (model[-1].type, model[-1].prior)
            model = expire(model, full=2, diff=3)
        kept = [(b["label"], b["type"]) for b in info("db1", "main")["backup"]]
        assert kept == [(b.label, b.type) for b in model]
        assert sum(1 for _, t in kept if t == "full") == 2
    finally:
        db1.check_output("systemctl start webstack-backup.timer")


def test_repository_deleted_from_a_compromised_database_host_comes_back_from_the_vault(canaries):
    """Whoever holds db1 holds its repository account, which owns the repository's files: here it
    deletes the whole repository (pgbackrest stanza-delete, through SFTP as pgbr-main). backup1's
    hourly copy is root's and outside the account's chroot; the next copy fails and mails the
    operator; one restore command puts the last complete copy back and restores every row."""
    db1, backup1, mail1 = host_for("db1"), host_for("backup1"), host_for("mail1")
    psql("db1", "drop table if exists vaulted; create table vaulted as select generate_series(1, 5000) id")
    db1.check_output(f"runuser -u postgres -- {SCRIPT} scheduled --stanza main --type incr")
    archive_now("db1", "main")
    expected = psql("db1", "select count(*), sum(id) from vaulted")
    backup1.check_output("systemctl start webstack-vault.service")
    assert backup1.check_output("stat -c '%U %a' /srv/pgbackrest-vault") == "root 700"
    assert backup1.check_output("find /srv/pgbackrest-vault/main -mindepth 1 -printf '%u:%g\\n' | sort -u") == "root:root"
    vault_files = "find /srv/pgbackrest-vault/main -path '*Z/*' -type f | wc -l"
    before = int(backup1.check_output(vault_files))
    alerts = "grep -l -r -F -e 'X-Webstack-Unit: webstack-vault.service' /var/mail/webstack/all/new 2>/dev/null | wc -l"
    mails = int(mail1.check_output(alerts))

    db1.check_output("runuser -u postgres -- pgbackrest --stanza=main stop && "
                     "runuser -u postgres -- pgbackrest --stanza=main --force stanza-delete")
    try:
        assert backup1.check_output("find /srv/pgbackrest/main/repo -type f | wc -l") == "0"
        failed = backup1.run("systemctl start webstack-vault.service")
        assert failed.rc != 0
        assert "the repository of main was complete and is not any more" in backup1.check_output(
            "journalctl -u webstack-vault.service --no-pager -n 20")
        assert int(backup1.check_output(vault_files)) >= before  # the copies were not touched
        wait_for(lambda: int(mail1.check_output(alerts)) == mails + 1, 30, "the operator's alert did not arrive")

        result = restore_drill("vault=latest", "check_sql=select count(*), sum(id) from vaulted", "check_db=app")
        assert "Repository of main from the vault (latest)" in result.output, result.output[-3000:]
        # What the intruder left (nothing) is kept aside, root's; the repository is the account's again.
        assert backup1.check_output("ls /srv/pgbackrest-vault/main | grep -c '^replaced-'") != "0"
        assert f"check: {expected}" in result.output
        assert psql("drill1", "select count(*), sum(id) from vaulted") == expected
        assert psql("drill1", f"select count(*) from canary where v = '{canaries['main']}'") == "1"
        assert backup1.check_output("stat -c '%U' /srv/pgbackrest/main/repo/backup/main/backup.info") == "pgbr-main"
    finally:
        db1.check_output("runuser -u postgres -- pgbackrest --stanza=main start")
    # The cluster goes on archiving and backing up into the restored repository.
    db1.check_output(f"runuser -u postgres -- {SCRIPT} scheduled --stanza main --type full")
    archive_now("db1", "main")
    assert info("db1", "main")["status"]["code"] == 0


def test_both_database_servers_lost_restore_onto_new_machines(tmp_path, canaries):
    """Cluster legacy (Debian 12): db3 and db4 are powered off for good; spare1 and spare2 take their
    places in the inventory, spare1 is restored from backup1 alone, spare2 is cloned from it."""
    psql("db3", "drop table if exists precious; create table precious as select generate_series(1, 1000) id")
    archive_now("db3", "legacy")
    lab("poweroff", "db3")
    lab("poweroff", "db4")
    inv = inventory_copy(tmp_path)
    hosts_file = inv.parent / "lab" / "hosts.yml"
    hosts = yaml.safe_load(hosts_file.read_text())
    for gone in ("db3", "db4"):
        del hosts["hosts"][gone]
    for new in ("spare1", "spare2"):
        hosts["hosts"][new].update(roles=["postgres"], groups=[*hosts["hosts"][new]["groups"], "db", "pg_legacy"])
    hosts_file.write_text(yaml.safe_dump(hosts))
    group = inv.parent / "lab" / "group_data" / "pg_legacy.yml"
    group.write_text(group.read_text().replace("postgres__primary: db3", "postgres__primary: spare1"))

    start = time.monotonic()
    deploy(inv, "restore", "--limit", "spare1", "--limit", "backup1")
    restore_seconds = time.monotonic() - start
    assert psql("spare1", "select count(*), sum(id) from precious") == "1000|500500"
    assert psql("spare1", f"select count(*) from canary where v = '{canaries['legacy']}'") == "1"
    deploy(inv, "site", "--limit", "spare1", "--limit", "spare2", "--limit", "backup1")
    wait_for(lambda: psql("spare2", "select count(*) from precious") == "1000", 30, "spare2 did not clone spare1")
    # The restored primary archives into the same repository, on a new timeline.
    archive_now("spare1", "legacy")
    assert psql("spare1", "select pg_is_in_recovery()", db="postgres") == "f"
    again = deploy(inv, "site", "--limit", "spare1", "--limit", "spare2", "--limit", "backup1")
    assert again.totals()["changed"] == "-", again.output[-3000:]
    print(f"legacy restored onto spare1 in {restore_seconds:.1f} s (deploy, packages included)")


"""The backup tier without hosts: retention policy, schedule, check thresholds, rendered configuration."""

from __future__ import annotations

import ast
import configparser
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from roles._lib import render
from roles.backup.deploy import sftp_match_blocks
from roles.base.deploy import firewall_rules
from roles.postgres import backup
from roles.postgres.deploy import config_context
from roles.postgres.retention import Backup, add, expire
from roles.postgres.settings import PostgresSettings
from roles.registry import needed_secrets
from tests.unit.conftest import SECRETS
from webstack import tls
from webstack.errors import ConfigError
from webstack.inventory import load
from webstack.sshkeys import new_private_key, public_key
from webstack.tls import new_ed25519_key
from webstack_agent import backup as agent

HOUR, DAY = 3600, 86400

HOSTS = {
    "app1": {"address": "10.1.0.21", "groups": ["app"]},
    "db1": {"address": "10.1.0.31", "roles": ["postgres"], "groups": ["db"], "release": "trixie"},
    "db2": {"address": "10.1.0.32", "roles": ["postgres"], "groups": ["db"], "release": "trixie"},
    "old1": {"address": "10.1.0.33", "roles": ["postgres"], "groups": ["legacy"], "release": "bookworm"},
    "vault": {"address": "10.1.0.51", "roles": ["backup"], "release": "trixie"},
    "drill": {"address": "10.1.0.71", "roles": ["postgres"], "groups": ["drills"], "release": "trixie"},
}
KEY_MAIN, KEY_LEGACY = new_private_key(), new_private_key()
BACKUP_SECRETS = {**SECRETS, "pgbackrest_cipher_pass_main": "cipher-main-secret", "pgbackrest_sftp_key_main": KEY_MAIN,
                  "pgbackrest_cipher_pass_legacy": "cipher-legacy-secret", "pgbackrest_sftp_key_legacy": KEY_LEGACY,
                  "pgbackrest_tls_ca_key_main": new_ed25519_key(), "pgbackrest_tls_ca_key_legacy": new_ed25519_key()}
GROUPS = {
    "db": {"postgres__primary": "db1", "postgres__users": ["app"], "postgres__backup_host": "vault",
           "postgres__databases": [{"name": "app", "owner": "app"}]},
    "legacy": {"postgres__cluster": "legacy", "postgres__primary": "old1", "postgres__backup_host": "vault"},
    "drills": {"postgres__cluster": "drill", "postgres__primary": "drill"},
    "backup": {"backup__restore_groups": ["drills"]},
}


@pytest.fixture
def cfgs(make_inventory):
    return {c.name: c for c in load(make_inventory(hosts=HOSTS, groups=GROUPS), secrets=BACKUP_SECRETS)}


def error_of(inv) -> str:
    with pytest.raises(ConfigError) as info:
        load(inv, secrets=BACKUP_SECRETS)
    return str(info.value)


# --- retention ---------------------------------------------------------------------------------------------


def sequence(kinds: str) -> list[Backup]:
    """Backups from a string of F/D/I, expiring after each one (as pgBackRest does), without expiry here."""
    out: list[Backup] = []
    for i, k in enumerate(kinds):
        out = add(out, {"F": "full", "D": "diff", "I": "incr"}[k], f"{i:02d}{k}")
    return out


def test_expiry_follows_pgbackrest_documented_example():
    # pgBackRest's help for repo-retention-diff: F1, D1, D2, F2 with diff=2 keeps F1, D2, F2.
    backups = sequence("FDDF")
    assert [b.label for b in expire(backups, full=9, diff=2)] == ["00F", "02D", "03F"]


def test_expiring_a_full_or_a_diff_takes_its_dependents():
    backups = sequence("FIIDIFDI")  # 00F 01I 02I 03D 04I 05F 06D 07I
    assert [b.label for b in expire(backups, full=1, diff=9)] == ["05F", "06D", "07I"]
    # diff=2: anchors newest first are 06D, 05F; 03D expires with 04I (based on it); the full and its incrs stay.
    assert [b.label for b in expire(backups, full=9, diff=2)] == ["00F", "01I", "02I", "05F", "06D", "07I"]


def simulate(weeks: int, full: int, diff: int) -> list[tuple[float, list[Backup]]]:
    """The hourly timer for ``weeks`` weeks: (time, backups kept) after each run."""
    backups: list[Backup] = []
    history: list[tuple[float, list[Backup]]] = []
    for hour in range(weeks * 7 * 24):
        now = hour * HOUR
        raw = [{"type": b.type, "timestamp": {"stop": b.stop}} for b in backups]
        kind = agent.decide(now, raw)
        backups = expire(add(backups, kind, f"b{hour}", stop=now), full=full, diff=diff)
        history.append((now, backups))
    return history


def test_policy_keeps_hourly_24h_daily_7d_weekly_4w():
    """Six simulated weeks with the declared defaults: at every hour of the last two weeks,
    each of the last 24 hours, 7 days and 4 weeks holds a restore point (docs/backup-plan.md §2)."""
    defaults = PostgresSettings()
    history = simulate(weeks=6, full=defaults.backup_retention_full, diff=defaults.backup_retention_diff)
    for now, kept in history[-14 * 24:]:
        ages = [now - b.stop for b in kept]
        for h in range(24):
            assert any(h * HOUR <= a < (h + 1) * HOUR for a in ages), f"hour {h} missing at t={now / HOUR}h"
        for d in range(7):
            assert any(d * DAY <= a < (d + 1) * DAY for a in ages), f"day {d} missing at t={now / HOUR}h"
        for w in range(4):
            assert any(w * 7 * DAY <= a < (w + 1) * 7 * DAY for a in ages), f"week {w} missing at t={now / HOUR}h"
    now, kept = history[-1]
    counts = {t: sum(1 for b in kept if b.type == t) for t in ("full", "diff", "incr")}
    # The steady state the README's Backups section and docs/backup-plan.md state.
    assert counts["full"] == 5 and counts["diff"] == 6
    assert 230 <= counts["incr"] <= 253


def test_schedule_decides_full_diff_incr():
    sunday = 1_004 * DAY  # day 1004 since the epoch (1972-10-01) is a Sunday
    assert time.gmtime(sunday).tm_wday == 6

    def b(kind, at):
        return {"type": kind, "timestamp": {"stop": at}}

    tuesday_0105 = sunday + 2 * DAY + HOUR + 300
    assert agent.decide(tuesday_0105, []) == "full"
    assert agent.decide(tuesday_0105, [b("full", sunday + 300)]) == "diff"  # first run of a new day
    assert agent.decide(tuesday_0105, [b("full", sunday + 300), b("diff", tuesday_0105 - HOUR)]) == "incr"
    assert agent.decide(sunday + 300, [b("full", sunday - 7 * DAY + 300), b("diff", sunday - DAY)]) == "full"
    assert agent.decide(sunday + HOUR, [b("full", sunday + 300)]) == "incr"
    # A missed Sunday: the first run once the newest full is a week old takes one.
    assert agent.decide(sunday + 7 * DAY + 2 * DAY, [b("full", sunday + 300), b("diff", sunday + 8 * DAY)]) == "full"


# --- the check -----------------------------------------------------------------------------------------------

LIMITS = agent.Limits(max_wal_lag_s=300, max_age_h=2, max_diff_age_h=26, max_full_age_h=192)


def stanza(*backups, code=0):
    return {"status": {"code": code, "message": "ok"},
            "backup": [{"label": f"b{i}", "type": t, "timestamp": {"stop": s}, "error": e}
                       for i, (t, s, e) in enumerate(backups)]}


def test_check_passes_fresh_backups_and_names_every_breach():
    now = 100 * DAY
    good = stanza(("full", now - 3 * DAY, False), ("diff", now - 5 * HOUR, False), ("incr", now - 600, False))
    assert agent.breaches(now, good, {"failing": False}, [10.0], LIMITS) == []
    stale = stanza(("full", now - 9 * DAY, True), ("incr", now - 3 * HOUR, False), code=99)
    problems = agent.breaches(now, stale, {"failing": True, "failed_count": 4}, [400.0, 20.0], LIMITS)
    assert [p.split(" ")[0] for p in problems] == ["repository", "newest", "newest", "newest", "backups",
                                                    "2", "archive_command"]
    assert "newest full backup is 216.0 h old (limit 192 h)" in problems
    assert "2 WAL segment(s) wait for the archive, the oldest for 400 s (limit 300 s)" in problems
    assert agent.breaches(now, stanza(), {"failing": False}, [], LIMITS)[:1] == ["no any backup"]
    # A long full in progress: the hourly runs wait for it, which is no reason to alarm.
    busy = stanza(("full", now - 3 * DAY, False), ("diff", now - 5 * HOUR, False))
    assert agent.breaches(now, busy, {"failing": False}, [], LIMITS) == ["newest any backup is 5.0 h old (limit 2 h)"]
    busy["status"]["lock"] = {"backup": {"held": True}}
    assert agent.breaches(now, busy, {"failing": False}, [], LIMITS) == []


# --- configuration -------------------------------------------------------------------------------------------


def test_repository_type_per_release_and_secrets_only_in_the_secrets_file(cfgs):
    vault = next(p for p in cfgs["db1"].peers if p.name == "vault")
    trixie = backup.repo_context(cfgs["db1"].settings(PostgresSettings), "trixie", "17", vault)
    bookworm = backup.repo_context(cfgs["old1"].settings(PostgresSettings), "bookworm", "15", vault)
    assert (trixie["repo_type"], trixie["repo_path"], trixie["sftp_user"]) == ("sftp", "/repo", "pgbr-main")
    assert (bookworm["repo_type"], bookworm["repo_path"]) == ("posix", "/srv/webstack-backup/legacy")
    conf = render("postgres/etc/pgbackrest/pgbackrest.conf.j2", **trixie)
    assert "repo1-sftp-host=10.1.0.51" in conf and "repo1-cipher-type=aes-256-cbc" in conf
    assert "repo1-retention-full=5" in conf and "repo1-retention-diff=7" in conf and "archive-async=y" in conf
    assert "cipher-main-secret" not in conf and "repo1-cipher-pass" not in conf
    unit = render("postgres/etc/systemd/system/webstack-backup-repo.service.j2", **bookworm)
    assert "pgbr-legacy@10.1.0.51:/repo /srv/webstack-backup/legacy" in unit and "StrictHostKeyChecking=yes" in unit
    secret = render("postgres/etc/pgbackrest/conf.d/secrets.conf.j2",
                    **backup.secrets_context(cfgs["db1"], "main", s3=False))
    assert "repo1-cipher-pass=cipher-main-secret" in secret


def test_s3_repository_renders_keys_into_the_secrets_file(make_inventory):
    groups = {**GROUPS, "db": {**GROUPS["db"], "postgres__backup_host": "", "postgres__backup_s3_bucket": "acme-pg",
                               "postgres__backup_s3_endpoint": "s3.eu-west-1.amazonaws.com"}}
    s3 = {**BACKUP_SECRETS, "pgbackrest_s3_key_main": "AKIAEXAMPLE", "pgbackrest_s3_key_secret_main": "s3-secret"}
    cfgs = {c.name: c for c in load(make_inventory(hosts=HOSTS, groups=groups), secrets=s3)}
    assert "pgbackrest_s3_key_secret_main" in needed_secrets(cfgs["db1"])
    ctx = backup.repo_context(cfgs["db1"].settings(PostgresSettings), "bookworm", "15", None)
    conf = render("postgres/etc/pgbackrest/pgbackrest.conf.j2", **ctx)
    assert "repo1-type=s3" in conf and "repo1-s3-bucket=acme-pg" in conf and "repo1-path=/main" in conf
    assert "s3-secret" not in conf and "AKIAEXAMPLE" not in conf
    secret = render("postgres/etc/pgbackrest/conf.d/secrets.conf.j2",
                    **backup.secrets_context(cfgs["db1"], "main", s3=True))
    assert "repo1-s3-key=AKIAEXAMPLE" in secret and "repo1-s3-key-secret=s3-secret" in secret


def fake_bin(directory: Path, name: str, body: str) -> None:
    """An executable shell script standing in for a server's command (psql, pgbackrest...)."""
    directory.mkdir(exist_ok=True)
    (directory / name).write_text("#!/bin/sh\n" + body)
    (directory / name).chmod(0o755)


def pg_setting(conf: str, name: str) -> str:
    """A setting's value in a rendered postgresql.conf, unquoted as PostgreSQL reads it."""
    raw = next(line for line in conf.splitlines() if line.startswith(f"{name} = ")).split(" = ", 1)[1]
    assert raw[0] == raw[-1] == "'", raw
    return raw[1:-1].replace("''", "'")


def as_postgres_runs(command: str, path: str, file: str) -> str:
    """PostgreSQL's substitution in archive_command/restore_command: %p, %f, %%."""
    return command.replace("%%", "\0").replace("%p", path).replace("%f", file).replace("\0", "%")


def test_postgres_archives_into_the_stanza_pgbackrest_is_configured_with(cfgs, tmp_path):
    """archive_command and restore_command, as PostgreSQL runs them (substituted, through /bin/sh), call
    pgBackRest's archive-push/-get with the stanza pgbackrest.conf defines and the segment's path."""
    conf = render("postgres/etc/postgresql/main/conf.d/webstack.conf.j2", **config_context(cfgs["db2"], memory_mb=4096))
    assert "archive_mode = on" in conf and "archive_timeout = 10" in conf
    db1, db2, vault = (next(p for p in cfgs["db2"].peers if p.name == n) for n in ("db1", "db2", "vault"))
    ini = configparser.ConfigParser(interpolation=None, strict=False)  # tls-server-auth repeats
    ini.read_string(render("postgres/etc/pgbackrest/pgbackrest.conf.j2",
                           **backup.repo_context(cfgs["db2"].settings(PostgresSettings), "trixie", "17", vault, db2, [db1])))
    [stanza] = [s for s in ini.sections() if s != "global"]
    fake_bin(tmp_path / "bin", "pgbackrest", 'printf "%s\\n" "$@" > "$ARGV"\n')
    segment = "000000010000000A000000FF"

    def argv_of(setting: str, path: str, file: str = segment, rc: int = 0) -> list[str]:
        (tmp_path / "argv").unlink(missing_ok=True)
        env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "ARGV": str(tmp_path / "argv")}
        done = subprocess.run(["/bin/sh", "-c", as_postgres_runs(pg_setting(conf, setting), path, file)], env=env,
                              cwd=tmp_path)  # PostgreSQL runs it in the data directory
        assert done.returncode == rc
        return (tmp_path / "argv").read_text().splitlines() if (tmp_path / "argv").exists() else []

    assert argv_of("archive_command", f"pg_wal/{segment}") == [f"--stanza={stanza}", "archive-push", f"pg_wal/{segment}"]
    assert argv_of("restore_command", "pg_wal/RECOVERY XLOG") == [f"--stanza={stanza}", "archive-get", segment,
                                                                 "pg_wal/RECOVERY XLOG"]
    # A timeline history file pg_wal holds is copied from there, one it lacks comes from the archive.
    (tmp_path / "pg_wal").mkdir()
    (tmp_path / "pg_wal" / "00000003.history").write_text("2\t0/9000028\tno recovery target specified\n")
    assert argv_of("restore_command", "pg_wal/RECOVERYHISTORY", "00000003.history") == []
    assert (tmp_path / "pg_wal" / "RECOVERYHISTORY").read_text().startswith("2\t0/9000028")
    assert argv_of("restore_command", "pg_wal/RECOVERYHISTORY", "00000004.history") == [
        f"--stanza={stanza}", "archive-get", "00000004.history", "pg_wal/RECOVERYHISTORY"]
    # A failover's promotion found nothing newer in the archive (a fresh marker): the archive is not
    # asked, the file is "not found"; a marker older than 60 s is ignored.
    marker = tmp_path / "pg_wal" / backup.PROMOTING
    marker.touch()
    assert argv_of("restore_command", "pg_wal/RECOVERYHISTORY", "00000004.history", rc=1) == []
    assert argv_of("restore_command", "pg_wal/RECOVERYXLOG", rc=1) == []
    assert argv_of("restore_command", "pg_wal/RECOVERYHISTORY", "00000003.history") == []  # still from pg_wal
    os.utime(marker, (time.time() - 61, time.time() - 61))
    assert argv_of("restore_command", "pg_wal/RECOVERYXLOG")[1:3] == ["archive-get", segment]
    assert stanza == "main"
    assert config_context(cfgs["drill"], memory_mb=4096)["archive_command"] == ""


def test_backup_host_gets_public_keys_never_the_passphrase(cfgs):
    vault = cfgs["vault"]
    assert needed_secrets(vault) == ["password_hash_ops", "pgbackrest_sftp_key_legacy", "pgbackrest_sftp_key_main"]
    assert not any("cipher" in k for k in vault.secrets)
    assert public_key(KEY_MAIN).startswith("ssh-ed25519 ")
    blocks = sftp_match_blocks(vault)
    assert [b["user"] for b in blocks] == ["pgbr-legacy", "pgbr-main"]
    sshd = render("base/etc/ssh/sshd_config.j2", port=22, host_keys=[], kex=[], ciphers=[], macs=[],
                  host_key_algorithms=[], permit_root_login="no", tcp_forwarding="no", sftp_accounts=blocks,
                  penalty_exempt=[], allow_users=[], banner=False)
    assert "Match User pgbr-main\n    ChrootDirectory /srv/pgbackrest/main\n    ForceCommand internal-sftp" in sshd
    # SSH to the backup host: the admin networks, plus each cluster's members and the drill hosts.
    sets, _rules = firewall_rules(vault)
    opened = next(s for s in sets if s["name"] == "backup0_v4")["elements"]
    assert opened == ["10.1.0.31", "10.1.0.32", "10.1.0.33", "10.1.0.71"]
    assert sftp_match_blocks(cfgs["db1"]) == []


def test_backup_host_must_have_the_role(make_inventory):
    inv = make_inventory(hosts=HOSTS, groups={**GROUPS, "db": {**GROUPS["db"], "postgres__backup_host": "app1"}})
    assert error_of(inv) == f"{inv}/hosts.yml: cluster main: postgres__backup_host: 'app1' is not a host with role backup"


def test_members_agree_on_the_backup_host(make_inventory):
    inv = make_inventory(hosts=HOSTS, groups=GROUPS, host_data={"db2": {"postgres__backup_host": ""}})
    assert error_of(inv) == (f"{inv}/hosts.yml: cluster main: postgres__backup_host: members disagree: ['', 'vault']")


def test_missing_cipher_passphrase_is_named(make_inventory):
    inv = make_inventory(hosts=HOSTS, groups=GROUPS)
    secrets = {k: v for k, v in BACKUP_SECRETS.items() if k != "pgbackrest_cipher_pass_legacy"}
    with pytest.raises(ConfigError) as info:
        load(inv, secrets=secrets)
    assert str(info.value).startswith(f"{inv}/secrets.age: pgbackrest_cipher_pass_legacy: missing secret")


def test_sftp_key_must_be_an_openssh_private_key():
    with pytest.raises(ValueError, match="not an unencrypted OpenSSH private key"):
        public_key("-----BEGIN NONSENSE-----")


def test_members_reach_each_other_over_tls_for_standby_backups(cfgs):
    db1, db2 = (next(p for p in cfgs["db1"].peers if p.name == n) for n in ("db1", "db2"))
    vault = next(p for p in cfgs["db1"].peers if p.name == "vault")
    ctx = backup.repo_context(cfgs["db1"].settings(PostgresSettings), "trixie", "17", vault, db1, [db2])
    conf = render("postgres/etc/pgbackrest/pgbackrest.conf.j2", **ctx)
    assert "tls-server-address=10.1.0.31" in conf and "tls-server-auth=db2=main" in conf
    assert "pg2-host=db2\npg2-host-type=tls" in conf and "pg2-path=/var/lib/postgresql/17/main" in conf
    sets, rules = firewall_rules(cfgs["db1"])
    assert any("tcp dport 8432" in r and "pgBackRest TLS" in r for r in rules)
    # A drill host is no member: no TLS server, no pg2.
    drill = render("postgres/etc/pgbackrest/pgbackrest.conf.j2",
                   **backup.repo_context(cfgs["db1"].settings(PostgresSettings), "trixie", "17", vault))
    assert "tls-server" not in drill and "pg2-host" not in drill


def test_member_certificates_are_stable_and_verify():
    from cryptography import x509

    ca_key = new_ed25519_key()
    first = tls.derived_leaf(ca_key, "ca", "db1", ["10.1.0.31"])
    assert first == tls.derived_leaf(ca_key, "ca", "db1", ["10.1.0.31"])  # a rerun changes no file
    assert first != tls.derived_leaf(ca_key, "ca", "db2", ["10.1.0.32"])
    ca = x509.load_pem_x509_certificate(tls.derived_ca(ca_key, "ca").encode())
    leaf = x509.load_pem_x509_certificate(first[1].encode())
    leaf.verify_directly_issued_by(ca)


# --- the agent (webstack_agent/backup.py, installed as /usr/local/lib/webstack/webstack-backup) -----------------


def test_agent_is_one_file_of_the_standard_library():
    """It is copied alone to Debian 12 (Python 3.11) and 13 (3.13): no import outside the standard
    library, nothing newer than 3.11's grammar, and it runs without site-packages."""
    source = Path(agent.__file__).read_text()
    tree = ast.parse(source, feature_version=(3, 11))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported - set(sys.stdlib_module_names)
    assert source.startswith("#!/usr/bin/python3\n")
    out = subprocess.run([sys.executable, "-I", "-S", agent.__file__, "check", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max-full-age-h" in out.stdout, out.stderr


def test_agent_settings_come_from_the_inventory_and_name_every_other_member(cfgs):
    """The file the role writes for the agent: the inventory's thresholds, and exactly the pgN options
    (N > 1) of the pgbackrest.conf rendered for the same member (read here with configparser)."""
    pg = cfgs["db1"].settings(PostgresSettings)
    db1, db2, old1, vault = (next(p for p in cfgs["db1"].peers if p.name == n) for n in ("db1", "db2", "old1", "vault"))
    for others in ([db2], [db2, old1], []):
        ini = configparser.ConfigParser(interpolation=None, strict=False)  # tls-server-auth repeats
        ini.read_string(render("postgres/etc/pgbackrest/pgbackrest.conf.j2",
                               **backup.repo_context(pg, "trixie", "17", vault, db1, others)))
        in_conf = {k for k in ini["main"] if k.startswith("pg") and not k.startswith("pg1-")}
        settings = agent.Config.from_json(backup.agent_config(pg, others))
        assert set(settings.other_member_options) == in_conf and len(in_conf) == 7 * len(others)
        assert settings.stanza == "main"
    limits = agent.Config.from_json(backup.agent_config(pg, [db2])).limits
    assert (limits.max_wal_lag_s, limits.max_age_h, limits.max_diff_age_h, limits.max_full_age_h) == (
        pg.backup_check_max_wal_lag_s, pg.backup_check_max_age_h, pg.backup_check_max_diff_age_h,
        pg.backup_check_max_full_age_h)
    assert backup.check_args(pg) == ["--max-wal-lag-s", "300", "--max-age-h", "2", "--max-diff-age-h", "26",
                                     "--max-full-age-h", "192", "--max-slot-wal-mb", "1024"]


def settings_file(tmp_path: Path, options: tuple[str, ...] = (), limits: agent.Limits = LIMITS) -> Path:
    path = tmp_path / "webstack-backup.json"
    path.write_text(agent.Config("main", limits, options).to_json())
    return path


def test_check_thresholds_from_the_file_arguments_override(tmp_path, capsys):
    path = str(settings_file(tmp_path, limits=agent.Limits(max_wal_lag_s=60, max_age_h=3, max_diff_age_h=30,
                                                           max_full_age_h=200)))
    args = agent.parser().parse_args(["--settings", path, "check", "--stanza", "main", "--max-wal-lag-s", "1"])
    assert agent.check_limits(args) == agent.Limits(max_wal_lag_s=1, max_age_h=3, max_diff_age_h=30, max_full_age_h=200)
    assert args.timeout is None  # pgbackrest.conf's archive-timeout, not a copy of it here
    every = agent.parser().parse_args(["--settings", str(tmp_path / "none.json"), "check", "--stanza", "main",
                                       *agent.Limits(1, 2, 3, 4).args()])
    assert agent.check_limits(every) == agent.Limits(1, 2, 3, 4)  # no file needed
    # A missing file, another stanza's file, a malformed file: refused with a message, exit 2.
    for settings, stanza in ((str(tmp_path / "none.json"), "main"), (path, "legacy")):
        assert agent.main(["--settings", settings, "stanza-create", "--stanza", stanza]) == 2
    assert "No such file or directory (written by the webstack postgres role)" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"stanza": "main", "limits": {"max_age_h": "2"}, "other_member_options": []}')
    with pytest.raises(agent.ConfigError, match="not a webstack-backup configuration"):
        agent.Config.load("main", str(tmp_path / "bad.json"))


@pytest.mark.parametrize("standbys", [0, 1])
def test_scheduled_backup_reads_a_standby_or_the_primary_alone(tmp_path, standbys):
    """The installed file run as the timer runs it, against stand-ins for psql and pgbackrest."""
    bin_dir = tmp_path / "bin"
    fake_bin(bin_dir, "psql", 'case "$*" in *pg_is_in_recovery*) echo f;; *pg_stat_replication*) echo "$STANDBYS";; esac\n')
    fake_bin(bin_dir, "pgbackrest", 'echo "$*" >> "$LOG"\ncase "$*" in *" info") '
                                    """echo '[{"status": {"code": 2, "message": "no valid backups"}, "backup": []}]';; esac\n""")
    settings = settings_file(tmp_path, options=("pg2-host", "pg2-path"))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(tmp_path / "log"), "STANDBYS": str(standbys)}
    out = subprocess.run([sys.executable, "-I", "-S", agent.__file__, "--settings", str(settings), "scheduled",
                          "--stanza", "main"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "log").read_text().splitlines()
    if standbys:
        assert out.stdout == "full backup of main from a standby\n"
        assert calls[-1] == "--stanza=main --type=full --backup-standby=y --log-level-console=info backup"
    else:
        assert out.stdout == "full backup of main\n"
        assert calls[-1] == ("--stanza=main --type=full --backup-standby=n --reset-pg2-host --reset-pg2-path "
                             "--log-level-console=info backup")


def test_scheduled_backup_waits_for_a_backup_already_running_and_decides_again(tmp_path, monkeypatch, capsys):
    """The fault: the timer's run at :05 finds a backup started by hand holding pgBackRest's lock
    (error 50 in the lab, the other way round). It waits while ``info`` reports the lock held,
    without calling pgBackRest's backup, then decides the type again (that backup was a full: an
    incremental now, not a second full); a backup that takes the lock between ``info`` and its own
    (error 50) is waited for too; a lock that stays held gives up with pgBackRest's code."""
    bin_dir = tmp_path / "bin"
    fake_bin(bin_dir, "psql", 'case "$*" in *pg_is_in_recovery*) echo f;; *pg_stat_replication*) echo 1;; esac\n')
    fake_bin(bin_dir, "pgbackrest", 'echo "$*" >> "$LOG"\ncase "$*" in\n'
             '  *" info") n=$(($(cat "$COUNT") + 1)); echo $n > "$COUNT"\n'
             '    if [ $n -le 2 ] || [ -e "$HELD" ]; then held=true; else held=false; fi\n'
             '    if [ $n -le 2 ]; then echo \'[{"status": {"code": 2, "lock": {"backup": {"held": true}}}, "backup": []}]\'\n'
             '    else echo \'[{"status": {"code": 0, "lock": {"backup": {"held": \'$held\'}}}, "backup": '
             '[{"type": "full", "timestamp": {"start": \'$NOW\', "stop": \'$NOW\'}}]}]\'; fi;;\n'
             '  *" backup") if [ -e "$RACE" ]; then rm "$RACE"; exit 50; fi;;\n'
             'esac\n')
    count = tmp_path / "count"
    count.write_text("0")
    for name, value in (("PATH", f"{bin_dir}:/usr/bin:/bin"), ("LOG", tmp_path / "log"), ("COUNT", count),
                        ("HELD", tmp_path / "held"), ("RACE", tmp_path / "race"), ("NOW", int(time.time()))):
        monkeypatch.setenv(name, str(value))
    args = agent.parser().parse_args(["--settings", str(settings_file(tmp_path)), "scheduled", "--stanza", "main"])

    def backups() -> list[str]:
        calls = (tmp_path / "log").read_text().splitlines()
        (tmp_path / "log").write_text("")
        return [c.split()[1] for c in calls if c.endswith(" backup")]

    assert agent.cmd_scheduled(args, wait_s=5, pause=0.01) == 0  # held for two looks, then free
    assert backups() == ["--type=incr"]
    out = capsys.readouterr()
    assert out.err.count("another pgBackRest backup of main is running: waiting for it (0 s so far)") == 1
    assert out.out == "incr backup of main from a standby\n"
    (tmp_path / "race").touch()  # free by info, taken by another backup in between
    assert agent.cmd_scheduled(args, wait_s=5, pause=0.01) == 0
    assert backups() == ["--type=incr", "--type=incr"]
    assert capsys.readouterr().out == "incr backup of main from a standby\n"  # said once
    (tmp_path / "held").touch()  # never released
    started = time.monotonic()
    assert agent.cmd_scheduled(args, wait_s=0.2, pause=0.01) == agent.LOCK_BUSY
    assert 0.15 < time.monotonic() - started < 5 and backups() == []


class FakeServer:
    """subprocess for ``restore``: pgbackrest, systemctl and psql as on a server, recorded."""

    def __init__(self, data: Path, fail: str = "") -> None:
        self.data, self.fail, self.calls = data, fail, []

    def _do(self, argv: list[str]) -> tuple[int, str]:
        self.calls.append(argv)
        words = " ".join(argv)
        if words.endswith(" info"):
            return 0, json.dumps([{"status": {"code": 0, "message": "ok"}}])
        if words.endswith(" restore"):
            if self.fail == "restore":
                (self.data / "half-restored").write_text("x")
                return 1, ""
            (self.data / "PG_VERSION").write_text("17\n")
            return 0, ""
        if "systemctl start" in words and self.fail == "start":
            return 1, ""
        return 0, "f" if "pg_is_in_recovery" in words else ""

    def run(self, argv, check=False, **_kw):
        rc, out = self._do(argv)
        if check and rc:
            raise subprocess.CalledProcessError(rc, argv)
        return subprocess.CompletedProcess(argv, rc, out, "")

    def call(self, argv, **_kw):
        return self._do(argv)[0]


@pytest.mark.parametrize("fail", ["", "restore", "start"])
def test_restore_keeps_the_old_data_directory_until_recovery_is_done(tmp_path, monkeypatch, fail):
    data = tmp_path / "17" / "main"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("old\n")
    server = FakeServer(data, fail)
    monkeypatch.setattr(agent, "subprocess", server)
    me = os.getuid(), os.getgid()
    monkeypatch.setattr(agent.pwd, "getpwnam", lambda name: type("pw", (), {"pw_uid": me[0], "pw_gid": me[1]}))
    rc = agent.main(["restore", "--stanza", "main", "--data", str(data), "--service", "postgresql@17-main",
                     "--time", "2026-11-27 10:00:00+00", "--archive-off"])
    assert not (tmp_path / "17" / "main.webstack-pre-restore").exists()
    assert sorted(p.name for p in data.iterdir()) == ["PG_VERSION"]
    restore = next(c for c in server.calls if c[-1] == "restore")
    assert restore[:4] == ["runuser", "-u", "postgres", "--"] and "--archive-mode=off" in restore
    assert "--target=2026-11-27 10:00:00+00" in restore and "--target-action=promote" in restore
    if fail:
        assert rc == 1 and (data / "PG_VERSION").read_text() == "old\n"  # put back
        assert server.calls[-1] == ["systemctl", "start", "postgresql@17-main"]
    else:
        assert rc == 0 and (data / "PG_VERSION").read_text() == "17\n"
        assert (data.stat().st_mode & 0o777) == 0o700
        assert server.calls[-1] == ["timeout", "600", "systemctl", "restart", "postgresql@17-main"]
    # A restore interrupted before it finished or rolled back (its machine lost power) left the previous
    # data directory aside: the next restore first puts it back (a half-restored copy is dropped), then
    # restores afresh; a failure then leaves exactly that previous data in place.
    left = tmp_path / "17" / "main.webstack-pre-restore"
    left.mkdir()
    (left / "PG_VERSION").write_text("older\n")
    (data / "half-restored").write_text("x")
    rc = agent.main(["restore", "--stanza", "main", "--data", str(data), "--service", "postgresql@17-main"])
    assert not left.exists() and sorted(p.name for p in data.iterdir()) == ["PG_VERSION"]
    assert (rc, (data / "PG_VERSION").read_text()) == ((1, "older\n") if fail else (0, "17\n"))


def test_promotion_skips_the_archive_only_when_it_holds_nothing_newer():
    from roles.postgres.orchestrate import archive_not_ahead

    mb16 = 16 * 1024 * 1024
    # Received into segment 0/0A (LSN 0/0A000100): the archive's newest is 0/09 -> nothing newer.
    assert archive_not_ahead("000000020000000000000009", [2], "0/A000100", mb16, 2)
    # The archive holds the complete segment 0/0A that the standby has only partly: ask it.
    assert not archive_not_ahead("00000002000000000000000A", [2], "0/A000100", mb16, 2)
    # Exactly at a segment boundary: segment 0/0A is complete on the standby too.
    assert archive_not_ahead("00000002000000000000000A", [], "0/B000000", mb16, 2)
    # Across the 4 GiB boundary of the log number.
    assert archive_not_ahead("0000000200000000000000FF", [], "1/00000010", mb16, 2)
    assert not archive_not_ahead("000000020000000100000000", [], "1/00000010", mb16, 2)
    # A newer timeline in the archive (another promotion happened): ask it.
    assert not archive_not_ahead("000000020000000000000009", [2, 3], "0/A000100", mb16, 2)
    assert archive_not_ahead("", [], "0/3000060", mb16, 1)


def test_archive_gaps_name_missing_segments_after_the_newest_backup_only():
    seg = 16 * 1024 * 1024
    names = [f"0000000100000000/00000001000000000000000{n}-{'a' * 40}.gz" for n in "12356"]
    # 4 is missing; 1 lies before the backup's start and does not matter.
    assert agent.archive_gaps(names, "000000010000000000000002", 1, set(), seg) == ["000000010000000000000004"]
    # Still waiting in pg_wal (.ready): late, not lost.
    assert agent.archive_gaps(names, "000000010000000000000002", 1, {"000000010000000000000004"}, seg) == []
    # A timeline switch is no gap: segments of the parent timeline count up to its end (timeline 1
    # ended in segment 4: the history file says 0/4000100); a partial one does not.
    switched = [*names[:3], "0000000100000000/000000010000000000000004.partial-x.gz",
                "0000000200000000/000000020000000000000004-b.gz", "0000000200000000/000000020000000000000006-c.gz"]
    ancestors = {1: 4}
    assert agent.archive_gaps(switched, "000000010000000000000002", 2, set(), seg, ancestors) == [
        "000000020000000000000005"]
    # What the old primary archived past its fork fills no gap of the new timeline, nor does a
    # sibling timeline's segment.
    late = [*switched, "0000000100000000/000000010000000000000005-d.gz", "0000000300000000/000000030000000000000005-e.gz"]
    assert agent.archive_gaps(late, "000000010000000000000002", 2, set(), seg, ancestors) == ["000000020000000000000005"]
    # Without its history, the parent timeline counts for nothing: the whole stretch before the switch is missing.
    assert agent.archive_gaps(switched, "000000010000000000000002", 2, set(), seg) == [
        "000000020000000000000002..000000020000000000000003", "000000020000000000000005"]
    # Segments of a later (foreign) timeline do not fill a gap of this one.
    assert agent.archive_gaps(switched, "000000010000000000000002", 1, set(), seg) == []
    far = [*names, "0000000100000000/00000001000000010000000A-d.gz"]
    assert agent.archive_gaps(far, "000000010000000000000005", 1, set(), seg) == [
        "000000010000000000000007..000000010000000100000009"]  # across a log boundary (...FF -> next log)


def test_ancestors_come_from_the_timeline_history_file(tmp_path):
    history = tmp_path / "00000003.history"
    history.write_text("1\t0/4000100\tno recovery target specified\n\n2\t0/7000000\tno recovery target specified\n")
    assert agent.ancestors_of(str(history), 16 * 1024 * 1024) == {1: 4, 2: 6}
    assert agent.ancestors_of(str(tmp_path / "missing.history"), 16 * 1024 * 1024) == {}


def test_stanza_create_waits_out_a_held_pgbackrest_lock(monkeypatch):
    """A first deploy's archive-push can hold pgBackRest's lock as the stanza is created (error
    [050]): stanza-create is tried again while that is the error, and any other error returns at once."""
    import argparse
    import types

    from webstack_agent import backup as agent

    codes: list[int] = []
    monkeypatch.setattr(agent.Config, "load", classmethod(lambda cls, *a: types.SimpleNamespace(other_member_options=[])))
    monkeypatch.setattr(agent.time, "sleep", lambda s: None)
    args = argparse.Namespace(stanza="main", settings="unused")

    def answers(*replies):
        queue = list(replies)
        codes.clear()

        def call(command):
            assert command[-1] == "stanza-create" and "--stanza=main" in command
            codes.append(queue.pop(0))
            return codes[-1]
        monkeypatch.setattr(agent.subprocess, "call", call)

    answers(50, 50, 0)
    assert agent.cmd_stanza_create(args) == 0 and codes == [50, 50, 0]
    answers(28)
    assert agent.cmd_stanza_create(args) == 28 and codes == [28]
    answers(*([50] * 5))
    assert agent.cmd_stanza_create(args, tries=5) == 50 and len(codes) == 5

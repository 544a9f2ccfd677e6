"""webstack-vault (webstack_agent/vault.py): the backup host's root-owned copies, with real rsync
on temporary directories. The lab test deletes a repository from a database host and restores
every row from the vault (tests/integration/test_backup.py)."""

from __future__ import annotations

import calendar
import os
import pwd
import time
from pathlib import Path

import pytest

from roles.backup.settings import BackupSettings
from webstack_agent import vault

OWNER = pwd.getpwuid(os.getuid()).pw_name


def _repo(root: Path, cluster: str = "main") -> Path:
    """A repository as pgBackRest lays it out: info files, one full backup, a WAL segment."""
    repo = root / cluster / "repo"
    for path, text in {
        "archive/main/archive.info": "a", "archive/main/archive.info.copy": "a",
        "archive/main/17-1/0000000100000000/000000010000000000000001-ab.gz": "wal1",
        "backup/main/backup.info": "b", "backup/main/backup.info.copy": "b",
        "backup/main/20261201-000000F/pg_data/PG_VERSION.gz": "17",
    }.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    return repo


def _run(tmp_path: Path, *argv: str) -> int:
    return vault.main(["--root", str(tmp_path / "root"), "--vault", str(tmp_path / "vault"), *argv])


def test_inspect_tells_a_complete_repository_from_an_emptied_one(tmp_path):
    repo = _repo(tmp_path)
    state = vault.inspect(str(repo))
    assert state.complete and state.stanzas == ("main",) and state.files == 6
    (repo / "backup/main/20261201-000000F/pg_data/PG_VERSION.gz").unlink()
    (repo / "backup/main/20261201-000000F/pg_data").rmdir()
    (repo / "backup/main/20261201-000000F").rmdir()
    assert vault.inspect(str(repo)).problem == "stanza main: no backup"
    (repo / "backup/main/backup.info").unlink()
    assert vault.inspect(str(repo)).problem == "stanza main: no backup.info"
    assert vault.inspect(str(tmp_path / "nothing")).problem == "no stanza in archive/"


def test_snapshots_are_root_owned_copies_linked_to_each_other_not_to_the_repository(tmp_path, capsys):
    repo = _repo(tmp_path / "root")
    assert _run(tmp_path, "snapshot") == 0
    time.sleep(1.1)  # snapshot names have a resolution of a second
    (repo / "archive/main/17-1/0000000100000000/000000010000000000000002-cd.gz").write_text("wal2")
    assert _run(tmp_path, "snapshot") == 0
    (first, _), (second, state) = vault.snapshots(str(tmp_path / "vault"), "main")
    assert state.complete and state.files == 7
    segment = "archive/main/17-1/0000000100000000/000000010000000000000001-ab.gz"
    a, b = (tmp_path / "vault/main" / first / segment), (tmp_path / "vault/main" / second / segment)
    assert a.stat().st_ino == b.stat().st_ino  # unchanged: one copy shared by both snapshots
    assert a.stat().st_ino != (repo / segment).stat().st_ino  # never the account's own file
    assert oct(a.stat().st_mode & 0o777) == "0o600" and a.stat().st_uid == os.getuid()
    assert oct((tmp_path / "vault").stat().st_mode & 0o777) == "0o700"
    assert not (tmp_path / "vault/main" / first / segment.replace("01-ab", "02-cd")).exists()


def test_an_emptied_repository_fails_the_run_and_latest_stays_the_last_complete_copy(tmp_path, capsys):
    repo = _repo(tmp_path / "root")
    assert _run(tmp_path, "snapshot") == 0
    (good, _), = vault.snapshots(str(tmp_path / "vault"), "main")
    for path in sorted(repo.rglob("*"), reverse=True):  # what `pgbackrest stanza-delete` leaves: nothing
        path.unlink() if path.is_file() else path.rmdir()
    time.sleep(1.1)
    assert _run(tmp_path, "snapshot") == 1
    assert "the repository of main was complete and is not any more" in capsys.readouterr().err
    time.sleep(1.1)
    assert _run(tmp_path, "snapshot") == 0  # already reported: one mail, not one an hour
    assert vault.pick(str(tmp_path / "vault"), "main", "latest") == good
    assert _run(tmp_path, "restore", "main", "latest", "--owner", OWNER) == 0
    assert (repo / "backup/main/20261201-000000F/pg_data/PG_VERSION.gz").read_text() == "17"
    assert oct((repo / "backup/main/backup.info").stat().st_mode & 0o777) == "0o600"
    assert "restored from snapshot " + good in capsys.readouterr().out
    assert vault.inspect(str(repo)).complete
    # A second restore keeps what the repository held then, aside in the vault.
    time.sleep(1.1)
    assert _run(tmp_path, "restore", "main", good, "--owner", OWNER) == 0
    aside = [p for p in (tmp_path / "vault/main").iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 2 and any((p / "backup/main/backup.info").exists() for p in aside)
    assert _run(tmp_path, "restore", "main", "20200101T000000Z", "--owner", OWNER) == 2
    assert "no snapshot '20200101T000000Z' of cluster 'main'" in capsys.readouterr().err


def _name(t: float) -> str:
    return time.strftime(vault.STAMP, time.gmtime(t))


def test_prune_keeps_two_days_hourly_then_a_daily_copy_then_the_last_complete_one():
    now = calendar.timegm((2026, 12, 31, 12, 30, 0))
    hourly = [(_name(now - h * 3600), True) for h in range(40 * 24, -1, -1)]
    gone = set(vault.to_prune(hourly, now))
    kept = [n for n, _ in hourly if n not in gone]
    assert all(n not in gone for n, _ in hourly if now - vault.epoch(n) < 48 * 3600)
    older = [n for n in kept if now - vault.epoch(n) >= 48 * 3600]
    assert len({n[:8] for n in older}) == len(older)  # one a day...
    assert all(n.endswith("T233000Z") for n in older)  # ...the day's last
    assert min(now - vault.epoch(n) for n in older) < 3 * 86400 and max(now - vault.epoch(n) for n in older) < 35 * 86400
    # Emptied 39 days ago and never complete since: the last complete copy is still there.
    broken = [(n, n < _name(now - 39 * 86400)) for n, _ in hourly]
    last_good = [n for n, ok in broken if ok][-1]
    assert last_good not in vault.to_prune(broken, now)


@pytest.mark.parametrize("fields,key", [
    ({"vault": "/srv/pgbackrest/vault"}, "vault"),
    ({"root": "/srv/vault/repos", "vault": "/srv/vault"}, "vault"),
    ({"vault": "/srv"}, "vault"),
    ({"vault_keep_days": 7}, "vault_keep_days"),
])
def test_backup_settings_refuse_a_vault_inside_a_chroot_or_too_short(fields, key):
    problem = BackupSettings(**fields).check()
    assert problem is not None and problem[0] == key
    assert BackupSettings().check() is None


def test_a_rewritten_wal_segment_fails_the_run_and_latest_skips_that_copy(tmp_path, capsys):
    """An intruder with the cipher passphrase could replace archived WAL with valid-looking ciphertext:
    the files exist, so only the rewrite tells. A file pgBackRest writes once that changed is flagged."""
    repo = _repo(tmp_path / "root")
    segment = repo / "archive/main/17-1/0000000100000000/000000010000000000000001-ab.gz"
    segment.rename(repo / "archive/main/17-1/0000000100000000/000000010000000000000001")
    segment = repo / "archive/main/17-1/0000000100000000/000000010000000000000001"
    assert _run(tmp_path, "snapshot") == 0
    (good, _), = vault.snapshots(str(tmp_path / "vault"), "main")
    time.sleep(1.1)
    segment.write_text("forged, longer than before")
    assert _run(tmp_path, "snapshot") == 1
    err = capsys.readouterr().err
    assert "rewritten after it was backed up: archive/main/17-1/0000000100000000/000000010000000000000001" in err
    assert vault.pick(str(tmp_path / "vault"), "main", "latest") == good
    kept = tmp_path / "vault/main" / good / "archive/main/17-1/0000000100000000/000000010000000000000001"
    assert kept.read_text() == "wal1"  # the vault's copy is its own file


def test_a_new_clusters_empty_repository_is_no_alarm(tmp_path):
    (tmp_path / "root" / "fresh" / "repo").mkdir(parents=True)
    assert _run(tmp_path, "snapshot") == 0
    (_, state), = vault.snapshots(str(tmp_path / "vault"), "fresh")
    assert not state.complete and state.problem == "no stanza in archive/"

#!/usr/bin/python3
"""webstack-vault: root-owned copies of the backup host's repositories (installed by webstack, do not edit).

    webstack-vault snapshot                  hourly timer: copy every repository into the vault
    webstack-vault list [CLUSTER]            the snapshots, newest last, with their state
    webstack-vault restore CLUSTER SNAPSHOT  put a snapshot back as the repository (``latest``:
                                             the newest complete one)

A database host writes its pgBackRest repository through the SFTP account ``pgbr-<cluster>``,
which owns the files and so can delete or overwrite them: a compromised database host could
wipe its own backups. Every hour this host copies each repository (``ROOT/<cluster>/repo``) to
``VAULT/<cluster>/<UTC time>``: owned by root, mode 0600 in 0700 directories, outside every
chroot. Snapshots share unchanged files by hard links between themselves (never with the
repository, whose files the account owns), so an hourly snapshot costs only what pgBackRest
wrote since the last one. All snapshots of the last 48 hours are kept, then the newest of each
UTC day for ``--keep-days`` (35: the repository keeps weeklies a month), and always the newest
complete one, however old.

A snapshot is *complete* when it holds a ``backup.info`` and at least one backup of each stanza
in its archive. A repository that was complete and no longer is (deleted from a database host)
is still copied, as evidence, and the run fails: the unit's failure mails the operator.

``restore`` moves what the repository holds aside to ``VAULT/<cluster>/replaced-<UTC time>``
(for a look at what the intruder left) and copies the snapshot in, owned by the account again.
The database host's next ``deploys/restore.py`` then restores from it as from any repository;
``deploys/restore.py --data vault=latest`` does both in one run.

Plain Python 3 standard library and rsync. Source: webstack_agent/vault.py.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

ROOT = "/srv/pgbackrest"
VAULT = "/srv/pgbackrest-vault"
KEEP_HOURS = 48
KEEP_DAYS = 35
STAMP = "%Y%m%dT%H%M%SZ"
SNAPSHOT = re.compile(r"^\d{8}T\d{6}Z$")
FULL_LABEL = re.compile(r"^\d{8}-\d{6}F(_\d{8}-\d{6}[DI])?$")


def account(cluster: str) -> str:
    """The SFTP account of a cluster's repository (the backup role creates it)."""
    return f"pgbr-{cluster}"


class VaultError(Exception):
    """A request the vault cannot serve (unknown cluster or snapshot)."""


@dataclass(frozen=True)
class State:
    """What a snapshot holds, written beside it as ``<name>.json``."""

    complete: bool
    files: int
    bytes: int
    stanzas: tuple[str, ...]
    problem: str = ""


def inspect(repo: str) -> State:
    """Is the repository copy at ``repo`` complete: for every stanza in ``archive/``, an
    ``archive.info``, a ``backup.info`` and at least one backup directory?"""
    files = size = 0
    for top, _dirs, names in os.walk(repo):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(top, name)).st_size
    archive = os.path.join(repo, "archive")
    stanzas = tuple(sorted(os.listdir(archive))) if os.path.isdir(archive) else ()
    problem = "" if stanzas else "no stanza in archive/"
    for stanza in stanzas:
        backup = os.path.join(repo, "backup", stanza)
        labels = [n for n in os.listdir(backup) if FULL_LABEL.match(n)] if os.path.isdir(backup) else []
        if not os.path.exists(os.path.join(archive, stanza, "archive.info")):
            problem = f"stanza {stanza}: no archive.info"
        elif not os.path.exists(os.path.join(backup, "backup.info")):
            problem = f"stanza {stanza}: no backup.info"
        elif not labels:
            problem = f"stanza {stanza}: no backup"
        if problem:
            break
    return State(complete=not problem, files=files, bytes=size, stanzas=stanzas, problem=problem)


def snapshots(vault: str, cluster: str) -> list[tuple[str, State]]:
    """The cluster's finished snapshots, oldest first, with their recorded state."""
    where = os.path.join(vault, cluster)
    out = []
    for name in sorted(os.listdir(where)) if os.path.isdir(where) else []:
        if SNAPSHOT.match(name) and os.path.isdir(os.path.join(where, name)):
            try:
                with open(os.path.join(where, name + ".json")) as f:
                    raw = json.load(f)
                state = State(**{**raw, "stanzas": tuple(raw["stanzas"])})
            except (OSError, ValueError, TypeError, KeyError):
                state = inspect(os.path.join(where, name))
            out.append((name, state))
    return out


def epoch(name: str) -> float:
    return calendar.timegm(time.strptime(name, STAMP))


def to_prune(names: list[tuple[str, bool]], now: float, keep_hours: int = KEEP_HOURS,
             keep_days: int = KEEP_DAYS) -> list[str]:
    """Which of the snapshots ``(name, complete)`` (oldest first) go: those older than
    ``keep_hours`` that are not the newest of their UTC day, those older than ``keep_days``,
    but never the newest complete snapshot (an intruder who empties the repository and waits
    does not age the last good copy out)."""
    completes = [n for n, ok in names if ok]
    last_good = completes[-1] if completes else None
    newest_of_day: dict[str, str] = {}
    for name, _ok in names:
        newest_of_day[name[:8]] = name
    out = []
    for name, _ok in names:
        age = now - epoch(name)
        keep = age < keep_hours * 3600 or (age < keep_days * 86400 and newest_of_day[name[:8]] == name)
        if not keep and name != last_good:
            out.append(name)
    return out


# Files pgBackRest writes once and never again: WAL segments, and the data files of a backup.
# One that changed after it was copied was written by someone else.
IMMUTABLE = re.compile(r"^(archive/[^/]+/[^/]+/[0-9A-F]{16}/[0-9A-F]{24}|backup/[^/]+/[^/]+/pg_data/)")
VANISHED = 24  # rsync: "some files vanished before they could be transferred" (pgBackRest's expire)


def rsync(src: str, dest: str, *extra: str) -> list[str]:
    """Copy ``src`` into ``dest``; the paths rsync itemized as changed (not new) regular files."""
    proc = subprocess.run(["rsync", "-rlti", "--delete", "--exclude=*.pgbackrest.tmp", *extra,
                           src.rstrip("/") + "/", dest], capture_output=True, text=True)
    if proc.returncode not in (0, VANISHED):
        raise VaultError(f"rsync {src} -> {dest} exited {proc.returncode}: {proc.stderr.strip()[-1000:]}")
    changed = []
    for line in proc.stdout.splitlines():
        flags, _, path = line.partition(" ")
        if flags.startswith(">f") and "+++++++++" not in flags:
            changed.append(path)
    return changed


def locked(vault: str):
    """An exclusive lock on the vault for the whole command (the timer's snapshot and a restore
    never overlap)."""
    import fcntl

    os.makedirs(vault, mode=0o700, exist_ok=True)
    handle = open(os.path.join(vault, ".lock"), "a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def snapshot_one(root: str, vault: str, cluster: str, now: float) -> tuple[str, State, State | None]:
    """Copy one repository; returns (name, its state, the previous snapshot's state)."""
    where = os.path.join(vault, cluster)
    os.makedirs(where, mode=0o700, exist_ok=True)
    previous = snapshots(vault, cluster)
    name = time.strftime(STAMP, time.gmtime(now))
    partial = os.path.join(where, ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # No owner or group copied: rsync running as root creates the files as root. Backups before the
    # archive: a backup.info written while this runs then names only backups whose WAL is in the
    # archive copied after it (pgBackRest archives a backup's last segment before recording it).
    repo = os.path.join(root, cluster, "repo")
    last = os.path.join(where, previous[-1][0]) if previous else ""

    def link(sub: str) -> list[str]:
        return [f"--link-dest={os.path.join(last, sub)}"] if last and os.path.isdir(os.path.join(last, sub)) else []

    changed = rsync(repo, partial, "--chmod=D700,F600", "--exclude=/archive/", *link(""))
    if os.path.isdir(os.path.join(repo, "archive")):
        changed += ["archive/" + p for p in rsync(os.path.join(repo, "archive"), os.path.join(partial, "archive"),
                                                  "--chmod=D700,F600", *link("archive"))]
    state = inspect(partial)
    rewritten = [p for p in changed if IMMUTABLE.match(p)]
    if rewritten:
        state = State(complete=False, files=state.files, bytes=state.bytes, stanzas=state.stanzas,
                      problem=f"rewritten after it was backed up: {rewritten[0]}"
                              + (f" and {len(rewritten) - 1} more" if len(rewritten) > 1 else ""))
    with open(os.path.join(where, name + ".json"), "w") as f:
        json.dump(asdict(state), f)
    os.rename(partial, os.path.join(where, name))
    return name, state, previous[-1][1] if previous else None


def clusters(root: str) -> list[str]:
    return sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c, "repo"))) \
        if os.path.isdir(root) else []


def cmd_snapshot(args: argparse.Namespace) -> int:
    lock = locked(args.vault)
    os.chmod(args.vault, 0o700)
    now, failed = time.time(), 0
    for cluster in clusters(args.root):
        try:
            name, state, before = snapshot_one(args.root, args.vault, cluster, now)
        except (OSError, VaultError) as e:  # the other clusters are still copied
            print(f"webstack-vault: {cluster}: no snapshot: {e}", file=sys.stderr)
            failed = 1
            continue
        print(f"{cluster}: snapshot {name}: {state.files} files, {state.bytes} bytes"
              + ("" if state.complete else f", INCOMPLETE: {state.problem}"))
        if not state.complete and before is not None and before.complete:
            print(f"webstack-vault: the repository of {cluster} was complete and is not any more "
                  f"({state.problem}): deleted or rewritten from a database host? The last complete copy "
                  f"is kept; webstack-vault restore {cluster} latest puts it back", file=sys.stderr)
            failed = 1
        listed = snapshots(args.vault, cluster)
        for old in to_prune([(n, s.complete) for n, s in listed], now, args.keep_hours, args.keep_days):
            shutil.rmtree(os.path.join(args.vault, cluster, old))
            os.unlink(os.path.join(args.vault, cluster, old + ".json"))
            print(f"{cluster}: pruned {old}")
    lock.close()
    return failed


def cmd_list(args: argparse.Namespace) -> int:
    for cluster in [args.cluster] if args.cluster else sorted(os.listdir(args.vault)):
        for name, state in snapshots(args.vault, cluster):
            print(f"{cluster}\t{name}\t{'complete' if state.complete else 'INCOMPLETE ' + state.problem}\t"
                  f"{state.files} files\t{state.bytes} bytes")
    return 0


def pick(vault: str, cluster: str, wanted: str) -> str:
    """The snapshot ``wanted`` names (``latest``: the newest complete one)."""
    listed = snapshots(vault, cluster)
    if not listed:
        raise VaultError(f"no snapshot of cluster {cluster!r} in {vault}")
    if wanted == "latest":
        completes = [n for n, s in listed if s.complete]
        if not completes:
            raise VaultError(f"no complete snapshot of cluster {cluster!r} in {vault}")
        return completes[-1]
    if wanted not in dict(listed):
        raise VaultError(f"no snapshot {wanted!r} of cluster {cluster!r}: webstack-vault list {cluster}")
    return wanted


def cmd_restore(args: argparse.Namespace) -> int:
    lock = locked(args.vault)
    name = pick(args.vault, args.cluster, args.snapshot)
    chroot = os.path.join(args.root, args.cluster)
    repo = os.path.join(chroot, "repo")
    user = pwd.getpwnam(args.owner or account(args.cluster))
    if not os.path.isdir(repo):
        raise VaultError(f"{repo} does not exist: converge the backup host first (deploys/site.py)")
    # Built beside the repository in a directory only root can enter (the chroot is root's), owned
    # by the account once complete, then swapped in by rename: root never writes into a directory
    # the account controls, and a failed copy leaves the repository as it was.
    new, old = os.path.join(chroot, ".restore"), os.path.join(chroot, ".replaced")
    for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    os.mkdir(new, 0o700)
    rsync(os.path.join(args.vault, args.cluster, name), new, "--chmod=D700,F600")
    subprocess.run(["chown", "-R", "--no-dereference", f"{user.pw_uid}:{user.pw_gid}", new], check=True)
    os.rename(repo, old)
    os.rename(new, repo)
    aside = os.path.join(args.vault, args.cluster, "replaced-" + time.strftime(STAMP, time.gmtime()))
    shutil.move(old, aside)
    subprocess.run(["chown", "-R", "--no-dereference", "root:root", aside], check=True)
    os.chmod(aside, 0o700)
    print(f"webstack-vault: {args.cluster}: repository restored from snapshot {name}; "
          f"what it held is in {aside}")
    lock.close()
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="webstack-vault", description=__doc__.split("\n")[0])
    p.add_argument("--root", default=ROOT, help="directory holding one chroot per cluster")
    p.add_argument("--vault", default=VAULT, help="directory of the root-owned copies")
    sub = p.add_subparsers(dest="cmd", required=True)
    snap = sub.add_parser("snapshot", help="copy every repository into the vault, then prune")
    snap.add_argument("--keep-hours", type=int, default=KEEP_HOURS)
    snap.add_argument("--keep-days", type=int, default=KEEP_DAYS)
    listing = sub.add_parser("list", help="the snapshots")
    listing.add_argument("cluster", nargs="?")
    rest = sub.add_parser("restore", help="put a snapshot back as the repository")
    rest.add_argument("cluster")
    rest.add_argument("snapshot", help="a snapshot name from list, or latest")
    rest.add_argument("--owner", default="", help="the account that owns the repository (default pgbr-CLUSTER)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return {"snapshot": cmd_snapshot, "list": cmd_list, "restore": cmd_restore}[args.cmd](args)
    except VaultError as e:
        print(f"webstack-vault: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

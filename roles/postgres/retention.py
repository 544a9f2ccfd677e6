"""A model of pgBackRest's count-based expiry, to know which backups a policy keeps.

Retention here depends only on the order and type of backups, never on their
age, so the policy can be tested without waiting a month: the unit tests
simulate weeks of the hourly schedule against this model, and an integration
test drives real pgBackRest through a fixed sequence and requires exactly the
model's survivors. The rules (pgBackRest src/command/expire/expire.c):

- full retention N: every full but the N newest expires, with every backup that depends on it;
- differential retention M counts fulls *and* differentials: of those older than
  the M newest, the differentials expire (never a full), each with its dependents;
- an incremental never expires on its own, only with the backup its chain starts from.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backup:
    """One backup set: label, type (full | diff | incr), the label it is based on, stop time (s)."""

    label: str
    type: str
    prior: str | None
    stop: float = 0.0


def add(backups: list[Backup], kind: str, label: str, stop: float = 0.0) -> list[Backup]:
    """The list with one more backup, based as pgBackRest bases it: a differential
    on the newest full, an incremental on the newest backup of any type."""
    if kind == "full" or not backups:
        prior = None
    elif kind == "diff":
        prior = next(b.label for b in reversed(backups) if b.type == "full")
    else:
        prior = backups[-1].label
    return [*backups, Backup(label, "full" if prior is None else kind, prior, stop)]


def _with_dependents(backups: list[Backup], root: str) -> set[str]:
    gone = {root}
    for b in backups:  # oldest first, so a chain is followed in one pass
        if b.prior in gone:
            gone.add(b.label)
    return gone


def expire(backups: list[Backup], full: int, diff: int) -> list[Backup]:
    """The backups left after ``pgbackrest expire`` with the given retention counts."""
    gone: set[str] = set()
    fulls = [b for b in backups if b.type == "full"]
    for b in fulls[: max(0, len(fulls) - full)]:
        gone |= _with_dependents(backups, b.label)
    left = [b for b in backups if b.label not in gone]
    anchors = [b for b in left if b.type in ("full", "diff")]
    for b in anchors[: max(0, len(anchors) - diff)]:
        if b.type == "diff":
            gone |= _with_dependents(left, b.label)
    return [b for b in backups if b.label not in gone]

"""The ``--data`` options of every deploy, declared once (typed, documented, unknown keys refused).

``pyinfra inventories/<env>.py deploys/<name>.py --data key=value``: the
inventory file checks every ``key`` against the deploy's class here before
pyinfra connects (``webstack.options``); the deploy reads them typed with
``roles._lib.options(Cls)``. A new option is a field here; a new deploy adds
its class to ``roles.registry.DEPLOYS``. The README table is generated from
these declarations (``webstack docs``).
"""

from __future__ import annotations

from dataclasses import dataclass

from webstack.options import option


@dataclass(frozen=True)
class RolloutOptions:
    """deploys/site.py and deploys/rollout.py: the rolling application step."""

    release: str = option("", "release id to run instead of the one built from the working tree (or app__git_ref)")


@dataclass(frozen=True)
class MaintenanceOptions:
    """deploys/maintenance.py."""

    state: str = option("", "on: application paths answer 503 on every load balancer; off: they are served again")
    retry_after: str = option("600", "seconds the Retry-After header of the 503 answers")
    message: str = option("We are down for planned maintenance and will be back shortly.",
                          "the sentence on the maintenance page")


@dataclass(frozen=True)
class RollbackOptions:
    """deploys/rollback.py."""

    release: str = option("", "release id to go back to (default: each server's previous release)")


@dataclass(frozen=True)
class SwitchoverOptions:
    """deploys/switchover.py."""

    to: str = option("", "the replica to promote (needed when the cluster has more than one)")
    write_inventory: bool = option(False, "write postgres__primary into the inventory files (else only print the change)")
    force: bool = option(False, "switch over even while WAL waits for the backup repository (leaves a gap in the archive)")


@dataclass(frozen=True)
class FailoverOptions:
    """deploys/failover.py."""

    to: str = option("", "the replica to promote (needed when more than one is running)")
    write_inventory: bool = option(False, "write postgres__primary into the inventory files (else only print the change)")


@dataclass(frozen=True)
class RejoinOptions:
    """deploys/rejoin.py."""

    reclone: bool = option(False, "replace the former primary's data by a fresh base backup instead of pg_rewind")
    write_inventory: bool = option(
        False, "when the inventory still names the old primary but a member recorded its own promotion (a "
               "switchover or failover killed before it finished), write postgres__primary into the inventory files")
    discard_divergent: bool = option(
        False, "rewind even though the former primary committed transactions the new primary never received "
               "(they are saved under /var/lib/postgresql/webstack-divergent first)")


@dataclass(frozen=True)
class RestoreOptions:
    """deploys/restore.py."""

    source: str = option("", "cluster whose backups to restore (another cluster: the target is a drill host)", key="from")
    time: str = option("", "point in time to recover to, e.g. '2026-11-27 10:41:07+00' (default: the end of the archive)")
    confirm: str = option("", "the target's name: it already holds a data directory, replace it")
    check_sql: str = option("", "query run on the restored server and printed (default: list the databases)")
    check_db: str = option("postgres", "database the check query runs in")
    vault: str = option("", "first put this root-owned copy back as the repository (`latest`: the newest complete "
                            "one; `webstack-vault list` on the backup host names them): after a repository was "
                            "deleted or damaged from a database host")


@dataclass(frozen=True)
class JobsOptions:
    """deploys/jobs.py: the job queue's dead letters."""

    requeue: str = option("", "job ids to put back in the queue (comma-separated), or `all`; empty = only list them")


@dataclass(frozen=True)
class PatchOptions:
    """deploys/patch.py: the monthly patch run (roles/patch.py)."""

    start_from: str = option("", "resume a stopped run at this host (the error names it)", key="from")
    switch_back: bool = option(True, "switch each cluster back to its inventory primary after patching it "
                                     "(no: leave the replica promoted and write postgres__primary)")
    report: str = option("patch-report.json", "file on the control machine for the run's JSON report")
    health_timeout: int = option(180, "seconds a patched host has to pass its health checks")
    always_reboot: bool = option(False, "reboot every host whether or not its upgrade needs it")

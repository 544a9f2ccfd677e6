"""Restore a PostgreSQL cluster from its encrypted pgBackRest repository.

    pyinfra inventories/<env>.py deploys/restore.py --limit TARGET --limit BACKUP_HOST [--data ...]

    --data from=CLUSTER     restore another cluster's backups (TARGET is a drill host)
    --data time='2026-11-27 10:41:07+00'   point in time (default: the end of the archive)
    --data confirm=TARGET   TARGET already holds a data directory: replace it
    --data check_sql='select count(*) from orders' [--data check_db=app]   printed afterwards
    --data vault=latest     first put the backup host's newest complete root-owned copy back as the
                            repository (or a snapshot name from `webstack-vault list` there)
    (declared in roles/options.py RestoreOptions; any other key is refused before connecting)

Include the backup host in --limit: its SSH host key is read from it, and new
machines are admitted to the repository account first.
See roles/postgres/restore.py and README "Backups".
"""

from pyinfra import host, inventory, state
from pyinfra.api.exceptions import OperationError

from roles import audit
from roles._lib import barrier, config, options
from roles.backup import deploy as backup
from roles.base import deploy as base
from roles.options import RestoreOptions
from roles.postgres import deploy as postgres
from roles.postgres import restore
from roles.postgres.settings import PostgresSettings

cfg = config()
if "backup" in cfg.roles:
    # Converge the backup host under this inventory first: a new machine's
    # address must be in its firewall and in the account's from= list.
    base.apply()
    backup.apply()
    request = options(RestoreOptions)
    if request.vault:
        # The cluster restored: --data from=, or the one of the database hosts in this run.
        run = state.active_hosts or set(inventory)
        clusters = {request.source} if request.source else {
            config(h).settings(PostgresSettings).cluster for h in run if "postgres" in config(h).roles}
        if len(clusters) != 1:
            raise OperationError(f"--data vault: which cluster's repository? {sorted(clusters)}: "
                                 "limit the run to one cluster's hosts or name it with --data from=CLUSTER")
        backup.restore_from_vault(request.vault, clusters.pop())
# pyinfra runs the hosts' operations side by side, step by step (README "Order of operations"):
# without this barrier a database host could mount the repository before the backup host
# admitted it (a longer base role on the backup host was enough to make that happen).
barrier(name="Backup host converged", label="restore")
if "postgres" in cfg.roles and "backup" not in cfg.roles:
    request = restore.plan(options(RestoreOptions))
    postgres.apply(restoring=not request.drill)
    restore.restore(request)
elif "backup" not in cfg.roles:
    host.noop("neither a backup host nor a postgres host")

# The audit trail: a line on each server this run changed, and one for the run here (roles/audit.py).
audit.note("restored_to", options(RestoreOptions).time or "the end of the archive")
audit.record("restore")

"""PostgreSQL switchover: see roles/postgres/orchestrate.py and README "Database operations".

    pyinfra inventories/<env>.py deploys/switchover.py --limit <cluster group> [--data ...] [--dry]
"""

from roles import audit
from roles.postgres import orchestrate

orchestrate.switchover()

# The audit trail: a line on each server this run changed, and one for the run here (roles/audit.py).
audit.record("switchover")

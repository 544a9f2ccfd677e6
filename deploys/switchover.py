"""PostgreSQL switchover: see roles/postgres/orchestrate.py and README "Database operations".

    pyinfra inventories/<env>.py deploys/switchover.py --limit <cluster group> [--data ...] [--dry]
"""

from roles.postgres import orchestrate

orchestrate.switchover()

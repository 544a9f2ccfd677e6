"""PostgreSQL rejoin: see roles/postgres/orchestrate.py and README "Database operations".

    pyinfra inventories/<env>.py deploys/rejoin.py --limit <cluster group> [--data ...] [--dry]
"""

from roles.postgres import orchestrate

orchestrate.rejoin()

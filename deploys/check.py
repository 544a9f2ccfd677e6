"""Operational checks; exits non-zero when one fails.

    pyinfra inventories/<env>.py deploys/check.py [--limit web]

- load balancers: the served certificate expires later than lb__cert_warning_days;
- database primaries with backups: ``pgbackrest check`` passes (WAL reaches the
  repository), no WAL waits longer than postgres__backup_check_max_wal_lag_s,
  and the newest backup of each kind is younger than its threshold.
"""

from roles.lb import check
from roles.postgres import backup

check.certificate()
backup.check()

"""Operational checks; exits non-zero when one fails.

    pyinfra inventories/<env>.py deploys/check.py [--limit web]

- load balancers: the served certificate expires later than lb__cert_warning_days;
- database primaries with backups: ``pgbackrest check`` passes (WAL reaches the
  repository), no WAL waits longer than postgres__backup_check_max_wal_lag_s,
  and the newest backup of each kind is younger than its threshold;
- the job queue (first worker host): jobs ready, the oldest one's wait and dead
  letters within worker__max_queue_depth, worker__max_queue_age, worker__max_dead.
"""

from roles.lb import check
from roles.postgres import backup
from roles.worker import check as worker_check

check.certificate()
backup.check()
worker_check.queue()

"""The job queue's dead letters: list them, re-queue some.

    pyinfra inventories/<env>.py deploys/jobs.py --limit worker [--data requeue=ID[,ID...]|all]

Runs on the first worker host of the run (one queue in the database for all of them).
"""

from roles.worker import check

check.dead_letters()

"""The monthly patch run, tier by tier, one host at a time: see roles/patch.py.

    pyinfra inventories/<env>.py deploys/patch.py [--limit ...] [--data from=HOST] [--dry]
"""

from roles import audit, patch

patch.run()

# The audit trail: a line on each server this run changed, and one for the run here (roles/audit.py).
audit.record("patch")

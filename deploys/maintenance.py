"""Maintenance mode: the load balancers answer the application's paths with 503 (Retry-After).

    pyinfra inventories/<env>.py deploys/maintenance.py --data state=on|off [--data retry_after=600]

See roles/lb/maintenance.py.
"""

from roles import audit
from roles.lb import maintenance

maintenance.run()

# The audit trail: a line on each server this run changed, and one for the run here (roles/audit.py).
audit.record("maintenance")

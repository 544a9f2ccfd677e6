"""Roll the application out to its servers one at a time (drained from the load balancers).

    pyinfra inventories/<env>.py deploys/rollout.py --limit web [--data release=ID]

The same rolling step deploys/site.py ends with, without the rest of site.
"""

from roles import audit
from roles._lib import options
from roles.app import rolling
from roles.options import RolloutOptions

rolling.converge(options(RolloutOptions).release)

# The audit trail: a line on each server this run changed, and one for the run here (roles/audit.py).
audit.record("rollout")

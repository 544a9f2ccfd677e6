"""Roll every application server back to the release before its current one (or --data release=ID).

    pyinfra inventories/<env>.py deploys/rollback.py --limit web

One server at a time, drained from the load balancers. The next site or
rollout run deploys the working tree (or app__git_ref) again: pin a release
with app__git_ref to keep the rollback.
"""

from roles import audit
from roles._lib import options
from roles.app import rolling
from roles.options import RollbackOptions

rolling.converge(release=options(RollbackOptions).release or "previous")

# The audit trail: a line on each server this run changed, and one for the run here (roles/audit.py).
audit.record("rollback")

"""Build or converge every host: the base role, then the host's roles, then the rolling step.

    pyinfra inventories/<env>.py deploys/site.py [--data release=ID]

Order (README "Order of operations"): on one host, operations run in the order
of the lines below; across hosts, pyinfra runs them step by step, and the
rolling step keeps its cross-host order with barriers. Each role is called
from its own line, so no two roles' operations are ever taken for one.
"""

from roles import _lib, audit
from roles.app import deploy as app
from roles.app import rolling
from roles.backup import deploy as backup
from roles.base import deploy as base
from roles.lb import deploy as lb
from roles.mailprovider import deploy as mailprovider
from roles.options import RolloutOptions
from roles.postgres import deploy as postgres
from roles.worker import deploy as worker

mine = _lib.config().roles
base.apply()
if "backup" in mine:  # repository accounts before any database host creates its stanza
    backup.apply()
if "postgres" in mine:
    postgres.apply()
if "app" in mine:  # an application server on a database host (stage 1) finds its database
    app.apply()
if "worker" in mine:
    worker.apply()
if "lb" in mine:
    lb.apply()
if "mailprovider" in mine:  # lab only: the stand-in email provider
    mailprovider.apply()

# Application releases and restarts roll through the worker hosts, then the
# application servers, one at a time; application servers are drained from the
# load balancers (all worker, app and lb hosts take part).
rolling.converge(_lib.options(RolloutOptions).release)

# The audit trail: a line on each server this run changed, and one for the run here (roles/audit.py).
audit.record("site")

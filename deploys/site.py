"""Build or converge every host: the base role, then the host's roles in dependency order.

    pyinfra inventories/<env>.py deploys/site.py
"""

from importlib import import_module

from roles import base
from roles._lib import config
from roles.app import rolling
from roles.registry import ordered_roles

base.apply()
for _role in ordered_roles(config().roles):
    import_module(f"roles.{_role}").apply()

# Application releases and restarts roll through the application servers one
# at a time, drained from the load balancers (all app and lb hosts take part).
rolling.converge()

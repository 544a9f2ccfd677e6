"""Build or converge every host: the base role, then the host's roles in dependency order.

    pyinfra inventories/<env>.py deploys/site.py
"""

from importlib import import_module

from roles import backup, base
from roles._lib import config
from roles.app import rolling
from roles.registry import ordered_roles

base.apply()
# Backup hosts first: pyinfra orders operations by their line in this file, so
# the repository accounts exist before any database host creates its stanza.
if "backup" in config().roles:
    backup.apply()
for _role in ordered_roles(config().roles):
    if _role != "backup":
        import_module(f"roles.{_role}").apply()

# Application releases and restarts roll through the application servers one
# at a time, drained from the load balancers (all app and lb hosts take part).
rolling.converge()

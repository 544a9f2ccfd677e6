"""pyinfra inventory for the local lab: `pyinfra inventories/lab.py deploys/site.py`.

Hosts come from inventories/lab/hosts.yml (written by `python -m lab up`),
settings from inventories/lab/group_data and host_data, secrets from
inventories/lab/secrets.age. Everything is validated before pyinfra connects.
"""

from webstack.inventory import pyinfra_groups as _groups

globals().update(_groups(__file__))

"""pyinfra inventory for the example production inventory (copy it).

Hosts come from inventories/example-production/hosts.yml ,
settings from inventories/example-production/group_data and host_data, secrets from
inventories/example-production/secrets.age. Everything is validated before pyinfra connects.
"""

from webstack.inventory import pyinfra_groups as _groups

globals().update(_groups(__file__))

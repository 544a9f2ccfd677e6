"""The stack at a glance, read-only: run by `webstack status INVENTORY` (see roles/status.py).

    pyinfra inventories/<env>.py deploys/status.py --dry
"""

from roles import status

status.collect()

"""The monthly patch run, tier by tier, one host at a time: see roles/patch.py.

    pyinfra inventories/<env>.py deploys/patch.py [--limit ...] [--data from=HOST] [--dry]
"""

from roles import patch

patch.run()

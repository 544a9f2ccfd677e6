"""Operational checks; exits non-zero when one fails.

    pyinfra inventories/<env>.py deploys/check.py [--limit web]

- load balancers: the served certificate expires later than lb__cert_warning_days.
"""

from roles.lb import check

check.certificate()

"""webstack tooling: inventory loading, typed settings, secrets and validation.

The roles themselves live in the ``roles`` package; this package is what turns
YAML inventories into validated, typed per-host configuration before pyinfra
connects to anything.
"""

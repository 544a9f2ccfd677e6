"""webstack tooling: inventory loading, typed settings and deploy options, secrets, docs, validation.

This package knows no role: the ``roles`` package hands it a catalog (roles,
settings classes, deploy options, cross-host checks) through the
``webstack.catalog`` entry point, so the dependency points one way only.
"""

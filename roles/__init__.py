"""webstack roles: one subpackage per role, each with ``settings.py`` (typed,
pyinfra-free declarations) and ``__init__.py`` (the ``@deploy()`` functions).

``roles.registry`` lists the roles an inventory may name.
"""

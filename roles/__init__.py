"""webstack roles: one subpackage per role, each with ``settings.py`` (typed,
pyinfra-free declarations) and ``deploy.py`` (the ``@deploy()`` functions).

``roles.registry`` lists the roles an inventory may name (handed to the
tooling as its catalog), ``roles.topology`` answers every cross-host
question, ``roles.options`` declares the deploys' ``--data`` options.
"""

"""The postgres role: ``settings.py`` (pyinfra-free), ``deploy.py`` (primary or replica), ``backup.py``,
``restore.py``, ``orchestrate.py`` (switchover, failover, rejoin), ``facts.py``."""

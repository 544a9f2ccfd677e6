"""The worker role: ``settings.py`` (pyinfra-free), ``deploy.py`` (units, timers, releases)."""

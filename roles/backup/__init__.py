"""The backup role: ``settings.py`` (pyinfra-free), ``deploy.py`` (repository accounts)."""

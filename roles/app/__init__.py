"""The app role: ``settings.py`` (pyinfra-free), ``deploy.py`` (server, releases), ``rolling.py``."""

"""The lb role: ``settings.py`` (pyinfra-free), ``deploy.py`` (nginx, keepalived), ``check.py``."""

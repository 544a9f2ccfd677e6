"""The base role (every host): ``settings.py`` (pyinfra-free), ``deploy.py`` (operations), ``facts.py``."""

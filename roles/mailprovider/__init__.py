"""The mailprovider role (lab only): ``settings.py`` (pyinfra-free), ``deploy.py`` (Postfix + Dovecot SASL)."""

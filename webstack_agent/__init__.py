"""Programs webstack installs onto the servers, each module one self-contained file.

A module here runs on Debian 12 (Python 3.11) and Debian 13 (Python 3.13) with the
standard library only: it imports nothing from pyinfra, jinja2 or the rest of this
repository (tests/unit/test_backup.py checks), because the role copies the single
file to the server (``roles/postgres/backup.py`` installs ``backup.py`` as
``/usr/local/lib/webstack/webstack-backup``). On the control machine the roles import
it for its constants and its configuration schema, and the unit tests import it.
"""

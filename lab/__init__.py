"""webstack lab: a fleet of systemd-nspawn Debian machines on one control machine.

Run ``python -m lab --help`` from the repository root (as root).
"""

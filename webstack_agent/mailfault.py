#!/usr/bin/python3
"""mail-fault: make the lab's stand-in mail provider misbehave on purpose (installed by webstack).

    mail-fault 4xx      submissions answered "451 4.3.0" (temporary failure) until `mail-fault off`
    mail-fault down     Postfix stopped: connections to 587 refused
    mail-fault off      healthy again (table emptied, Postfix started and reloaded)
    mail-fault status   prints off, 4xx or down

The 4xx fault is one rule in Postfix's submission restrictions (``FAULT_TABLE``, a PCRE
client-access table the mailprovider role creates empty), applied with ``postfix reload``.

Plain Python 3 standard library. Source: webstack_agent/mailfault.py.
"""

from __future__ import annotations

import subprocess
import sys

FAULT_TABLE = "/etc/postfix/webstack-fault.pcre"
RULE = "/./\t451 4.3.0 Temporary failure, try again later (webstack lab fault)\n"
HEADER = "# mail-fault: the lab provider's injected faults (empty = healthy). Managed by `mail-fault on|off`.\n"


def table(fault: bool) -> str:
    """The fault table's content with the 4xx fault on or off."""
    return HEADER + (RULE if fault else "")


def _write(fault: bool) -> None:
    tmp = FAULT_TABLE + ".new"
    with open(tmp, "w") as f:
        f.write(table(fault))
    subprocess.run(["mv", "-f", tmp, FAULT_TABLE], check=True)


def _systemctl(*args: str) -> int:
    return subprocess.run(["systemctl", *args]).returncode


def status() -> str:
    """off, 4xx or down."""
    if subprocess.run(["systemctl", "is-active", "-q", "postfix"]).returncode != 0:
        return "down"
    try:
        with open(FAULT_TABLE) as f:
            return "4xx" if RULE.strip() in f.read() else "off"
    except FileNotFoundError:
        return "off"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    what = args[0] if len(args) == 1 else ""
    if what == "status":
        print(status())
        return 0
    if what == "down":
        return _systemctl("stop", "postfix")
    if what in ("4xx", "off", "on"):
        _write(what != "off")
        # Started if it was down, else reloaded: the table is read when smtpd processes start.
        return _systemctl("start", "postfix") or _systemctl("reload", "postfix")
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

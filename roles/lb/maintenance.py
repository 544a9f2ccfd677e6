"""Maintenance mode on the load balancers (deploys/maintenance.py).

    pyinfra inventories/<env>.py deploys/maintenance.py --data state=on|off [--data retry_after=600]

``on``: every load balancer answers the application's paths with a 503 page and a
``Retry-After`` header, while the marketing site, ``/lb-health`` (keepalived) and
the ACME challenge path keep answering. The state is the file
``/etc/nginx/webstack-maintenance/on.conf``, which the site's application location
includes and which ``site`` never writes or removes: a site run in between keeps
the maintenance on. The file is checked by ``nginx -t`` in place before the
graceful reload; a second run with the same state changes nothing.
"""

from __future__ import annotations

import html

from pyinfra import host
from pyinfra.api import OperationError, deploy
from pyinfra.facts.files import File
from pyinfra.operations import files, server

from roles._lib import PENDING_DIR, config, options, owed_action, render, validated_file
from roles.options import MaintenanceOptions

DIRECTORY = "/etc/nginx/webstack-maintenance"
FILE = f"{DIRECTORY}/on.conf"


def content(retry_after: int, message: str) -> str:
    escaped = html.escape(message).replace("\\", "\\\\").replace("$", "&#36;")
    return render("lb/etc/nginx/webstack-maintenance/on.conf.j2", retry_after=retry_after, message=escaped)


@deploy("Maintenance")
def run() -> None:
    cfg = config()
    request = options(MaintenanceOptions)
    if request.state not in ("on", "off"):
        raise OperationError(f"maintenance: --data state=on or state=off (got {request.state or 'nothing'!r})")
    if not request.retry_after.isdigit():
        raise OperationError(f"maintenance: --data retry_after: seconds, got {request.retry_after!r}")
    if "lb" not in cfg.roles:
        host.noop("not a load balancer")
        return
    files.directory(name="Maintenance directory", path=DIRECTORY, mode="755")
    swaps = []
    if request.state == "on":
        swaps.append(validated_file(name="Maintenance page on", dest=FILE,
                                    content=content(int(request.retry_after), request.message),
                                    validate="nginx -t -q", in_place=True, owes="reload-nginx"))
    elif host.get_fact(File, path=FILE) is not None:
        # The reload is recorded as owed first (as validated_file does): never lost with a cut-off run.
        swaps.append(server.shell(name="Maintenance page off", commands=[
            f"mkdir -p {PENDING_DIR} && touch {PENDING_DIR}/reload-nginx && rm -f {FILE}"]))
    else:
        host.noop("maintenance is off")
    owed_action("reload-nginx", "nginx -t -q && systemctl reload nginx", swaps)

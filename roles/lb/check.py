"""Checks an operator (or a timer) runs against load balancers: certificate expiry, VIP ownership."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from pyinfra import host
from pyinfra.api import FactBase, OperationError
from pyinfra.operations import python

from roles._lib import config
from roles.lb.settings import LbSettings


class CertificateNotAfter(FactBase):
    """Expiry (UTC) of the certificate nginx serves, or None when there is none."""

    def command(self, path: str) -> str:
        return f"openssl x509 -noout -enddate -in {path} 2>/dev/null | cut -d= -f2 || true"

    def process(self, output: Sequence[str]) -> datetime | None:
        value = "".join(output).strip()
        if not value:
            return None
        return datetime.strptime(value, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC)


def certificate() -> None:
    """Fail when the served certificate expires within ``lb__cert_warning_days``."""
    cfg = config()
    if "lb" not in cfg.roles:
        host.noop("not a load balancer")
        return
    days = cfg.settings(LbSettings).cert_warning_days
    not_after = host.get_fact(CertificateNotAfter, path="/etc/nginx/tls/webstack.crt")
    if not_after is None:
        raise OperationError(f"{cfg.name}: no certificate at /etc/nginx/tls/webstack.crt")
    left = (not_after - datetime.now(UTC)).total_seconds() / 86400

    def report() -> None:
        if left < days:
            raise OperationError(f"{cfg.name}: certificate expires in {left:.1f} days ({not_after:%Y-%m-%d}); "
                                 f"threshold {days} days")

    python.call(name=f"Certificate valid for {left:.0f} more days (warn under {days})", function=report)

"""Settings of the lb role: nginx TLS terminator + keepalived pair (keys ``lb__<field>``)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from webstack.settings import setting


@dataclass(frozen=True)
class LbSettings:
    """A TLS-terminating load balancer; two of them share a floating IP."""

    server_names: tuple[str, ...] = setting(("www.example.com", "example.com"), "names served (first = canonical)")
    vip: str = setting("", "floating IP the pair shares (keepalived VRRP); empty = single load balancer")
    vip_prefix: int = setting(24, "prefix length of the VIP's subnet (the load balancers' own subnet)")
    vrrp_id: int = setting(51, "VRRP virtual router id, unique per pair on a network (1-255)")
    priority: int = setting(100, "VRRP priority; the highest healthy one holds the VIP")
    nopreempt: bool = setting(False, "a recovered higher-priority node does not take the VIP back")
    advert_interval: float = setting(0.25, "seconds between VRRP adverts (VRRPv3, 0.01-40); a backup takes the "
                                            "VIP about 3.5 adverts after the holder's last")
    upstream_group: str = setting("app", "group or role whose hosts serve the application")
    upstream_port: int = setting(8000, "port of the application servers")
    drained: tuple[str, ...] = setting((), "application hosts taken out of rotation")
    hsts_preload: bool = setting(False, "add 'preload' to HSTS (only once you mean to submit the domain)")
    ocsp_stapling: bool = setting(False, "staple OCSP responses (needs a CA with an OCSP responder)")
    marketing_root: str = setting("examples/marketing", "static marketing site (path in this repository)")
    marketing_paths: tuple[str, ...] = setting(("/", "/pricing"), "paths served from the marketing site, not the app")
    cert_warning_days: int = setting(21, "deploys/check.py fails when the certificate expires sooner")
    acme_directory: str = setting("", "ACME directory URL for `webstack certificate` (e.g. "
                                      "https://acme-v02.api.letsencrypt.org/directory); empty = tls_cert from elsewhere")
    acme_email: str = setting("", "contact address of the ACME account (expiry notices)")
    acme_ca_file: str = setting("", "CA bundle (path in the inventory directory) that verifies the ACME server's "
                                    "HTTPS; empty = the control machine's trust store")
    acme_renew_days: int = setting(30, "`webstack certificate` renews when the certificate expires sooner")

    def check(self) -> tuple[str, str] | None:
        """Field-level consistency; returns (key, message) on a problem."""
        if self.vip:
            try:
                ipaddress.ip_address(self.vip)
            except ValueError:
                return "vip", f"not an IP address: {self.vip!r}"
        if not 1 <= self.vrrp_id <= 255:
            return "vrrp_id", f"must be 1-255, got {self.vrrp_id}"
        if not 0.01 <= self.advert_interval <= 40:
            return "advert_interval", f"must be 0.01-40 seconds, got {self.advert_interval}"
        if not 1 <= self.priority <= 254:
            return "priority", f"must be 1-254, got {self.priority}"
        if not self.server_names:
            return "server_names", "at least one name"
        if self.acme_directory and not self.acme_directory.startswith("https://"):
            return "acme_directory", f"must be an https:// URL, got {self.acme_directory!r}"
        if self.acme_directory and self.acme_renew_days <= self.cert_warning_days:
            return "acme_renew_days", (f"{self.acme_renew_days} must be more than cert_warning_days "
                                       f"({self.cert_warning_days}): renewal comes before the check's alarm")
        return None

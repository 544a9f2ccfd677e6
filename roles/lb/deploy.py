"""The lb role: nginx TLS terminator and, for a pair, keepalived holding a floating IP.

Every HTTP request is redirected to HTTPS (except ACME challenges); HTTPS uses
Mozilla's "intermediate" profile with HSTS; the marketing site is served by the
load balancers themselves; everything else goes to the application servers
with keepalive connections, passive health checks and retries of idempotent
requests. Configuration is checked with ``nginx -t`` / ``keepalived -t``
before it takes effect, and nginx reloads gracefully.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import FactBase, OperationError, deploy
from pyinfra.facts.hardware import NetworkDevices
from pyinfra.operations import files, systemd

from roles._lib import TEMPLATES, config, install_packages, owed_action, peer_fact, render, template_file, validated_file
from roles.app.deploy import AppState
from roles.app.settings import AppSettings
from roles.base.deploy import codename, sysctls
from roles.base.settings import BaseSettings
from roles.lb.settings import LbSettings
from roles.registry import ROLES
from roles.topology import topology
from webstack import tls as tlskeys
from webstack.inventory import HostConfig

ROOT = Path(__file__).resolve().parents[2]
SITE = "/etc/nginx/sites-available/webstack.conf"
# nginx 1.25.1+ (trixie) spells HTTP/2 as a directive; 1.22 (bookworm) on `listen`.
HTTP2_DIRECTIVE = {"bookworm": False, "trixie": True}
# A load balancer that loses the VIP (stopped, preempted, unhealthy) keeps it as a local route on lo
# for this long (lb-notify), so the requests already in flight there still get their answers:
# nginx's longest wait for an application server (proxy_read_timeout 30 s) and a margin.
VIP_DRAIN_S = 35
VIP_HELD = "/run/webstack-vip-held"  # lb-notify's marker: this host held the VIP, so drains it when it leaves
# lb-notify's drain: the nftables table that drops new connections to the VIP, and the transient
# systemd unit whose timer ends the drain (the patch run's pre-drain writes the same ones for
# lb-notify to take over).
VIP_DRAIN_TABLE = "inet webstack_vip_drain"
VIP_DRAIN_UNIT = "webstack-vip-drain"
# ARP for the VIP is keepalived's alone: answered only on the interface that carries it (not for
# the drain's route on lo), asked with the interface's own address.
VIP_SYSCTLS = (("net.ipv4.conf.all.arp_ignore", "1"), ("net.ipv4.conf.all.arp_announce", "2"))


def interface_of(devices: dict[str, Any], address: str) -> str | None:
    """The network interface carrying IPv4 ``address``, from pyinfra's ``NetworkDevices`` fact."""
    for name, device in devices.items():
        ipv4 = device.get("ipv4") or {}
        if address in (ipv4.get("address"), *(extra["address"] for extra in ipv4.get("additional_ips", []))):
            return name
    return None


class AnswersOn443(FactBase):
    """Whether something answers TCP connections on ``address``:443 (within 1 s): "yes", "no", or
    "draining" (this host gave the VIP up moments ago and keeps it as a route on lo, lb-notify: it
    would answer itself, so whether another machine does cannot be told from here)."""

    def command(self, address: str) -> str:
        return (f"if ip route show table local | grep -q '^local {address} dev lo'; then echo draining; "
                f"else timeout 1 bash -c ': </dev/tcp/{address}/443' 2>/dev/null && echo yes || echo no; fi")

    def process(self, output: Sequence[str]) -> str:
        return "".join(output).strip()


def check_vip_not_held_elsewhere(cfg: HostConfig, devices: dict[str, Any]) -> None:
    """Refuse when no load balancer of the pair (in the run) holds the VIP but it answers anyway.

    That is a load balancer taken out of the inventory while it held the VIP: site never touches
    it again, so its keepalived would keep the address (and the remaining pair members, no longer
    listing it as a peer, would claim it too). Who holds the VIP is read from the interfaces fact
    already asked for keepalived's interface: no extra command while the pair is healthy.
    """
    lb = cfg.settings(LbSettings)
    peers = topology(cfg).vrrp_peers(cfg.name)
    holders = [cfg.name] if interface_of(devices, lb.vip) else []
    for peer in peers:
        peer_devices = peer_fact(peer.name, NetworkDevices)
        if peer_devices is None or interface_of(peer_devices, lb.vip):
            holders.append(peer.name)  # holds it, or not in this run (may hold it: its own run decides)
    answers = host.get_fact(AnswersOn443, address=lb.vip) if not holders else "no"
    pair = ", ".join(sorted([cfg.name, *(p.name for p in peers)]))
    if answers == "draining":
        raise OperationError(
            f"{cfg.name}: the VIP {lb.vip}: no load balancer of the inventory holds it, and this one gave it up "
            f"less than {VIP_DRAIN_S} s ago (it still answers the requests it had accepted), so whether a load "
            "balancer removed from the inventory still holds it cannot be told from here. If one does, stop "
            f"keepalived there (systemctl stop keepalived) so {pair} take the VIP over; if none does, run site "
            f"again in {VIP_DRAIN_S} s.")
    if answers == "yes":
        raise OperationError(
            f"{cfg.name}: the VIP {lb.vip} answers, but no load balancer of the inventory holds it: a load "
            f"balancer removed from the inventory still does. Stop keepalived there (systemctl stop keepalived) "
            f"so {pair} take the VIP over, then run site again.")


def upstreams(cfg: HostConfig, drained: Sequence[str]) -> list[dict]:
    """Application servers for the nginx upstream, marking drained ones ``down``."""
    return [{"name": p.name, "address": p.address, "drained": p.name in drained}
            for p in topology(cfg).upstreams(cfg.name)]


def site_context(cfg: HostConfig, release: str, drained: Sequence[str]) -> dict:
    """Template variables of the nginx site for this load balancer."""
    lb = cfg.settings(LbSettings)
    marketing = []
    for path in lb.marketing_paths:
        marketing.append((path, "index.html" if path == "/" else f"{path.strip('/')}.html"))
    return {
        "upstreams": upstreams(cfg, drained),
        "upstream_port": lb.upstream_port,
        "server_names": lb.server_names,
        "http2_directive": HTTP2_DIRECTIVE[release],
        "hsts_preload": lb.hsts_preload,
        "ocsp_stapling": lb.ocsp_stapling,
        "marketing": marketing,
        "health_paths": sorted({p.settings(AppSettings).health_path for p in topology(cfg).upstreams(cfg.name)}),
        "admin_networks": cfg.settings(BaseSettings).admin_networks,
    }


def nginx_site(cfg: HostConfig, release: str, drained: Sequence[str], force: bool = False,
               name: str = f"Configure {SITE}"):
    """The nginx site, swapped in only if ``nginx -t`` accepts it; owes a graceful reload."""
    return validated_file(
        name=name, dest=SITE, content=render("lb/etc/nginx/sites-available/webstack.conf.j2",
                                             **site_context(cfg, release, drained)),
        validate="nginx -t -q", in_place=True, owes="reload-nginx", force=force,
    )


def not_serving(cfg: HostConfig) -> list[str]:
    """Upstream application servers of the run whose service is not running yet (a server being added)
    or whose last release switch never passed its health check (a rollout stopped there): they stay
    drained, and the rolling step puts them in once their health check passes. With a single one
    there is nothing to drain to (as in the rolling step)."""
    out: list[str] = []
    upstreams = topology(cfg).upstreams(cfg.name)
    if len(upstreams) < 2:
        return out
    for peer in upstreams:
        state = peer_fact(peer.name, AppState, app=peer.settings(AppSettings).name)
        if state is not None and (not state["active"] or state["unverified"]):
            out.append(peer.name)
    return out


def keepalived_peers(cfg: HostConfig) -> list[str]:
    """Addresses of the other load balancers sharing this one's VIP."""
    return [p.address for p in topology(cfg).vrrp_peers(cfg.name)]


def keepalived_context(cfg: HostConfig, interface: str) -> dict:
    """Template variables of keepalived.conf for this load balancer, its VRRP on ``interface``."""
    lb = cfg.settings(LbSettings)
    return {
        "name": cfg.name, "interface": interface, "vrrp_id": lb.vrrp_id, "priority": lb.priority,
        "nopreempt": lb.nopreempt, "address": cfg.address, "peers": keepalived_peers(cfg),
        "vip": lb.vip, "vip_prefix": lb.vip_prefix, "advert_int": lb.advert_interval,
    }


@deploy("Load balancer")
def apply() -> None:
    """nginx + TLS + marketing site, and keepalived when the host is part of a pair."""
    cfg = config()
    lb = cfg.settings(LbSettings)
    release = codename()
    install_packages("Install nginx and keepalived", ROLES["lb"].packages(cfg))
    # Certificate and key are checked to belong together before either is swapped in (a mismatch
    # would only show at nginx's reload, with the files already replaced).
    try:
        matches = tlskeys.key_matches_certificate(cfg.secret("tls_key").unmask(), cfg.secret("tls_cert").unmask())
    except ValueError as exc:
        raise OperationError(f"{cfg.name}: secrets tls_key / tls_cert: not a PEM key and certificate ({exc})") from None
    if not matches:
        raise OperationError(f"{cfg.name}: secrets tls_key and tls_cert do not match (the key is not the "
                             "certificate's): nothing was changed")
    files.directory(name="TLS directory", path="/etc/nginx/tls", mode="750", user="root", group="root")
    # Maintenance mode's file lives here (deploys/maintenance.py); the site includes what is there.
    files.directory(name="Maintenance directory", path="/etc/nginx/webstack-maintenance", mode="755",
                    user="root", group="root")
    tls = [
        validated_file(name="TLS certificate chain", dest="/etc/nginx/tls/webstack.crt",
                       content=cfg.secret("tls_cert").unmask(), mode="644", owes="reload-nginx"),
        validated_file(name="TLS private key", dest="/etc/nginx/tls/webstack.key",
                       content=cfg.secret("tls_key").unmask(), mode="600", owes="reload-nginx"),
    ]
    tls.append(validated_file(name="DH group ffdhe2048 (RFC 7919)", dest="/etc/nginx/tls/ffdhe2048.pem",
                              content=(TEMPLATES / "lb/etc/nginx/tls/ffdhe2048.dhparams").read_text(),
                              owes="reload-nginx"))
    site_root = ROOT / lb.marketing_root
    if not site_root.is_dir():
        raise OperationError(f"lb__marketing_root: {site_root} is not a directory")
    files.directory(name="Marketing site directory", path="/var/www/webstack-marketing", mode="755")
    for page in sorted(site_root.iterdir()):
        validated_file(name=f"Marketing page {page.name}", dest=f"/var/www/webstack-marketing/{page.name}",
                       content=page.read_text())
    files.directory(name="ACME challenge directory", path="/var/www/acme/.well-known/acme-challenge", mode="755")
    files.link(name="No default nginx site", path="/etc/nginx/sites-enabled/default", present=False)
    site = nginx_site(cfg, release, [*lb.drained, *not_serving(cfg)])
    link = files.link(name="Enable the webstack site", path="/etc/nginx/sites-enabled/webstack.conf", target=SITE)
    systemd.service(name="nginx running", service="nginx", enabled=True, running=True)
    owed_action("reload-nginx", "nginx -t -q && systemctl reload nginx", [site, link, *tls])

    if lb.vip:
        devices = host.get_fact(NetworkDevices)
        interface = interface_of(devices, cfg.address)
        if not interface:
            raise OperationError(f"{cfg.name}: no interface carries {cfg.address}")
        check_vip_not_held_elsewhere(cfg, devices)
        if interface_of(devices, lb.vip):  # lb-notify drains only a VIP it saw arrive: say it did
            files.file(name="The VIP is held here (lb-notify drains it when it leaves)", path=VIP_HELD, present=True)
        sysctls("/etc/sysctl.d/61-webstack-vip.conf", VIP_SYSCTLS)
        scripts = [
            template_file(f"lb/usr/local/lib/webstack/{name}.j2", f"/usr/local/lib/webstack/{name}", mode="755",
                          validate="sh -n {}", vip=lb.vip, drain=VIP_DRAIN_S, held=VIP_HELD,
                          drain_table=VIP_DRAIN_TABLE, drain_unit=VIP_DRAIN_UNIT)
            for name in ("lb-check", "lb-notify")
        ]
        conf = template_file(
            "lb/etc/keepalived/keepalived.conf.j2", "/etc/keepalived/keepalived.conf",
            validate="keepalived -t -f {}", owes="reload-keepalived", mode="640", **keepalived_context(cfg, interface),
        )
        systemd.service(name="keepalived running", service="keepalived", enabled=True, running=True)
        owed_action("reload-keepalived", "systemctl reload keepalived", [conf, *scripts])

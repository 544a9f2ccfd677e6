"""Settings of the base role, applied to every host (keys ``base__<field>``)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from webstack.settings import required, setting


@dataclass(frozen=True)
class AdminUser:
    """An operator account: SSH keys only, member of the admin group (sudo)."""

    name: str = required("login name")
    ssh_keys: tuple[str, ...] = required(
        "public keys (one line each); `file:PATH` reads a key file on the control machine"
    )
    shell: str = setting("/bin/bash", "login shell")


@dataclass(frozen=True)
class Opening:
    """One extra inbound firewall opening, from inventory groups and/or networks."""

    port: int = required("destination port")
    proto: Literal["tcp", "udp"] = setting("tcp", "protocol")
    from_groups: tuple[str, ...] = setting((), "inventory groups or roles whose hosts may connect")
    from_networks: tuple[str, ...] = setting((), "CIDR networks that may connect")
    comment: str = setting("", "why the opening exists (shown in the ruleset)")


@dataclass(frozen=True)
class BaseSettings:
    """Every host: accounts, SSH, firewall, updates, time, journal, sysctl."""

    admin_users: tuple[AdminUser, ...] = setting((), "operator accounts (at least one, with a key)")
    removed_users: tuple[str, ...] = setting((), "former operators whose accounts are deleted")
    admin_group: str = setting("webstack-admin", "group granted passwordless sudo")
    admin_networks: tuple[str, ...] = setting(
        ("0.0.0.0/0", "::/0"), "networks allowed to reach SSH (narrow this in production)"
    )
    ssh_port: int = setting(22, "port sshd listens on")
    ssh_permit_root_login: bool = setting(False, "allow root over SSH (keys only); off once onboarded")
    ssh_tcp_forwarding: bool = setting(False, "allow SSH TCP forwarding (tunnels)")
    login_banner: str = setting("Authorised access only. Activity on this system is logged and may be reported.",
                                "text shown before login (/etc/issue, /etc/issue.net, the SSH banner); empty: none")
    firewall_enabled: bool = setting(True, "manage nftables with default-deny inbound")
    firewall_openings: tuple[Opening, ...] = setting((), "extra inbound openings beyond those roles derive")
    unattended_upgrades: bool = setting(True, "install security updates daily (unattended-upgrades)")
    unattended_reboot: bool = setting(False, "let unattended-upgrades reboot when a kernel update needs it")
    unattended_reboot_time: str = setting("04:00", "time of such automatic reboots")
    timezone: str = setting("Etc/UTC", "system time zone")
    ntp_servers: tuple[str, ...] = setting(("2.debian.pool.ntp.org",), "NTP pools/servers for chrony")
    journal_max_use: str = setting("500M", "disk cap of the persistent journal")
    extra_packages: tuple[str, ...] = setting((), "more Debian packages to install everywhere (without their Recommends)")
    apt_descriptions: bool = setting(
        False, "let apt download the long package descriptions (Translation-en: about a third of what each "
        "`apt-get update` fetches; without them `apt show` prints the one-line summary)")
    mail_relay: str = setting(
        "", "the mail provider's submission server `host:port` (STARTTLS + AUTH); empty = no mail relay installed"
    )
    mail_relay_user: str = setting("", "SMTP login at the relay (password: secret `smtp_password_<user>`)")
    mail_ca: str = setting(
        "", "PEM file on the control machine (relative to the inventory directory) the relay's certificate is checked "
        "against; empty = the server's system CA store"
    )
    mail_domain: str = setting("", "mail domain of the hosts: they send as root@<host>.<domain> (empty: <host>.localdomain)")
    operator_email: str = setting("", "where alerts of failed units go (needs mail_relay); empty = no alerts")

    def check(self) -> tuple[str, str] | None:
        """Field-level consistency; returns (key, message) on a problem."""
        if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", self.unattended_reboot_time):
            return "unattended_reboot_time", f"not a time HH:MM: {self.unattended_reboot_time!r}"
        for net in self.admin_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                return "admin_networks", f"not a network: {net!r}"
        for i, opening in enumerate(self.firewall_openings):
            if not 0 < opening.port < 65536:
                return f"firewall_openings[{i}].port", f"not a port: {opening.port}"
            if not (opening.from_groups or opening.from_networks):
                return f"firewall_openings[{i}]", "needs from_groups or from_networks"
            for net in opening.from_networks:
                try:
                    ipaddress.ip_network(net, strict=False)
                except ValueError:
                    return f"firewall_openings[{i}].from_networks", f"not a network: {net!r}"
        if not 0 < self.ssh_port < 65536:
            return "ssh_port", f"not a port: {self.ssh_port}"
        if self.mail_relay:
            host_part, _, port = self.mail_relay.rpartition(":")
            if not host_part or not port.isdigit() or not 0 < int(port) < 65536 or "[" in host_part:
                return "mail_relay", f"expected host:port, e.g. smtp.example.com:587, got {self.mail_relay!r}"
            if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.mail_relay_user):
                return "mail_relay_user", f"a login name is needed with a relay, got {self.mail_relay_user!r}"
        if self.operator_email:
            if not re.fullmatch(r"[^@\s]+@[^@\s]+", self.operator_email):
                return "operator_email", f"not an email address: {self.operator_email!r}"
            if not self.mail_relay:
                return "operator_email", "alerts are mailed through base__mail_relay: set it too"
        if self.mail_domain and not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", self.mail_domain):
            return "mail_domain", f"not a domain name: {self.mail_domain!r}"
        names = [u.name for u in self.admin_users]
        if len(set(names)) != len(names):
            return "admin_users", "a user is listed twice"
        overlap = set(names) & set(self.removed_users)
        if overlap:
            return "removed_users", f"also listed in admin_users: {', '.join(sorted(overlap))}"
        return None

    @property
    def relay(self) -> tuple[str, int] | None:
        """(host, port) of ``mail_relay``, None when unset."""
        if not self.mail_relay:
            return None
        host_part, _, port = self.mail_relay.rpartition(":")
        return host_part, int(port)

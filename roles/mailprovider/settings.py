"""Settings of the mailprovider role, the lab's stand-in for a third-party email service (keys ``mailprovider__<field>``)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from webstack.settings import setting


@dataclass(frozen=True)
class MailproviderSettings:
    """Lab only: Postfix submission (587, STARTTLS + AUTH) delivering every accepted mail into one Maildir."""

    accounts: tuple[str, ...] = setting(
        ("app",), "SMTP logins besides the hosts' relay logins (`base__mail_relay_user`, added automatically); "
        "password of each: secret `smtp_password_<login>`"
    )
    client_networks: tuple[str, ...] = setting(
        (), "networks besides the inventory's hosts that may reach submission (587), e.g. the control machine"
    )
    mailbox_root: str = setting(
        "/var/mail/webstack", "where mail is delivered: the catch-all Maildir <root>/all/ (recipient in Delivered-To)"
    )
    max_message_kb: int = setting(10240, "largest message accepted (KiB)")

    def check(self) -> tuple[str, str] | None:
        """Field-level consistency; returns (key, message) on a problem."""
        for login in self.accounts:
            if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", login):
                return "accounts", f"not a login name: {login!r}"
        if len(set(self.accounts)) != len(self.accounts):
            return "accounts", "a login is listed twice"
        for net in self.client_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                return "client_networks", f"not a network: {net!r}"
        if not self.mailbox_root.startswith("/") or self.mailbox_root.rstrip("/") in ("", "/var", "/var/mail"):
            return "mailbox_root", f"needs a dedicated absolute directory: {self.mailbox_root!r}"
        if self.max_message_kb < 64:
            return "max_message_kb", f"too small: {self.max_message_kb}"
        return None

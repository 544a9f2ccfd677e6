"""Welcome e-mail over SMTP submission (port 587, STARTTLS verified against a CA file, AUTH).

Configuration from the environment (read when a mail is sent, see ``SmtpConfig.from_env``):
SMTP_HOST, SMTP_PORT (587), SMTP_CA_FILE (CA bundle the provider's certificate must chain to;
unset: the system store), SMTP_USER, SMTP_PASSWORD_FILE (preferred) or SMTP_PASSWORD,
MAIL_FROM, MAIL_DOMAIN (right-hand side of Message-IDs; default: MAIL_FROM's domain),
SMTP_TIMEOUT (seconds for the whole SMTP dialogue of one mail, default 20).

Outcomes: ``send_welcome`` returns when the provider accepted the mail; it raises
``PermanentFailure`` when the provider refuses the recipient or the message with a 5xx
(the job is dead-lettered at once: retrying cannot help), and any other exception (4xx,
connection, TLS, timeout, 5xx to AUTH or MAIL FROM, which are configuration problems an
operator can fix) means "try again later".
"""

from __future__ import annotations

import os
import smtplib
import ssl
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any


class PermanentFailure(Exception):
    """The provider refused this mail for good (5xx to RCPT or DATA)."""


@dataclass(frozen=True)
class SmtpConfig:
    """Where and how to submit mail."""

    host: str
    """submission server name (also the name its certificate must carry)"""
    port: int
    """submission port (587: STARTTLS)"""
    ca_file: str | None
    """CA bundle to verify the server certificate against; None: the system store"""
    user: str | None
    """AUTH user name; None: no AUTH (only for a relay that trusts the network)"""
    password: str
    """AUTH password (never logged)"""
    mail_from: str
    """envelope and header sender"""
    domain: str
    """right-hand side of Message-IDs"""
    timeout: float
    """seconds for the whole dialogue of one mail (kept below the job lock timeout)"""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> SmtpConfig:
        env = dict(os.environ if env is None else env)
        password = env.get("SMTP_PASSWORD", "")
        if env.get("SMTP_PASSWORD_FILE"):
            with open(env["SMTP_PASSWORD_FILE"]) as fh:
                password = fh.read().strip()
        mail_from = env.get("MAIL_FROM", "webstack@localhost")
        return cls(host=env.get("SMTP_HOST", "localhost"), port=int(env.get("SMTP_PORT", "587")),
                   ca_file=env.get("SMTP_CA_FILE") or None, user=env.get("SMTP_USER") or None, password=password,
                   mail_from=mail_from, domain=env.get("MAIL_DOMAIN") or mail_from.rpartition("@")[2] or "localhost",
                   timeout=float(env.get("SMTP_TIMEOUT", "20")))


class _DeadlineSMTP(smtplib.SMTP):
    """smtplib with one deadline for the whole dialogue, not a timeout per socket read."""

    def __init__(self, deadline: float, **kwargs: Any) -> None:
        self.deadline = deadline
        super().__init__(**kwargs)

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("SMTP dialogue took longer than SMTP_TIMEOUT")
        return left

    def _arm(self) -> None:
        # A socket closed by a failed STARTTLS has fileno -1: smtplib itself reports that one.
        if self.sock and self.sock.fileno() != -1:
            self.sock.settimeout(self._left())

    def send(self, s: Any) -> None:
        self._arm()
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        self._arm()
        return super().getreply()


def welcome_message(cfg: SmtpConfig, job_id: int, to: str) -> EmailMessage:
    """The welcome mail; its Message-ID names the job, so a duplicate after a crash is recognisable."""
    msg = EmailMessage()
    msg["From"] = cfg.mail_from
    msg["To"] = to
    msg["Subject"] = "Welcome to the webstack demo"
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = message_id(cfg, job_id)
    msg.set_content(f"Hello,\n\nthank you for signing up with {to}.\n\n-- the webstack demo\n")
    return msg


def message_id(cfg: SmtpConfig, job_id: int) -> str:
    return f"<job-{job_id}.welcome@{cfg.domain}>"


def send(cfg: SmtpConfig, msg: EmailMessage) -> None:
    """Submit ``msg``: STARTTLS (verified) is required before AUTH and the mail, never plain text."""
    deadline = time.monotonic() + cfg.timeout
    context = ssl.create_default_context(cafile=cfg.ca_file)
    smtp = _DeadlineSMTP(deadline, host=cfg.host, port=cfg.port, timeout=cfg.timeout)
    try:
        smtp.ehlo()
        smtp.starttls(context=context)  # raises SMTPNotSupportedError when not offered: never send in clear
        smtp.ehlo()
        if cfg.user:
            smtp.login(cfg.user, cfg.password)
        try:
            refused = smtp.send_message(msg)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            if codes and all(500 <= code < 600 for code in codes):
                raise PermanentFailure(f"recipient refused: {_reply(exc.recipients)}") from None
            raise
        except smtplib.SMTPDataError as exc:
            if 500 <= exc.smtp_code < 600:
                raise PermanentFailure(f"message refused: {exc.smtp_code} {exc.smtp_error!r}") from None
            raise
        if refused:  # only with several recipients; ours have one
            raise PermanentFailure(f"recipient refused: {_reply(refused)}")
    finally:
        # After "250 accepted" nothing may fail the job (it would be sent again): QUIT is a courtesy.
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()


def _reply(recipients: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{rcpt}: {code} {text.decode(errors='replace')}" for rcpt, (code, text) in recipients.items())


def send_welcome(job_id: int, to: str, cfg: SmtpConfig | None = None) -> None:
    cfg = cfg or SmtpConfig.from_env()
    send(cfg, welcome_message(cfg, job_id, to))

"""Mail on real lab servers: the stand-in provider (mail1), a host's null client (spare2), alerts.

Runs against the running lab without the session's full rebuild: the module's own fixture
converges only mail1 and spare2 (``--limit``), so it may run alone:

    WEBSTACK_REUSE_LAB=1 .venv/bin/python -m pytest tests/integration/test_mail.py

The provider is reached from the control machine (``mailprovider__client_networks``) with
Python's smtplib, trusting the lab CA; the mailbox is read over SSH.
"""

from __future__ import annotations

import shlex
import smtplib
import socket
import ssl
import time
import uuid
from email.message import EmailMessage

import pytest

from roles._lib import ALERT_DROP_IN
from tests.integration.conftest import BIN, MACHINES, ROOT, host_for, run, wait_for
from webstack import secrets

pytestmark = pytest.mark.lab

PROVIDER = "mail1"
CLIENT = "spare2"  # relays through the provider like every host
OPERATOR = "ops@webstack.test"
MAILDIR = "/var/mail/webstack/all/new"
CA_FILE = ROOT / "inventories" / "lab" / "ca.crt"
ADDRESS = MACHINES[PROVIDER]["address"]


@pytest.fixture(scope="module")
def mail_lab(converged):
    """mail1 and spare2, converged with the whole lab, converged once more (changing nothing); the provider healthy."""
    site = [str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/site.py", "--limit", PROVIDER, "--limit", CLIENT]
    again = run(*site)
    provider = host_for(PROVIDER)
    provider.check_output("mail-fault off")
    yield {"again": again, "provider": provider, "client": host_for(CLIENT)}
    provider.run("mail-fault off")


def password(login: str) -> str:
    return secrets.decrypt(ROOT / "inventories" / "lab")[f"smtp_password_{login}"]


def tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(CA_FILE))


def submit(token: str, to: str = "someone@example.test", login: str | None = "app", starttls: bool = True) -> None:
    """One message over submission to mail1, its Subject carrying ``token``; smtplib's errors propagate."""
    msg = EmailMessage()
    msg["From"] = "app@webstack.test"
    msg["To"] = to
    msg["Subject"] = f"test {token}"
    msg.set_content(f"token {token}\n")
    with smtplib.SMTP(ADDRESS, 587, timeout=10) as smtp:
        smtp.ehlo("control.webstack.test")
        if starttls:  # the certificate (lab CA) names the host and its address
            smtp.starttls(context=tls_context())
            smtp.ehlo("control.webstack.test")
        if login:
            smtp.login(login, password(login))
        smtp.send_message(msg)


def delivered(provider, token: str) -> list[str]:
    """Messages in the catch-all Maildir whose text holds ``token``."""
    out = provider.run(f"grep -l -r -F -e {shlex.quote(token)} {MAILDIR} 2>/dev/null")
    return [provider.check_output(f"cat {path}") for path in out.stdout.split()]


def test_another_run_changes_nothing(mail_lab):
    totals = mail_lab["again"].totals()
    assert totals["error"] == "-" and totals["changed"] == "-", mail_lab["again"].output[-3000:]


def test_only_submission_listens_and_the_firewall_opens_it(mail_lab):
    listening = mail_lab["provider"].check_output("ss -Htln | awk '{print $4}'")
    assert "0.0.0.0:587" in listening.split()
    assert not any(a.endswith(":25") or a.endswith(":143") for a in listening.split()), listening
    rules = mail_lab["provider"].check_output("nft list table inet webstack")
    assert "dport 587" in rules


def test_no_starttls_no_submission(mail_lab):
    token = uuid.uuid4().hex
    with pytest.raises(smtplib.SMTPException) as info:
        submit(token, login=None, starttls=False)
    assert "STARTTLS" in str(info.value) or "530" in str(info.value)
    with pytest.raises(smtplib.SMTPNotSupportedError):  # AUTH is not even offered in clear text
        submit(token, login="app", starttls=False)


def test_tls_without_auth_is_refused(mail_lab):
    token = uuid.uuid4().hex
    with pytest.raises((smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused)):
        submit(token, login=None)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        with smtplib.SMTP(ADDRESS, 587, timeout=10) as smtp:
            smtp.starttls(context=tls_context())
            smtp.login("app", "not-the-password")
    time.sleep(1)
    assert delivered(mail_lab["provider"], token) == []


def test_tls_and_auth_land_in_the_maildir(mail_lab):
    token = uuid.uuid4().hex
    submit(token, to="welcome@customer.test")
    wait_for(lambda: delivered(mail_lab["provider"], token), 10, "the message is in the Maildir")
    (text,) = delivered(mail_lab["provider"], token)
    assert "Delivered-To: welcome@customer.test" in text


def test_fault_4xx_answers_451_then_recovers(mail_lab):
    provider = mail_lab["provider"]
    provider.check_output("mail-fault 4xx")
    try:
        assert provider.check_output("mail-fault status") == "4xx"
        with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
            submit(uuid.uuid4().hex)
        ((code, text),) = info.value.recipients.values()
        assert code == 451 and b"4.3.0" in text
    finally:
        provider.check_output("mail-fault off")
    token = uuid.uuid4().hex
    submit(token)
    wait_for(lambda: delivered(provider, token), 10, "delivered once the fault is off")


def test_fault_down_refuses_connections(mail_lab):
    provider = mail_lab["provider"]
    provider.check_output("mail-fault down")
    try:
        assert provider.check_output("mail-fault status") == "down"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((ADDRESS, 587), timeout=5).close()
    finally:
        provider.check_output("mail-fault off")
    wait_for(lambda: _connects(), 10, "587 answers again")


def _connects() -> bool:
    try:
        socket.create_connection((ADDRESS, 587), timeout=2).close()
        return True
    except OSError:
        return False


def _failing_unit(client, name: str) -> None:
    """A oneshot unit that fails, with the drop-in roles._lib.alert_on_failure installs, started once."""
    unit = f"/etc/systemd/system/{name}.service"
    client.check_output(
        f"printf '%s\\n' '[Service]' Type=oneshot 'ExecStart=/bin/sh -c \"echo {name} is failing on purpose; exit 3\"'"
        f" > {unit} && mkdir -p {unit}.d && printf '%s\\n' '[Unit]' 'OnFailure=webstack-alert@%n.service'"
        f" > {unit}.d/{ALERT_DROP_IN} && systemctl daemon-reload")
    client.run(f"systemctl start {name}.service")


def _alerts(provider, unit: str) -> list[str]:
    return [m for m in delivered(provider, f"X-Webstack-Unit: {unit}") if "X-Webstack-Host: " + CLIENT in m]


def test_failed_unit_mails_the_operator(mail_lab):
    client, provider = mail_lab["client"], mail_lab["provider"]
    name = f"ws-alert-{uuid.uuid4().hex[:8]}"
    try:
        start = time.monotonic()
        _failing_unit(client, name)
        wait_for(lambda: _alerts(provider, f"{name}.service"), 15, "the operator's alert arrived")
        (text,) = _alerts(provider, f"{name}.service")
        assert f"Subject: [webstack] {CLIENT}: {name}.service failed" in text
        assert f"Delivered-To: {OPERATOR}" in text
        assert f"{name} is failing on purpose" in text  # the unit's journal lines
        print(f"alert in the mailbox {time.monotonic() - start:.1f} s after the unit failed")
    finally:
        client.run(f"rm -rf /etc/systemd/system/{name}.service /etc/systemd/system/{name}.service.d; "
                   f"systemctl reset-failed {name}.service; systemctl daemon-reload")


def test_alert_while_provider_down_arrives_after_it_is_back(mail_lab):
    client, provider = mail_lab["client"], mail_lab["provider"]
    name = f"ws-alert-{uuid.uuid4().hex[:8]}"
    provider.check_output("mail-fault down")
    try:
        _failing_unit(client, name)
        wait_for(lambda: "Request" in client.check_output("postqueue -p | tail -n 1"), 15,
                 "the alert waits in spare2's queue")
        assert _alerts(provider, f"{name}.service") == []
        provider.check_output("mail-fault off")
        client.check_output("postqueue -f")  # do not wait for the next queue run (60 s)
        wait_for(lambda: _alerts(provider, f"{name}.service"), 20, "the queued alert arrived")
        assert len(_alerts(provider, f"{name}.service")) == 1
        assert client.check_output("postqueue -p | tail -n 1") == "Mail queue is empty"
    finally:
        provider.run("mail-fault off")
        client.run(f"rm -rf /etc/systemd/system/{name}.service /etc/systemd/system/{name}.service.d; "
                   f"systemctl reset-failed {name}.service; systemctl daemon-reload")

"""Mail: relay settings, the provider's accounts and firewall, rendered Postfix/Dovecot files, the agents."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from roles._lib import render
from roles.base.mail import null_client_context
from roles.base.settings import BaseSettings
from roles.mailprovider.deploy import CATCHALL, main_context, password_entry
from roles.registry import needed_secrets
from roles.topology import topology
from tests.unit.conftest import SECRETS
from tests.unit.test_templates import lab_inventory
from webstack.errors import ConfigError
from webstack.inventory import load
from webstack_agent import alert, mailfault


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return {cfg.name: cfg for cfg in load(lab_inventory(tmp_path_factory.mktemp("inv")), secrets=SECRETS)}


def error_of(inv) -> str:
    with pytest.raises(ConfigError) as info:
        load(inv, secrets={**SECRETS, "smtp_password_r": "x"})
    return str(info.value)


@pytest.mark.parametrize(("data", "key"), [
    ({"base__mail_relay": "smtp.example.com"}, "mail_relay"),
    ({"base__mail_relay": "smtp.example.com:99999", "base__mail_relay_user": "r"}, "mail_relay"),
    ({"base__mail_relay": "smtp.example.com:587"}, "mail_relay_user"),
    ({"base__operator_email": "ops@example.com"}, "operator_email"),
    ({"base__mail_relay": "smtp.example.com:587", "base__mail_relay_user": "r", "base__operator_email": "ops"},
     "operator_email"),
    ({"base__mail_domain": "Not A Domain"}, "mail_domain"),
])
def test_bad_mail_settings_are_refused(make_inventory, data, key):
    assert f"base__{key}" in error_of(make_inventory(groups={"web": data}))


def test_relay_to_an_inventory_host_needs_the_provider_role(make_inventory):
    inv = make_inventory(groups={"web": {"base__mail_relay": "db1:587", "base__mail_relay_user": "r"}})
    assert "names inventory host db1, which has no role mailprovider" in error_of(inv)


def test_no_relay_no_mail_secrets(make_inventory):
    cfgs = load(make_inventory(), secrets=SECRETS)
    assert all(not any(k.startswith("smtp_") for k in needed_secrets(c)) for c in cfgs)


def test_lab_hosts_relay_through_mail1(lab):
    top = topology(lab["spare2"])
    assert top.mail_provider("spare2").name == "mail1"
    assert "smtp_password_relay" in needed_secrets(lab["spare2"])
    # mail1 delivers its own mail: no relay login of its own, but every login of its clients.
    assert top.relays_locally("mail1") and "smtp_password_relay" in needed_secrets(lab["mail1"])
    assert top.mail_accounts("mail1") == ["app", "relay"]
    assert "mailprovider_tls_mail1" in needed_secrets(lab["mail1"])


def test_provider_firewall_opens_587_to_every_host_and_the_control_machine(lab):
    from roles.base.deploy import firewall_rules

    sets, rules = firewall_rules(lab["mail1"])
    (opening,) = [s for s in sets if s["name"] == "mailprovider0_v4"]
    others = sorted(c.address for c in lab.values() if c.name != "mail1")
    assert sorted(opening["elements"]) == sorted([*others, "10.77.0.1/32"])
    assert any("@mailprovider0_v4 tcp dport 587 accept" in r for r in rules)
    _, spare_rules = firewall_rules(lab["spare2"])
    assert not any("587" in r for r in spare_rules)


def test_null_client_main_cf(lab):
    text = render("base/etc/postfix/main.cf.j2", **null_client_context(lab["spare2"]))
    for line in ("relayhost = [mail1]:587", "smtp_tls_security_level = secure", "inet_interfaces = loopback-only",
                 "mydestination =", "smtp_tls_CAfile = /etc/postfix/webstack-relay-ca.pem",
                 "myhostname = spare2.webstack.test", "smtp_sasl_auth_enable = yes"):
        assert line in text.splitlines(), line
    assert "{{" not in text


def test_null_client_uses_the_system_store_without_mail_ca():
    base = BaseSettings(mail_relay="smtp.example.com:587", mail_relay_user="r")
    assert base.relay == ("smtp.example.com", 587)

    class Cfg:
        name = "web1"

        def settings(self, cls):
            return base

    ctx = null_client_context(Cfg())  # type: ignore[arg-type]
    assert ctx["ca_file"] == "/etc/ssl/certs/ca-certificates.crt"
    assert ctx["myhostname"] == "web1.localdomain"


def test_provider_templates(lab):
    main = render("mailprovider/etc/postfix/main.cf.j2", **main_context(lab["mail1"]))
    assert "virtual_mailbox_base = /var/mail/webstack" in main
    assert "check_client_access pcre:/etc/postfix/webstack-fault.pcre, permit_sasl_authenticated, reject" in main
    master = render("mailprovider/etc/postfix/master.cf.j2")
    services = [line.split()[0:2] for line in master.splitlines() if line and line[0] not in "# "]
    assert ["submission", "inet"] in services and ["smtp", "inet"] not in services
    assert "-o smtpd_tls_security_level=encrypt" in master and "-o smtpd_tls_auth_only=yes" in master
    boxes = render("mailprovider/etc/postfix/webstack-mailboxes.pcre.j2", catchall=CATCHALL)
    assert f"\t{CATCHALL}/" in boxes and "$" + "1" not in boxes.split("\n")[-2]


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
def test_password_entry_is_stable_and_checks(tmp_path):
    first, again = password_entry("app", "s3cret"), password_entry("app", "s3cret")
    assert first == again and first.startswith("app:{SHA512-CRYPT}$6$")
    assert password_entry("app", "other") != first and "s3cret" not in first
    salt = first.split("$")[2]
    check = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"], input="s3cret",
                           capture_output=True, text=True, check=True).stdout.strip()
    assert first.endswith(check)


def test_alert_message_names_host_unit_and_lines():
    env = {"MONITOR_SERVICE_RESULT": "exit-code", "MONITOR_EXIT_STATUS": "3"}
    msg = alert.message("ops@example.com", "db1", "webstack-backup-check.service", env, "line one\nline two")
    assert msg["Subject"] == "[webstack] db1: webstack-backup-check.service failed"
    assert msg["To"] == "ops@example.com" and msg["X-Webstack-Unit"] == "webstack-backup-check.service"
    body = msg.get_content()
    assert "host:   db1" in body and "result: exit-code" in body and "line one\nline two" in body


def test_fault_table():
    assert mailfault.table(False).strip().startswith("#") and "451" not in mailfault.table(False)
    rule = mailfault.table(True).splitlines()[-1]
    assert rule.startswith("/./\t451 4.3.0 ")
    assert mailfault.main(["bogus"]) == 2


def test_alert_waits_until_the_failed_runs_own_lines_are_in_the_journal():
    journal = FakeJournal([])
    calls = []

    def slow(argv, **kwargs):  # the unit's line reaches the journal on the third question
        calls.append(argv)
        if len(calls) == 5:
            journal.entries.append({"t": 20.1, "_SYSTEMD_UNIT": "x.service", "MESSAGE": "the unit's error"})
        return journal(argv, **kwargs)

    assert alert.wait_for_own_lines("x.service", "abc", "@17.5", seconds=5, run=slow)
    assert calls[0][-1] == "_SYSTEMD_INVOCATION_ID=abc" and calls[1][-3:] == ["--since", "@17.5", "_SYSTEMD_UNIT=x.service"]
    assert not alert.wait_for_own_lines("x.service", "abc", "@17.5", seconds=0.2, run=FakeJournal([]))


class FakeJournal:
    """journalctl over a list of entries (dicts of fields), enough for alert.journal's queries:
    field matches (OR across "+"), -u, --since, -n, and the short-unix / other outputs."""

    def __init__(self, entries):
        self.entries = entries

    def __call__(self, argv, **kwargs):
        since, groups, n, unix = 0.0, [[]], None, "short-unix" in argv
        args = iter(argv[1:])
        for arg in args:
            if arg == "--since":
                since = float(next(args).lstrip("@"))
            elif arg in ("-n", "-o"):
                value = next(args)
                n = int(value) if arg == "-n" else n
            elif arg == "+":
                groups.append([])
            elif arg == "-u":  # the unit's processes and systemd about it
                unit = next(args)
                groups += [[("_SYSTEMD_UNIT", unit)], [("UNIT", unit)]]
            elif "=" in arg:
                groups[-1].append(arg.split("=", 1))
        hits = [e for e in self.entries if e["t"] >= since
                and any(g and all(e.get(k) == v for k, v in g) for g in groups)]
        hits = hits[-n:] if n else hits
        text = "".join(f"{e['t']} {e['MESSAGE']}\n" if unix else f"{e['MESSAGE']}\n" for e in hits)
        return subprocess.CompletedProcess(argv, 0, text, "")


def _messages(text: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in text.splitlines()]


def test_alert_carries_the_runs_output_even_without_its_invocation_id():
    """journald attributes the output of a process that already exited by the unit systemd named
    for the stream, without _SYSTEMD_INVOCATION_ID (CI run of 2026-12-03: the mail lacked the
    unit's error). The run's start comes from systemd's own INVOCATION_ID line."""
    journal = FakeJournal([
        {"t": 10.0, "_SYSTEMD_UNIT": "x.service", "MESSAGE": "an earlier run's line"},
        {"t": 20.0, "INVOCATION_ID": "abc", "UNIT": "x.service", "MESSAGE": "Starting x.service"},
        {"t": 20.1, "_SYSTEMD_UNIT": "x.service", "MESSAGE": "x is failing on purpose"},
        {"t": 20.2, "INVOCATION_ID": "abc", "UNIT": "x.service", "MESSAGE": "x.service: Failed"},
    ])
    text = alert.journal("x.service", 30, "abc", run=journal)
    assert _messages(text) == ["Starting x.service", "x is failing on purpose", "x.service: Failed"]
    assert text.startswith("1970-01-01T00:00:20+0000 ")
    everything = alert.journal("x.service", 30, "", run=journal)  # no invocation: the unit's lines
    assert everything.splitlines()[0] == "an earlier run's line" and len(everything.splitlines()) == 4
    assert alert.journal("x.service", 30, "unknown", run=journal) == everything


def test_alert_keeps_the_runs_own_lines_when_the_journal_lost_its_start():
    """A long-running unit: its "Started" line was vacuumed, so the first line left with its
    INVOCATION_ID comes after the error. The lines carrying the run's id are kept all the same."""
    journal = FakeJournal([
        {"t": 50.0, "_SYSTEMD_UNIT": "app.service", "_SYSTEMD_INVOCATION_ID": "abc", "MESSAGE": "FATAL: out of disk"},
        {"t": 60.0, "INVOCATION_ID": "abc", "UNIT": "app.service", "MESSAGE": "app.service: Main process exited"},
        {"t": 60.1, "INVOCATION_ID": "abc", "UNIT": "app.service", "MESSAGE": "app.service: Failed"},
    ])
    text = alert.journal("app.service", 30, "abc", run=journal)
    assert _messages(text) == ["FATAL: out of disk", "app.service: Main process exited", "app.service: Failed"]

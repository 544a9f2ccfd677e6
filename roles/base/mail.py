"""Every host's own mail: a Postfix null client relaying through the provider, and alerts of failed units.

With ``base__mail_relay`` set, Postfix listens on loopback only, delivers nothing locally,
and hands every message to the provider's submission port: STARTTLS with the certificate
checked against ``base__mail_ca`` (``smtp_tls_security_level = secure``), then SASL AUTH
with ``base__mail_relay_user`` and the secret ``smtp_password_<user>``. While the provider
is down or answers 4xx, mail waits in the queue and is retried. A mail provider host
(role mailprovider) delivers its own mail: no null client there.

With ``base__operator_email`` set, ``webstack-alert@.service`` mails the operator; other
roles attach it to their units with :func:`roles._lib.alert_on_failure`.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import files, systemd

from roles._lib import config, install_packages, inventory_file, owed_action, template_file, validated_file
from roles.base.settings import BaseSettings
from roles.registry import NULL_CLIENT_PACKAGES
from roles.topology import topology
from webstack.inventory import HostConfig
from webstack_agent import alert as alert_agent

SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
RELAY_CA = "/etc/postfix/webstack-relay-ca.pem"
ALERT_SCRIPT = "/usr/local/lib/webstack/webstack-alert"
ALERT_UNIT = "/etc/systemd/system/webstack-alert@.service"
JOURNAL_LINES = 30


def myhostname(cfg: HostConfig) -> str:
    """The host's mail name: ``<host>.<base__mail_domain>`` (``<host>.localdomain`` without one)."""
    return f"{cfg.name}.{cfg.settings(BaseSettings).mail_domain or 'localdomain'}"


def relay_ca(cfg: HostConfig) -> str | None:
    """The CA file content the relay's certificate is checked against (None: the system store)."""
    base = cfg.settings(BaseSettings)
    return inventory_file(cfg, "base__mail_ca", base.mail_ca).read_text() if base.mail_ca else None


def null_client_context(cfg: HostConfig) -> dict:
    """Template variables of the null client's main.cf."""
    base = cfg.settings(BaseSettings)
    assert base.relay is not None
    return {"myhostname": myhostname(cfg), "relay_host": base.relay[0], "relay_port": base.relay[1],
            "ca_file": RELAY_CA if base.mail_ca else SYSTEM_CA}


def postfix_installed() -> bool:
    """True when Postfix is already installed: a first configuration must restart it (Debian's
    default listens on every interface, which a reload does not change)."""
    return "postfix" in (host.get_fact(DebPackages) or {})


@deploy("Base: mail relay and alerts")
def apply() -> None:
    """The null client (unless the host is the provider), then the alert unit."""
    cfg = config()
    base = cfg.settings(BaseSettings)
    if base.relay is None:
        host.noop("no mail relay (base__mail_relay)")
        return
    if not topology(cfg).relays_locally(cfg.name):
        null_client(cfg, base)
    if base.operator_email:
        files.directory(name="Directory /usr/local/lib/webstack", path="/usr/local/lib/webstack", mode="755")
        files.put(name=f"Install {ALERT_SCRIPT}", src=alert_agent.__file__, dest=ALERT_SCRIPT, mode="755")
        unit = template_file("base/etc/systemd/system/webstack-alert@.service.j2", ALERT_UNIT,
                             owes="daemon-reload", operator_email=base.operator_email, lines=JOURNAL_LINES)
        owed_action("daemon-reload", "systemctl daemon-reload", [unit])


def null_client(cfg: HostConfig, base: BaseSettings) -> None:
    """Postfix relaying everything to the provider over verified TLS with AUTH."""
    assert base.relay is not None
    fresh = not postfix_installed()
    owes = "restart-postfix" if fresh else "reload-postfix"
    install_packages("Install Postfix (null client)", list(NULL_CLIENT_PACKAGES))
    swaps = []
    ca = relay_ca(cfg)
    if ca is not None:
        swaps.append(validated_file(name="CA of the mail relay", dest=RELAY_CA, content=ca, owes=owes))
    relay_host, relay_port = base.relay
    password = cfg.secret(f"smtp_password_{base.mail_relay_user}").unmask()
    swaps.append(validated_file(
        name="SMTP login at the relay", dest="/etc/postfix/sasl_passwd", mode="600", owes=owes,
        content=f"[{relay_host}]:{relay_port} {base.mail_relay_user}:{password}\n",
    ))
    swaps.append(template_file("base/etc/postfix/main.cf.j2", "/etc/postfix/main.cf", validate="postfix check",
                               in_place=True, owes=owes, **null_client_context(cfg)))
    systemd.service(name="Postfix running", service="postfix", enabled=True, running=True)
    owed_action("restart-postfix", "systemctl restart postfix", swaps if fresh else [])
    owed_action("reload-postfix", "systemctl reload postfix", [] if fresh else swaps)

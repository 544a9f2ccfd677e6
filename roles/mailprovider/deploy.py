"""The mailprovider role (lab only): a stand-in for the third-party email provider.

Postfix listens on submission (587) only, requires STARTTLS before AUTH (certificate
from the lab CA, in the secret ``mailprovider_tls_<host>``: key and chain in one PEM),
authenticates against Dovecot's SASL service (logins from ``Topology.mail_accounts``,
passwords from the secrets ``smtp_password_<login>``, stored as SHA512-CRYPT), and
delivers every accepted message into one catch-all Maildir (``maildir()``). ``mail-fault 4xx|down|off``
switches the two faults the tests need. Configuration is checked (``postfix check``,
``doveconf``) before it takes effect; changes reload.
"""

from __future__ import annotations

import hashlib
import subprocess

from pyinfra.api import OperationError, deploy
from pyinfra.operations import files, server, systemd

from roles._lib import config, install_packages, owed_action, template_file, validated_file
from roles.base.deploy import codename
from roles.base.mail import myhostname, postfix_installed
from roles.mailprovider.settings import MailproviderSettings
from roles.registry import MAILPROVIDER_PACKAGES
from roles.topology import topology
from webstack.inventory import HostConfig
from webstack_agent import mailfault

VMAIL_UID = 5000  # owner of the Maildirs (Postfix's virtual(8) delivers as this uid/gid)
USERS_FILE = "/etc/dovecot/webstack-users"
FAULT_SCRIPT = "/usr/local/sbin/mail-fault"
CATCHALL = "all"  # the Maildir under mailprovider__mailbox_root every accepted message lands in


def maildir(mp: MailproviderSettings) -> str:
    """The catch-all Maildir the tests read (``new/`` holds the delivered messages)."""
    return f"{mp.mailbox_root.rstrip('/')}/{CATCHALL}"


def password_entry(login: str, password: str) -> str:
    """``login:{SHA512-CRYPT}hash`` for Dovecot's passwd-file; the salt is derived from login and
    password, so an unchanged password renders the same line (no change on a rerun)."""
    salt = hashlib.sha256(f"{login}:{password}".encode()).hexdigest()[:16]
    hashed = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"], input=password,
                            capture_output=True, text=True, check=True).stdout.strip()
    return f"{login}:{{SHA512-CRYPT}}{hashed}"


def users_file(cfg: HostConfig) -> str:
    """The passwd-file of every login of this provider."""
    lines = [password_entry(a, cfg.secret(f"smtp_password_{a}").unmask())
             for a in topology(cfg).mail_accounts(cfg.name)]
    return "".join(f"{line}\n" for line in lines)


def main_context(cfg: HostConfig) -> dict:
    """Template variables of the provider's main.cf."""
    mp = cfg.settings(MailproviderSettings)
    return {"myhostname": myhostname(cfg), "mailbox_root": mp.mailbox_root.rstrip("/"), "uid": VMAIL_UID,
            "max_message_bytes": mp.max_message_kb * 1024}


@deploy("Mail provider (lab)")
def apply() -> None:
    """Postfix submission + Dovecot SASL + Maildirs, and the fault switch."""
    cfg = config()
    mp = cfg.settings(MailproviderSettings)
    if codename() != "trixie":
        raise OperationError(f"{cfg.name}: the mailprovider role is written for Debian 13 (Dovecot 2.4)")
    fresh = not postfix_installed()
    owes = "restart-postfix" if fresh else "reload-postfix"
    install_packages("Install Postfix and Dovecot (SASL)", list(MAILPROVIDER_PACKAGES))
    server.group(name="Group vmail", group="vmail", gid=VMAIL_UID, system=True)
    server.user(name="User vmail (owner of the Maildirs)", user="vmail", uid=VMAIL_UID, group="vmail",
                home=mp.mailbox_root, shell="/usr/sbin/nologin", system=True, create_home=False, ensure_home=False)
    files.directory(name=f"Maildirs under {mp.mailbox_root}", path=mp.mailbox_root, user="vmail", group="vmail",
                    mode="2750")  # setgid as /var/mail passes it on (GNU chmod keeps it)

    dovecot = [
        validated_file(name="SMTP logins (Dovecot passwd-file)", dest=USERS_FILE, content=users_file(cfg),
                       mode="640", group="dovecot"),
    ]
    dovecot.append(template_file("mailprovider/etc/dovecot/dovecot.conf.j2", "/etc/dovecot/dovecot.conf",
                                 validate="doveconf -c {} -n >/dev/null", owes="reload-dovecot",
                                 users_file=USERS_FILE))
    systemd.service(name="Dovecot running", service="dovecot", enabled=True, running=True)
    owed_action("reload-dovecot", "doveconf -n >/dev/null && systemctl reload dovecot", dovecot[1:])

    files.directory(name="Directory /etc/postfix/tls", path="/etc/postfix/tls", mode="700")
    swaps = [validated_file(name="TLS key and certificate chain", dest="/etc/postfix/tls/webstack.pem",
                            content=cfg.secret(f"mailprovider_tls_{cfg.name}").unmask().strip() + "\n",
                            mode="600", owes=owes)]
    swaps.append(template_file("mailprovider/etc/postfix/webstack-domains.pcre.j2", "/etc/postfix/webstack-domains.pcre",
                               owes=owes))
    swaps.append(template_file("mailprovider/etc/postfix/webstack-mailboxes.pcre.j2",
                               "/etc/postfix/webstack-mailboxes.pcre", owes=owes, catchall=CATCHALL))
    # The fault table belongs to mail-fault: created healthy once, never reset by a deploy.
    files.file(name="Fault table (mail-fault)", path=mailfault.FAULT_TABLE, present=True, touch=False)
    files.put(name=f"Install {FAULT_SCRIPT}", src=mailfault.__file__, dest=FAULT_SCRIPT, mode="755")
    swaps.append(template_file("mailprovider/etc/postfix/master.cf.j2", "/etc/postfix/master.cf",
                               validate="postfix check", in_place=True, owes=owes))
    swaps.append(template_file("mailprovider/etc/postfix/main.cf.j2", "/etc/postfix/main.cf",
                               validate="postfix check", in_place=True, owes=owes, **main_context(cfg)))
    systemd.service(name="Postfix running", service="postfix", enabled=True, running=True)
    # A new listener (587 instead of Debian's 25) needs a restart; later changes reload.
    owed_action("restart-postfix", "systemctl restart postfix", swaps if fresh else [])
    owed_action("reload-postfix", "systemctl reload postfix", [] if fresh else swaps)

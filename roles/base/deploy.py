"""The base role: what every server gets before any other role.

Admin users with SSH keys and passwordless sudo, hardened sshd (validated with
``sshd -t`` before a reload), nftables default-deny inbound with openings
derived from the inventory, unattended security upgrades, chrony, persistent
journal, sysctl hardening, hostname and /etc/hosts from the inventory; a
Postfix null client and alerts of failed units mailed to the operator (``mail.py``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

from pyinfra import host
from pyinfra.api import OperationError, deploy, operation
from pyinfra.facts.files import File
from pyinfra.facts.server import Sysctl, Users
from pyinfra.operations import files, server, systemd

from roles._lib import config, install_all_packages, owed_action, stdin_command, template_file, validated_file
from roles.base import _release, mail
from roles.base.facts import Codename, Container, WeakSshModuli
from roles.base.settings import BaseSettings
from roles.postgres import certs
from roles.postgres.settings import PostgresSettings
from roles.registry import ROLES, packages
from roles.topology import topology
from webstack.inventory import HostConfig

SSH_HOST_KEYS = ("/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_rsa_key")
# How long an apt-get waits for the dpkg lock (unattended-upgrades' daily run) before failing: run 43
# failed a patch run whose upgrade started while apt-daily-upgrade.service was installing.
APT_LOCK_TIMEOUT_S = 600


def resolve_key(entry: str) -> str:
    """A public key line; ``file:PATH`` is read on the control machine."""
    if entry.startswith("file:"):
        return Path(entry[5:]).read_text().strip()
    return entry.strip()


def codename() -> str:
    """The Debian codename of the current host, checked against the inventory."""
    cfg = config()
    name = host.get_fact(Codename)
    if name not in _release.SSH_KEX:
        raise OperationError(f"{host.name}: unsupported release {name!r} (supported: bookworm, trixie)")
    if cfg.release and cfg.release != name:
        raise OperationError(f"{host.name}: inventory says {cfg.release}, the server runs {name}")
    return name


def firewall_rules(cfg: HostConfig) -> tuple[list[dict], list[str]]:
    """nftables sets and rules for the host: SSH from admin networks, then openings."""
    base = cfg.settings(BaseSettings)
    sets: list[dict] = []
    rules: list[str] = []

    def add(name: str, port: int, proto: str, sources: list[str], comment: str) -> None:
        for family, nft_type, match in (("v4", "ipv4_addr", "ip saddr"), ("v6", "ipv6_addr", "ip6 saddr")):
            nets = sorted({s for s in sources if ipaddress.ip_network(s, strict=False).version == int(family[1])})
            if not nets:
                continue
            set_name = f"{name}_{family}"
            sets.append({"name": set_name, "type": nft_type, "elements": nets})
            what = "meta l4proto vrrp" if proto == "vrrp" else f"{proto} dport {port}"
            rules.append(f'{match} @{set_name} {what} accept comment "{comment}"')

    add("ssh", base.ssh_port, "tcp", list(base.admin_networks), "ssh from admin networks")
    for i, opening in enumerate(base.firewall_openings):
        sources = list(opening.from_networks)
        for group in opening.from_groups:
            sources += [p.address for p in topology(cfg).members(group) if p.name != cfg.name]
        comment = opening.comment or f"opening {i}"
        if sources:
            add(f"open{i}", opening.port, opening.proto, sources, comment)
    for role in cfg.roles:
        for j, derived in enumerate(ROLES[role].openings(cfg)):
            add(f"{role}{j}", derived.port, derived.proto, list(derived.sources), derived.comment)
    return sets, rules


def backup_host_logins(cfg: HostConfig) -> list[str]:
    """``AllowUsers`` of a backup host: the operators (and root while it may log in) from the admin
    networks, each repository account from its cluster's members and drill hosts only. A database
    host (or a key stolen from one) gets no shell there, whatever account it tries. Empty elsewhere."""
    from roles.backup.deploy import account

    if "backup" not in cfg.roles:
        return []
    base = cfg.settings(BaseSettings)
    people = [u.name for u in base.admin_users] + (["root"] if base.ssh_permit_root_login else [])
    out = [f"{who}@{net}" for who in people for net in base.admin_networks]
    for cluster, addresses in topology(cfg).backup_clients(cfg.name).items():
        out += [f"{account(cluster)}@{address}" for address in addresses]
    return out


def sshd_context(cfg: HostConfig, release: str, host_keys: list[str]) -> dict:
    """Template variables of sshd_config for a host on a Debian release."""
    from roles.backup.deploy import sftp_match_blocks

    base = cfg.settings(BaseSettings)
    return {
        "port": base.ssh_port,
        "host_keys": host_keys,
        "kex": _release.SSH_KEX[release],
        "ciphers": _release.SSH_CIPHERS,
        "macs": _release.SSH_MACS,
        "host_key_algorithms": _release.SSH_HOST_KEY_ALGORITHMS,
        "permit_root_login": "prohibit-password" if base.ssh_permit_root_login else "no",
        "tcp_forwarding": "yes" if base.ssh_tcp_forwarding else "no",
        "sftp_accounts": sftp_match_blocks(cfg),
        "allow_users": backup_host_logins(cfg),
        "banner": bool(base.login_banner.strip()),
        # Exempting "everywhere" would switch the penalties off: only narrower admin networks are listed.
        "penalty_exempt": [n for n in base.admin_networks if n not in ("0.0.0.0/0", "::/0")]
        if _release.SSH_PENALTIES.get(release, True) else [],
    }


@operation()
def password_hash(user: str, hashed):
    """Set a user's password hash (a ``HiddenValue``) only when it differs.

    + user: the account
    + hashed: crypt(3) hash wrapped in ``HiddenValue``; never printed
    """
    # pyinfra's Users fact (asked by the account operations anyway) carries the /etc/shadow field.
    if (host.get_fact(Users).get(user) or {}).get("password") == hashed.unmask():
        host.noop(f"password of {user} is set")
        return
    # On stdin (chpasswd -e), not as usermod -p's argument: every local user can read process arguments.
    yield stdin_command("chpasswd -e", f"{user}:{hashed.unmask()}\n")


@deploy("Base: packages, time, journal")
def packages_and_time() -> None:
    cfg = config()
    base = cfg.settings(BaseSettings)
    template_file("base/etc/apt/apt.conf.d/51webstack-lists.j2", "/etc/apt/apt.conf.d/51webstack-lists",
                  validate="apt-config -c {} dump", descriptions=base.apt_descriptions, lock_timeout=APT_LOCK_TIMEOUT_S)
    files.directory(name="/etc/needrestart/conf.d", path="/etc/needrestart/conf.d")
    template_file("base/etc/needrestart/conf.d/webstack.conf.j2", "/etc/needrestart/conf.d/webstack.conf",
                  validate="perl -c {} 2>/dev/null")
    # Every role's packages of this host in one apt transaction (roles.registry.packages), after
    # the package lists' refresh (hourly at most) in the same operation: each host starts its
    # install as soon as its own lists are in, not when the last host's download ends. Each
    # role's own install below then finds them there.
    install_all_packages("Refresh package lists (hourly at most) and install the packages of every role of the host",
                         packages(cfg), cache_time=3600)
    files.link(
        name=f"Time zone {base.timezone}",
        path="/etc/localtime",
        target=f"/usr/share/zoneinfo/{base.timezone}",
    )
    files.put(name="/etc/timezone", src=_text(f"{base.timezone}\n"), dest="/etc/timezone")
    chrony = template_file(
        "base/etc/chrony/chrony.conf.j2", "/etc/chrony/chrony.conf", owes="restart-chrony",
        validate="chronyd -p -f {}", servers=base.ntp_servers,
    )
    if host.get_fact(Container):
        # No clock to set in a container: chrony's unit skips itself there
        # (ConditionCapability=CAP_SYS_TIME), so only keep it enabled.
        systemd.service(name="chrony enabled", service="chrony", enabled=True, running=None)
        owed_action("restart-chrony", "true", [chrony])
    else:
        systemd.service(name="chrony running", service="chrony", enabled=True, running=True)
        owed_action("restart-chrony", "systemctl restart chrony", [chrony])

    files.directory(name="Persistent journal", path="/var/log/journal", group="systemd-journal", mode="2755")
    journald = template_file(
        "base/etc/systemd/journald.conf.d/webstack.conf.j2", "/etc/systemd/journald.conf.d/webstack.conf",
        owes="restart-journald", max_use=base.journal_max_use,
    )
    # --flush: move to /var/log/journal now, not at the next boot (journald only
    # opens it once told that /var is writable).
    owed_action("restart-journald", "systemctl restart systemd-journald && journalctl --flush", [journald])

    template_file(
        "base/etc/apt/apt.conf.d/52webstack-unattended.j2", "/etc/apt/apt.conf.d/52webstack-unattended",
        validate="apt-config -c {} dump", enabled=base.unattended_upgrades,
        reboot=base.unattended_reboot, reboot_time=base.unattended_reboot_time,
    )
    systemd.service(
        name="unattended-upgrades", service="unattended-upgrades",
        enabled=base.unattended_upgrades, running=base.unattended_upgrades,
    )
    for timer in ("apt-daily.timer", "apt-daily-upgrade.timer"):
        systemd.service(name=timer, service=timer, enabled=True, running=True)


@deploy("Base: identity and accounts")
def identity_and_accounts() -> None:
    cfg = config()
    base = cfg.settings(BaseSettings)
    server.hostname(name=f"Hostname {cfg.name}", hostname=cfg.name)
    template_file("base/etc/hosts.j2", "/etc/hosts", name=cfg.name, env=cfg.env, peers=cfg.peers)

    server.group(name=f"Group {base.admin_group}", group=base.admin_group)
    for user in base.admin_users:
        server.user(
            name=f"Admin user {user.name}",
            user=user.name,
            shell=user.shell,
            groups=[base.admin_group],
            append=True,
            create_home=True,
            public_keys=[resolve_key(k) for k in user.ssh_keys],
            delete_keys=True,
        )
        password_hash(name=f"Console password of {user.name}", user=user.name,
                      hashed=cfg.secret(f"password_hash_{user.name}"))
    for gone in base.removed_users:
        server.user(name=f"Remove former admin {gone}", user=gone, present=False)
    template_file(
        "base/etc/sudoers.d/webstack-admin.j2", "/etc/sudoers.d/webstack-admin",
        validate="visudo -c -q -f {}", mode="440", admin_group=base.admin_group,
    )


@deploy("Base: sshd")
def sshd() -> None:
    cfg = config()
    release = codename()
    host_keys = [k for k in SSH_HOST_KEYS if host.get_fact(File, path=k)]
    if not host_keys:
        server.shell(name="Generate an ed25519 host key",
                     commands=["ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key"])
        host_keys = [SSH_HOST_KEYS[0]]
    if host.get_fact(WeakSshModuli):
        server.shell(
            name="Drop DH moduli under 3072 bits",
            commands=["awk '$1 ~ /^#/ || $5 >= 3071' /etc/ssh/moduli > /etc/ssh/moduli.new"
                      " && mv /etc/ssh/moduli.new /etc/ssh/moduli"],
        )
    banner = cfg.settings(BaseSettings).login_banner.strip()
    for path in ("/etc/issue", "/etc/issue.net"):
        validated_file(name=f"Login banner {path}", dest=path, content=f"{banner}\n" if banner else "")
    swap = template_file(
        "base/etc/ssh/sshd_config.j2", "/etc/ssh/sshd_config",
        validate="sshd -t -f {}", owes="reload-ssh", **sshd_context(cfg, release, host_keys),
    )
    systemd.service(name="sshd enabled", service="ssh", enabled=True, running=True)
    owed_action("reload-ssh", "systemctl reload ssh", [swap])


@deploy("Base: firewall and sysctl")
def firewall_and_sysctl() -> None:
    cfg = config()
    base = cfg.settings(BaseSettings)
    if base.firewall_enabled:
        sets, rules = firewall_rules(cfg)
        swap = template_file(
            "base/etc/nftables.conf.j2", "/etc/nftables.conf", validate="nft -c -f {}",
            owes="apply-nftables", mode="755", sets=sets, rules=rules,
        )
        systemd.service(name="nftables enabled", service="nftables", enabled=True, running=None)
        owed_action("apply-nftables", "nft -f /etc/nftables.conf", [swap])

    template_file("base/etc/modprobe.d/webstack-hardening.conf.j2", "/etc/modprobe.d/webstack-hardening.conf",
                  modules=_release.DISABLED_MODULES)
    sysctls("/etc/sysctl.d/60-webstack.conf", _release.SYSCTLS)


def sysctls(dest: str, pairs: Sequence[tuple[str, str]]) -> None:
    """Kernel settings: a sysctl.d file (applied at boot) and the running values that differ."""
    template_file("base/etc/sysctl.d/60-webstack.conf.j2", dest, sysctls=pairs)
    in_container = bool(host.get_fact(Container))
    # Kept before server.sysctl (which checks too): one fact for all keys, not a fact and an operation per key on every run.
    current = host.get_fact(Sysctl, keys=[k for k, _ in pairs])
    for key, value in pairs:
        if in_container and not key.startswith("net."):
            continue  # read-only in a container; the file applies on a VM at boot
        if str(current.get(key)) != value:
            server.sysctl(name=f"sysctl {key}", key=key, value=int(value))


def database_cas() -> None:
    """The CA of every PostgreSQL cluster this host connects to (roles/postgres/certs.py): those it is
    a client of. A member's own cluster's comes with the postgres role (a restore runs that role alone)."""
    cfg = config()
    own = cfg.settings(PostgresSettings).cluster if "postgres" in cfg.roles else None
    for cluster in topology(cfg).ca_clusters(cfg.name):
        if cluster != own:
            certs.install_ca(cfg, cluster)


@deploy("Base")
def apply() -> None:
    """Everything the base role does, in a safe order: accounts before sshd hardening."""
    packages_and_time()
    identity_and_accounts()
    database_cas()
    sshd()
    firewall_and_sysctl()
    mail.apply()


def _text(value: str):
    import io

    return io.StringIO(value)

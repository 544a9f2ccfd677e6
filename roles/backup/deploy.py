"""The backup role: an off-site host for pgBackRest repositories, holding ciphertext only.

Each database cluster that names this host (``postgres__backup_host``) gets a
system account ``pgbr-<cluster>`` that can do nothing but SFTP inside its own
chroot (``<root>/<cluster>``, the repository in ``repo/``). Its key is only
accepted from the cluster's members (and restore-drill hosts), and the
firewall opens SSH to those addresses only. Encryption happens on the
database hosts; the passphrase is never part of this host's configuration.

An account owns its repository's files and so could delete them: every hour
root copies each repository into the vault (``backup__vault``), out of every
account's reach, and keeps the copies ``backup__vault_keep_days``
(webstack_agent/vault.py; ``deploys/restore.py --data vault=latest`` restores
from one).
"""

from __future__ import annotations

import shlex
from typing import Any

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.exceptions import OperationError
from pyinfra.operations import files, server, systemd

from roles._lib import alert_on_failure, config, install_packages, owed_action, template_file, validated_file
from roles.backup.settings import BackupSettings
from roles.registry import BACKUP_PACKAGES
from roles.topology import topology
from webstack.inventory import HostConfig
from webstack.sshkeys import public_key
from webstack_agent import vault as agent

KEYS_DIR = "/etc/ssh/webstack-sftp"
VAULT_SCRIPT = "/usr/local/lib/webstack/webstack-vault"
VAULT_UNITS = ("webstack-vault.service", "webstack-vault.timer")
account = agent.account


def sftp_match_blocks(cfg: HostConfig) -> list[dict[str, str]]:
    """sshd ``Match User`` blocks for the repository accounts of a backup host (base role renders them)."""
    if "backup" not in cfg.roles:
        return []
    root = cfg.settings(BackupSettings).root.rstrip("/")
    return [{"user": account(c), "chroot": f"{root}/{c}", "keys_file": f"{KEYS_DIR}/%u"} for c in topology(cfg).backup_clients(cfg.name)]


@deploy("Backup host")
def apply() -> None:
    """Accounts, chroots and keys for every cluster that backs up here."""
    cfg = config()
    settings = cfg.settings(BackupSettings)
    root = settings.root.rstrip("/")
    files.directory(name=f"Repositories under {root}", path=root, user="root", group="root", mode="755")
    files.directory(name="SFTP authorized keys", path=KEYS_DIR, user="root", group="root", mode="755")
    clients = topology(cfg).backup_clients(cfg.name)
    for cluster, addresses in clients.items():
        user = account(cluster)
        chroot = f"{root}/{cluster}"
        server.user(name=f"SFTP account {user}", user=user, home=chroot, shell="/usr/sbin/nologin",
                    system=True, create_home=False, ensure_home=False)
        # sshd requires every component of a chroot path to be root-owned and not group-writable.
        files.directory(name=f"Chroot {chroot}", path=chroot, user="root", group="root", mode="755")
        files.directory(name=f"Repository of {cluster}", path=f"{chroot}/repo", user=user, group=user, mode="700")
        key = public_key(cfg.secret(f"pgbackrest_sftp_key_{cluster}").unmask())
        validated_file(
            name=f"Key of {user} (from {', '.join(addresses)})", dest=f"{KEYS_DIR}/{user}",
            content=f'restrict,from="{",".join(addresses)}" {key} {user}\n', mode="644",
        )
    if not clients:
        host.noop("no cluster names this host as its backup host")
    vault(settings)


def vault(settings: BackupSettings) -> None:
    """The vault: root's hourly copies of the repositories, pruned, failing (and mailing) when a
    repository that was complete is not any more."""
    install_packages("rsync", list(BACKUP_PACKAGES))
    files.directory(name=f"Vault {settings.vault}", path=settings.vault, user="root", group="root", mode="700")
    files.put(name=f"Install {VAULT_SCRIPT}", src=agent.__file__, dest=VAULT_SCRIPT, mode="755")
    ctx: dict[str, Any] = {"root": settings.root.rstrip("/"), "vault": settings.vault.rstrip("/"), "keep_days": settings.vault_keep_days}
    units = [template_file(f"backup/etc/systemd/system/{u}.j2", f"/etc/systemd/system/{u}", owes="daemon-reload", **ctx)
             for u in VAULT_UNITS]
    owed_action("daemon-reload", "systemctl daemon-reload", units)
    systemd.service(name="webstack-vault.timer enabled", service="webstack-vault.timer", enabled=True, running=True)
    alert_on_failure("webstack-vault.service")


def restore_from_vault(snapshot: str, cluster: str) -> None:
    """Put the vault's ``snapshot`` (``latest``: the newest complete one) back as ``cluster``'s
    repository before a restore reads it; what the repository held is moved aside into the vault."""
    cfg = config()
    if snapshot != "latest" and not agent.SNAPSHOT.match(snapshot):
        raise OperationError(f"--data vault={snapshot}: `latest` or a snapshot name such as 20261203T214000Z "
                             f"(webstack-vault list on {cfg.name})")
    if cluster not in topology(cfg).backup_clients(cfg.name):
        raise OperationError(f"{cfg.name} holds no repository of cluster {cluster!r}")
    settings = cfg.settings(BackupSettings)
    server.shell(name=f"Repository of {cluster} from the vault ({snapshot})",
                 commands=[shlex.join([VAULT_SCRIPT, "--root", settings.root.rstrip("/"),
                                       "--vault", settings.vault.rstrip("/"), "restore", cluster, snapshot])])

"""The backup role: an off-site host for pgBackRest repositories, holding ciphertext only.

Each database cluster that names this host (``postgres__backup_host``) gets a
system account ``pgbr-<cluster>`` that can do nothing but SFTP inside its own
chroot (``<root>/<cluster>``, the repository in ``repo/``). Its key is only
accepted from the cluster's members (and restore-drill hosts), and the
firewall opens SSH to those addresses only. Encryption happens on the
database hosts; the passphrase is never part of this host's configuration.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server

from roles._lib import config, validated_file
from roles.backup.settings import BackupSettings
from roles.topology import topology
from webstack.inventory import HostConfig
from webstack.sshkeys import public_key

KEYS_DIR = "/etc/ssh/webstack-sftp"


def account(cluster: str) -> str:
    """The SFTP account of a cluster's repository."""
    return f"pgbr-{cluster}"


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
    root = cfg.settings(BackupSettings).root.rstrip("/")
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

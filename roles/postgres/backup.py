"""pgBackRest on the members of a PostgreSQL cluster: WAL archiving, scheduled backups, checks.

Every member gets the same configuration, so archiving follows a promotion:
only a primary archives (``archive_mode = on``), and the hourly timer runs on
every member but backs up only where the server is the primary. Encryption
(aes-256-cbc) happens here, on the database host; the repository host sees
ciphertext. See docs/backup-plan.md for the design and its sources.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pyinfra import host, inventory, state
from pyinfra.api import FactBase, OperationError, operation
from pyinfra.facts.files import File
from pyinfra.operations import files, systemd

from roles._lib import alert_on_failure, install_packages, owed_action, render, root_shell, template_file, validated_file
from roles.base.settings import BaseSettings
from roles.postgres._release import PGBACKREST_SFTP, paths
from roles.postgres.settings import PostgresSettings
from roles.registry import PGBACKREST_PACKAGES
from roles.topology import topology
from webstack import tls
from webstack.inventory import HostConfig, Peer
from webstack_agent import backup as agent

CONF_DIR = "/etc/pgbackrest"
KEY_FILE = f"{CONF_DIR}/sftp_key"
KNOWN_HOSTS = f"{CONF_DIR}/sftp_known_hosts"
TLS_DIR = f"{CONF_DIR}/tls"
TLS_PORT = 8432
MOUNT_ROOT = "/srv/webstack-backup"
SCRIPT = "/usr/local/lib/webstack/webstack-backup"
UNITS = ("webstack-backup.service", "webstack-backup.timer", "webstack-backup-check.service",
         "webstack-backup-check.timer", "webstack-backup-verify.service", "webstack-backup-verify.timer")
TIMERS = ("webstack-backup.timer", "webstack-backup-check.timer", "webstack-backup-verify.timer")
REPO_MOUNT_UNIT = "webstack-backup-repo.service"
# The pgN-* options pgbackrest.conf.j2 writes for each other member (N > 1); the agent resets them
# for a backup without a streaming standby (tests/unit/test_backup.py holds this list to the template).
MEMBER_OPTIONS = ("host", "host-type", "host-port", "host-cert-file", "host-key-file", "host-ca-file", "path")


def enabled(pg: PostgresSettings) -> bool:
    """Whether a cluster's settings turn backups on."""
    return bool(pg.backup_host or pg.backup_s3_bucket)


def archive_command(pg: PostgresSettings) -> str:
    """PostgreSQL's archive_command for a cluster (pgBackRest's async push when backups are on)."""
    return f"pgbackrest --stanza={pg.cluster} archive-push %p" if enabled(pg) else pg.archive_command


# In pg_wal during a failover's promotion, when the archive was found to hold nothing the
# promoted standby lacks (see restore_command and orchestrate.ArchiveCheck).
PROMOTING = "webstack-promoting"


def restore_command(pg: PostgresSettings) -> str:
    """restore_command, so a standby that fell behind its slot can catch up from the archive.

    PostgreSQL asks the archive for a timeline's history file even when pg_wal holds it
    (promotion does twice: the new timeline's, to avoid one already taken, and the parent's,
    to write the new one). History files never change once written, so one found in pg_wal
    is used as is. A promotion also asks for the segment being streamed when it stopped.
    During a failover the promoting command checks the archive first, overlapped with its
    question to the old primary: when the archive holds no segment past what this standby
    received and no newer timeline, it leaves the marker PROMOTING in pg_wal and the
    promotion does not wait for the repository (0.2-0.9 s per question over SFTP); the
    marker counts for 60 s at most, so a forgotten one cannot stop a later catch-up.
    """
    if not enabled(pg):
        return ""
    local = ('case "%f" in *.history) test -f "pg_wal/%f" && cp "pg_wal/%f" "%p" && exit 0;; esac; '
             f'test -n "$(find pg_wal/{PROMOTING} -newermt \'60 seconds ago\' 2>/dev/null)" && exit 1; ')
    return local + f'pgbackrest --stanza={pg.cluster} archive-get %f "%p"'


def repo_context(pg: PostgresSettings, release: str, version: str, backup_peer: Peer | None,
                 me: Peer | None = None, others: Sequence[Peer] = ()) -> dict[str, Any]:
    """Template variables of pgbackrest.conf (and the sshfs unit) for cluster ``pg.cluster``.

    ``me`` and ``others``: this member and the other members, reached through
    pgBackRest's TLS server so backups can read data files from a standby
    (none for a drill host, which is no member).
    """
    if pg.backup_s3_bucket:
        repo_type, repo_path = "s3", f"/{pg.cluster}"
    elif PGBACKREST_SFTP[release]:
        repo_type, repo_path = "sftp", "/repo"
    else:
        repo_type, repo_path = "posix", f"{MOUNT_ROOT}/{pg.cluster}"
    if backup_peer is None and not pg.backup_s3_bucket:
        raise OperationError(f"cluster {pg.cluster}: backup host {pg.backup_host!r} is not in the inventory")
    return {
        "stanza": pg.cluster,
        "repo_type": repo_type,
        "repo_path": repo_path,
        "sshfs": repo_type == "posix",
        "sftp_host": backup_peer.address if backup_peer else "",
        "sftp_port": backup_peer.settings(BaseSettings).ssh_port if backup_peer else 22,
        "sftp_user": f"pgbr-{pg.cluster}",
        "key_file": KEY_FILE,
        "known_hosts": KNOWN_HOSTS,
        "s3_bucket": pg.backup_s3_bucket,
        "s3_endpoint": pg.backup_s3_endpoint,
        "s3_region": pg.backup_s3_region,
        "s3_uri_style": pg.backup_s3_uri_style,
        "retention_full": pg.backup_retention_full,
        "retention_diff": pg.backup_retention_diff,
        "queue_max": pg.backup_queue_max,
        "data": paths(version).data,
        "tls_dir": TLS_DIR,
        "tls_port": TLS_PORT,
        "me": me,
        "others": list(others),
    }


def check_limits(pg: PostgresSettings) -> agent.Limits:
    """The inventory's thresholds of ``webstack-backup check``."""
    return agent.Limits(max_wal_lag_s=pg.backup_check_max_wal_lag_s, max_age_h=pg.backup_check_max_age_h,
                        max_diff_age_h=pg.backup_check_max_diff_age_h, max_full_age_h=pg.backup_check_max_full_age_h,
                        max_slot_wal_mb=pg.backup_check_max_slot_wal_mb)


def check_args(pg: PostgresSettings) -> list[str]:
    """The inventory's thresholds as arguments of ``webstack-backup check``."""
    return check_limits(pg).args()


def agent_config(pg: PostgresSettings, others: Sequence[Peer]) -> str:
    """The agent's settings file (``agent.CONFIG``) for a member of cluster ``pg.cluster``."""
    options = tuple(f"pg{i}-{o}" for i in range(2, len(others) + 2) for o in MEMBER_OPTIONS)
    return agent.Config(stanza=pg.cluster, limits=check_limits(pg), other_member_options=options).to_json()


def secrets_context(cfg: HostConfig, cluster: str, s3: bool) -> dict[str, str]:
    """Plaintext values for conf.d/secrets.conf (rendered on the control machine, uploaded 0640)."""
    out = {"cipher_pass": cfg.secret(f"pgbackrest_cipher_pass_{cluster}").unmask(), "s3_key": "", "s3_key_secret": ""}
    if s3:
        out["s3_key"] = cfg.secret(f"pgbackrest_s3_key_{cluster}").unmask()
        out["s3_key_secret"] = cfg.secret(f"pgbackrest_s3_key_secret_{cluster}").unmask()
    return out


class SshHostKeys(FactBase):
    """The host's public SSH host keys (``type base64`` lines)."""

    default = list

    def command(self) -> str:
        return "cat /etc/ssh/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_rsa_key.pub 2>/dev/null || true"

    def process(self, output: Sequence[str]) -> list[str]:
        return [" ".join(line.split()[:2]) for line in output if line.strip()]


class PgBackrestInfo(FactBase):
    """``pgbackrest info --output=json`` for one stanza (None when pgBackRest is missing or unreadable)."""

    def command(self, stanza: str) -> str:
        return (f"command -v pgbackrest >/dev/null && runuser -u postgres -- pgbackrest --stanza={stanza} "
                "--output=json info 2>/dev/null || true")

    def process(self, output: Sequence[str]) -> dict[str, Any] | None:
        text = "\n".join(output).strip()
        try:
            data = json.loads(text) if text else []
        except ValueError:
            return None
        return data[0] if data else None


def known_hosts_lines(backup_peer: Peer) -> str | None:
    """known_hosts content for the backup host, read from it when it takes part in this run."""
    other = inventory.get_host(backup_peer.name, default=None)
    if other is None or other not in state.active_hosts:
        return None
    keys = other.get_fact(SshHostKeys)
    port = backup_peer.settings(BaseSettings).ssh_port
    name = backup_peer.address if port == 22 else f"[{backup_peer.address}]:{port}"
    return "".join(f"{name} {k}\n" for k in keys)


@operation()
def stanza_create(stanza: str):
    """Create the stanza in the repository unless it is there and matches this database.

    + stanza: the cluster name
    """
    st = host.get_fact(PgBackrestInfo, stanza=stanza)
    code = (st or {}).get("status", {}).get("code")
    if st and code not in (1, 3):  # 1: missing stanza path, 3: missing stanza data
        host.noop(f"stanza {stanza}: status {code} {st['status'].get('message', '')}"
                  + ("" if code in (0, 2) else " (the check reports it)"))
        return
    yield f"runuser -u postgres -- {SCRIPT} stanza-create --stanza {stanza}"


@operation()
def first_backup(stanza: str):
    """Take a full backup when the repository has none (the base every restore starts from).

    + stanza: the cluster name
    """
    st = host.get_fact(PgBackrestInfo, stanza=stanza)
    if st and (st.get("backup") or st.get("status", {}).get("code") != 2):
        host.noop(f"stanza {stanza} has {len(st.get('backup', []))} backup(s)")
        return
    yield f"runuser -u postgres -- {SCRIPT} scheduled --stanza {stanza} --type full"


def install_client(cfg: HostConfig, release: str, version: str, pg: PostgresSettings, conf_dir: str = CONF_DIR,
                   secrets_cfg: Any = None) -> tuple[Any, list]:
    """Packages, keys and configuration for cluster ``pg.cluster``'s repository; returns (context, swaps)."""
    peers = {p.name: p for p in cfg.peers}
    backup_peer = peers.get(pg.backup_host) if pg.backup_host else None
    member = secrets_cfg is None
    others = topology(cfg).cluster_peers(cfg.name) if member else []
    ctx = repo_context(pg, release, version, backup_peer, peers[cfg.name] if member else None, others)
    install_packages("Install pgBackRest", [*PGBACKREST_PACKAGES, *(["sshfs"] if ctx["sshfs"] else [])])
    for path, owner, mode in ((CONF_DIR, "root", "755"), (f"{CONF_DIR}/conf.d", "root", "755"),
                              ("/var/spool/pgbackrest", "postgres", "750"), ("/var/log/pgbackrest", "postgres", "770")):
        files.directory(name=f"Directory {path}", path=path, user=owner, group="postgres", mode=mode)
    swaps = []
    scfg = secrets_cfg or cfg
    if ctx["repo_type"] != "s3":
        owes = "remount-backup-repo" if ctx["sshfs"] else None
        swaps.append(validated_file(
            name=f"SFTP key of {ctx['sftp_user']}", dest=KEY_FILE, user="postgres", group="postgres", mode="600",
            owes=owes,
            content=scfg.secret(f"pgbackrest_sftp_key_{pg.cluster}").unmask().strip() + "\n",
        ))
        assert backup_peer is not None
        lines = known_hosts_lines(backup_peer)
        if lines:
            swaps.append(validated_file(name=f"Host keys of {backup_peer.name}", dest=KNOWN_HOSTS, content=lines,
                                        owes=owes))
        elif not host.get_fact(File, path=KNOWN_HOSTS):
            raise OperationError(f"{cfg.name}: include the backup host {backup_peer.name} in this run "
                                 "(its SSH host key is read from it, never trusted on first use)")
    swaps.append(template_file("postgres/etc/pgbackrest/pgbackrest.conf.j2", f"{conf_dir}/pgbackrest.conf",
                               mode="640", group="postgres", **ctx))
    swaps.append(validated_file(
        name=f"Secrets of the {pg.cluster} repository", dest=f"{conf_dir}/conf.d/secrets.conf", mode="640",
        group="postgres",
        content=render("postgres/etc/pgbackrest/conf.d/secrets.conf.j2",
                       **secrets_context(scfg, pg.cluster, bool(pg.backup_s3_bucket))),
    ))
    if member:
        validated_file(name=f"Settings of {SCRIPT}", dest=agent.CONFIG, content=agent_config(pg, others),
                       mode="640", group="postgres")
    files.put(name=f"Install {SCRIPT}", src=agent.__file__, dest=SCRIPT, mode="755")
    if member:
        ca_key = cfg.secret(f"pgbackrest_tls_ca_key_{pg.cluster}").unmask()
        ca_name = f"webstack pgbackrest {pg.cluster}"
        key, cert = tls.derived_leaf(ca_key, ca_name, cfg.name, [cfg.address])
        files.directory(name=f"Directory {TLS_DIR}", path=TLS_DIR, user="root", group="postgres", mode="750")
        swaps.append(validated_file(name="pgBackRest TLS CA", dest=f"{TLS_DIR}/ca.crt",
                                    content=tls.derived_ca(ca_key, ca_name), owes="restart-pgbackrest-server"))
        swaps.append(validated_file(name="pgBackRest TLS certificate", dest=f"{TLS_DIR}/member.crt", content=cert,
                                    owes="restart-pgbackrest-server"))
        swaps.append(validated_file(name="pgBackRest TLS key", dest=f"{TLS_DIR}/member.key", content=key,
                                    user="postgres", group="postgres", mode="600", owes="restart-pgbackrest-server"))
    return ctx, swaps


def apply(cfg: HostConfig, release: str, version: str, is_primary: bool, restoring: bool = False) -> None:
    """Repository access, timers and (on the primary) the stanza and a first backup."""
    pg = cfg.settings(PostgresSettings)
    if not enabled(pg):
        timers = [t for t in TIMERS if host.get_fact(File, path=f"/etc/systemd/system/{t}")]
        for timer in timers:
            systemd.service(name=f"{timer} stopped (backups off)", service=timer, enabled=False, running=False)
        return
    ctx, swaps = install_client(cfg, release, version, pg)
    units = [template_file(f"postgres/etc/systemd/system/{unit}.j2", f"/etc/systemd/system/{unit}",
                           owes="daemon-reload", **ctx) for unit in UNITS]
    mount_unit = []
    if ctx["sshfs"]:
        mount_unit.append(template_file(f"postgres/etc/systemd/system/{REPO_MOUNT_UNIT}.j2",
                                        f"/etc/systemd/system/{REPO_MOUNT_UNIT}", owes="remount-backup-repo", **ctx))
    owed_action("daemon-reload", "systemctl daemon-reload", units + mount_unit)
    if ctx["sshfs"]:
        # The mount point itself is made by the unit: once mounted it belongs
        # to postgres alone (no allow_other), and even root cannot stat it.
        files.directory(name=f"Mount points under {MOUNT_ROOT}", path=MOUNT_ROOT, user="root", group="root", mode="755")
        systemd.service(name="Repository mounted (sshfs)", service=REPO_MOUNT_UNIT, enabled=True, running=True)
        owed_action("remount-backup-repo", f"systemctl daemon-reload && systemctl restart {REPO_MOUNT_UNIT}",
                    mount_unit + swaps[:2])
    for timer in TIMERS:
        systemd.service(name=f"{timer} enabled", service=timer, enabled=True, running=True)
    # A failed backup, check or verify mails the operator (base__operator_email).
    alert_on_failure(*(t.replace(".timer", ".service") for t in TIMERS))
    # The TLS server lets the member running a backup read data files from a standby.
    systemd.service(name="pgBackRest TLS server", service="pgbackrest", enabled=True, running=True)
    owed_action("restart-pgbackrest-server", "systemctl restart pgbackrest", swaps)
    if is_primary and not restoring:
        stanza_create(name=f"Stanza {pg.cluster} in the repository", stanza=pg.cluster)
        first_backup(name=f"First full backup of {pg.cluster}", stanza=pg.cluster)


def check() -> None:
    """On each cluster's named primary: ``webstack-backup check`` with the inventory's thresholds."""
    from pyinfra.api import StringCommand
    from pyinfra.operations import python

    from roles._lib import config

    cfg = config()
    pg = cfg.settings(PostgresSettings) if "postgres" in cfg.roles else None
    if pg is None or not enabled(pg) or pg.primary != cfg.name:
        host.noop("not the primary of a cluster with backups")
        return

    def report() -> None:
        ok, out = root_shell(host, StringCommand(
            "runuser", "-u", "postgres", "--", SCRIPT, "check", "--require-primary", "--stanza", pg.cluster,
            *check_args(pg)), 600)
        print(f"[{cfg.name}] {out.stdout}{out.stderr}")
        if not ok:
            raise OperationError(f"{cfg.name}: backups of cluster {pg.cluster} fail the check: {out.stdout}")

    python.call(name=f"Backups and WAL archive of {pg.cluster} within thresholds", function=report)

"""Machines: overlay root, first-boot identity, supervisor process, stop/poweroff, SSH wait."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from lab import net
from lab.config import Fleet, Machine
from lab.image import image_path
from lab.util import (
    APT_POOL_DIR,
    KNOWN_HOSTS,
    MACHINES_DIR,
    REPO_ROOT,
    SSH_DIR,
    SSH_KEY,
    LabError,
    is_mounted,
    log,
    pid_matches,
    read_pid,
    run,
    write_atomic,
)

STOP_TIMEOUT = 15.0
# CAP_NET_ADMIN: addresses (keepalived VIP), nftables, sysctl net.* in the machine's netns.
# CAP_NET_RAW (ping, VRRP) is already in nspawn's default capability set.
CAPABILITIES = "CAP_NET_ADMIN"


def mdir(name: str) -> Path:
    """State dir of a machine."""
    return MACHINES_DIR / name


def merged_dir(name: str) -> Path:
    """Mount point of the machine's root filesystem."""
    return mdir(name) / "merged"


def lab_machine_names() -> list[str]:
    """Names of all machines with a state dir (including ones no longer in the fleet)."""
    if not MACHINES_DIR.exists():
        return []
    return sorted(p.name for p in MACHINES_DIR.iterdir() if p.is_dir())


# --- processes --------------------------------------------------------------------------

def supervisor_pid(name: str) -> int | None:
    """The machine's live supervisor pid (verified by its cmdline), else None."""
    pid = read_pid(mdir(name) / "supervisor.pid")
    return pid if pid_matches(pid, "lab.supervisor") and pid_matches(pid, str(mdir(name))) else None


def nspawn_pid(name: str) -> int | None:
    """The machine's live systemd-nspawn pid (verified by its cmdline), else None."""
    pid = read_pid(mdir(name) / "nspawn.pid")
    return pid if pid_matches(pid, "systemd-nspawn") and pid_matches(pid, str(merged_dir(name))) else None


def state(name: str) -> str:
    """running | orphaned (machine processes without nspawn) | powered-off | stopped."""
    if nspawn_pid(name) or supervisor_pid(name):
        return "running"
    if net.netns_pids(name):
        return "orphaned"
    if (mdir(name) / "powered-off").exists():
        return "powered-off"
    return "stopped"


def _signal(pid: int | None, sig: int) -> None:
    if pid:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_many(names: list[str], timeout: float = STOP_TIMEOUT) -> None:
    """Clean shutdown (SIGTERM -> nspawn powers the container off), SIGKILL after timeout."""
    pending = []
    for name in names:
        sup, nsp = supervisor_pid(name), nspawn_pid(name)
        if sup:
            _signal(sup, signal.SIGTERM)  # supervisor forwards to nspawn and won't restart
        elif nsp:
            _signal(nsp, signal.SIGTERM)
        if sup or nsp:
            pending.append(name)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = [n for n in pending if supervisor_pid(n) or nspawn_pid(n)]
        time.sleep(0.2)
    for name in pending:
        log(f"{name}: no clean shutdown within {timeout:.0f}s, killing")
        _signal(supervisor_pid(name), signal.SIGKILL)
        _signal(nspawn_pid(name), signal.SIGKILL)
    for name in names:  # anything left in the netns (container init orphaned by a dead nspawn)
        net.kill_netns_pids(name)
        for f in ("supervisor.pid", "nspawn.pid"):
            (mdir(name) / f).unlink(missing_ok=True)


def kill_hard(name: str) -> None:
    """SIGKILL supervisor, nspawn and every process of the machine: nothing shuts down cleanly."""
    _signal(supervisor_pid(name), signal.SIGKILL)
    _signal(nspawn_pid(name), signal.SIGKILL)
    net.kill_netns_pids(name)
    for f in ("supervisor.pid", "nspawn.pid"):
        (mdir(name) / f).unlink(missing_ok=True)


# --- root filesystem ----------------------------------------------------------------------

def _seed_apt(release: str, upper: Path) -> None:
    """Hard-link the release's .deb pool into a fresh upper dir's apt archive (no copy)."""
    pool = APT_POOL_DIR / release
    if not pool.is_dir():
        return
    dest = upper / "var/cache/apt/archives"
    for d in (upper / "var", upper / "var/cache", upper / "var/cache/apt", dest):
        d.mkdir(mode=0o755, exist_ok=True)
    for deb in pool.glob("*.deb"):
        try:
            os.link(deb, dest / deb.name)
        except FileExistsError:
            pass
        except OSError:
            shutil.copy2(deb, dest / deb.name)


def harvest_apt(name: str) -> int:
    """Hard-link .debs a machine downloaded into the shared per-release pool; return count."""
    meta = read_meta(name)
    if not meta:
        return 0
    src = mdir(name) / "upper/var/cache/apt/archives"
    if not src.is_dir():
        return 0
    pool = APT_POOL_DIR / meta["release"]
    pool.mkdir(parents=True, exist_ok=True)
    n = 0
    for deb in src.glob("*.deb"):  # complete files only: apt downloads into partial/ then renames
        target = pool / deb.name
        if target.exists():
            continue
        try:
            os.link(deb, target)
        except OSError:
            shutil.copy2(deb, target)
        n += 1
    return n


def read_meta(name: str) -> dict[str, str] | None:
    """meta.json written when the machine was created, or None."""
    try:
        return json.loads((mdir(name) / "meta.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def ensure_ssh_keypair() -> None:
    """Create the lab's client keypair once."""
    SSH_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not SSH_KEY.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "webstack-lab", "-f", SSH_KEY])


# Package installs are most of a cold deploy, and on this 2-core host 15 machines install at once.
# As Debian's own container images do: no fsync per unpacked file (a lab machine that loses power
# mid-install is rebuilt, not repaired), and no manual pages, info pages or translations.
DPKG_CFG = """\
# Written by the webstack lab (lab/machine.py).
force-unsafe-io
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
"""

# In these containers systemd cannot move a user manager into its cgroup ("Failed to attach ...
# to compat systemd cgroup: Permission denied"), and stopping one then hangs until its stop timeout
# (2 min, "Processes still around after final SIGKILL"). logind stops a user's manager 10 s after
# their last logout; the next login meanwhile waits for it, and pam_systemd gives up after 25 s: a
# lab host that answered SSH in 25 s instead of 0.1 s failed a run once (backup1, whose SFTP
# accounts log in every minute). The user managers are kept instead (a container artifact: on
# VMs and real servers they stop normally).
LOGIND_DROPIN = """\
# Written by the webstack lab (lab/machine.py).
[Login]
UserStopDelaySec=infinity
"""

# The same kept user managers (and their session scopes) then hang a reboot for their whole stop
# timeouts (user@: 2 min, a scope: 90 s): a trixie host's patch-run reboot took 2-3.5 min instead
# of seconds. Nothing of theirs needs stopping gracefully in the lab, so they get a few seconds.
USER_STOP_DROPIN = """\
# Written by the webstack lab (lab/machine.py).
[Service]
TimeoutStopSec=3s
"""
SCOPE_STOP_DROPIN = """\
# Written by the webstack lab (lab/machine.py).
[Scope]
TimeoutStopSec=3s
"""
# The same container artifact hits services: systemd in these containers (cgroup v1 host) can miss
# the exit of a unit's last process, and a stop or restart then waits out the unit's whole stop
# timeout although nothing is left to stop. Measured: webstack-pg-watch's restart took 90 s instead
# of 0.1 s (a growth-test onboarding step), the lab provider's Postfix stop 90 s, the demo app's
# start after a kill 32 s (its own TimeoutStopSec=35). Units without a stop timeout of their own
# get 10 s here instead of 90 s; those that set one (PostgreSQL, the app, the workers) keep it.
MANAGER_DROPIN = """\
# Written by the webstack lab (lab/machine.py).
[Manager]
DefaultTimeoutStopSec=10s
"""
STOP_DROPINS = {"etc/systemd/system/user@.service.d/50-webstack-lab.conf": USER_STOP_DROPIN,
                "etc/systemd/system/session-.scope.d/50-webstack-lab.conf": SCOPE_STOP_DROPIN,
                "etc/systemd/system.conf.d/50-webstack-lab.conf": MANAGER_DROPIN}


def _personalise(fleet: Fleet, m: Machine, root: Path) -> None:
    """Write the machine's identity into its (mounted) root: hostname, ids, keys, DNS."""
    (root / "etc/hostname").write_text(f"{m.name}\n")
    (root / "etc/hosts").write_text(
        "127.0.0.1\tlocalhost\n"
        f"{m.address}\t{m.name}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    )
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    dpkg = root / "etc/dpkg/dpkg.cfg.d"
    dpkg.mkdir(parents=True, exist_ok=True)
    (dpkg / "webstack-lab").write_text(DPKG_CFG)
    logind = root / "etc/systemd/logind.conf.d"
    logind.mkdir(parents=True, exist_ok=True)
    (logind / "50-webstack-lab.conf").write_text(LOGIND_DROPIN)
    for rel, text in STOP_DROPINS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.write_text(Path("/etc/resolv.conf").read_text())
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    os.chmod(ssh, 0o700)
    auth = ssh / "authorized_keys"
    auth.write_text(SSH_KEY.with_suffix(".pub").read_text())
    os.chmod(auth, 0o600)
    for old in (root / "etc/ssh").glob("ssh_host_*"):
        old.unlink()
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{m.name}",
         "-f", root / "etc/ssh/ssh_host_ed25519_key"])


def ensure_root(fleet: Fleet, m: Machine) -> bool:
    """Mount the machine's overlay root, creating it on first use. True if newly created."""
    d = mdir(m.name)
    upper, work, merged = d / "upper", d / "work", d / "merged"
    meta = read_meta(m.name)
    if meta and meta.get("release") != m.release:
        raise LabError(f"{m.name} was created as {meta.get('release')} but the fleet says "
                       f"{m.release}: run `python -m lab down` first")
    new = meta is None
    if new:
        if is_mounted(merged):
            run(["umount", merged])
        for p in (upper, work):
            shutil.rmtree(p, ignore_errors=True)
    for p in (upper, work, merged):
        p.mkdir(parents=True, exist_ok=True)
    if new:
        _seed_apt(m.release, upper)
    if not is_mounted(merged):
        lower = image_path(m.release)
        run(["mount", "-t", "overlay", f"webstack-lab-{m.name}", "-o",
             f"lowerdir={lower},upperdir={upper},workdir={work}", merged])
    if new:
        _personalise(fleet, m, merged)
        write_atomic(d / "meta.json", json.dumps({"release": m.release, "address": m.address}) + "\n")
    return new


def destroy(name: str) -> None:
    """Unmount and delete a machine's state dir (its disk). Refuses if still mounted."""
    merged = merged_dir(name)
    if is_mounted(merged):
        if run(["umount", merged], check=False).returncode != 0:
            run(["umount", "-l", merged])
    if is_mounted(merged):
        raise LabError(f"{merged} is still mounted; not deleting {mdir(name)}")
    shutil.rmtree(mdir(name), ignore_errors=False)


# --- boot -----------------------------------------------------------------------------------

def nspawn_argv(m: Machine) -> list[str]:
    """The systemd-nspawn command line for m (see lab/README.md for why each flag)."""
    return [
        "systemd-nspawn",
        "-D", str(merged_dir(m.name)),
        "--register=no", "--keep-unit",
        "-b",
        f"--machine={m.name}",
        f"--network-namespace-path=/run/netns/{m.name}",
        "--private-network",
        f"--capability={CAPABILITIES}",
        "--bind=/dev/fuse",  # sshfs: bookworm's pgBackRest 2.45 reaches the backup host through it
        "--resolv-conf=off",
        "--link-journal=no",
        "--console=read-only",
        "--kill-signal=SIGRTMIN+4",
    ]


def boot(fleet: Fleet, m: Machine) -> int:
    """Start the detached supervisor (which starts nspawn). Return the supervisor pid."""
    d = mdir(m.name)
    # Machines get the control machine's /dev/fuse (sshfs). Debian's udev makes
    # it 0666; this control machine has no udev, so set what udev would.
    if os.path.exists("/dev/fuse") and os.stat("/dev/fuse").st_mode & 0o777 != 0o666:
        os.chmod("/dev/fuse", 0o666)
    (d / "powered-off").unlink(missing_ok=True)
    (d / "last-exit").unlink(missing_ok=True)
    (d / "nspawn.pid").unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    primary = f"{m.address}/{fleet.prefixlen}"
    with open(d / "console.log", "ab") as logf:
        logf.write(f"\n===== lab boot {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
        logf.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "lab.supervisor", str(d), m.name, primary, "--", *nspawn_argv(m)],
            cwd=str(REPO_ROOT), env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
            start_new_session=True, close_fds=True,
        )
    (d / "supervisor.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def ssh_base_argv(batch: bool = False) -> list[str]:
    """ssh options for lab machines: lab key, lab known_hosts, strict host key checking."""
    argv = [
        "ssh", "-i", str(SSH_KEY),
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={KNOWN_HOSTS}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "LogLevel=ERROR",
    ]
    if batch:
        argv += ["-o", "BatchMode=yes", "-o", "ConnectTimeout=3"]
    return argv


def write_known_hosts(fleet: Fleet) -> bool:
    """known_hosts with each machine's address and ed25519 host key; True if it changed."""
    lines = []
    for m in fleet.machines:
        pub = mdir(m.name) / "upper/etc/ssh/ssh_host_ed25519_key.pub"
        if pub.exists():
            kind, key = pub.read_text().split()[:2]
            lines.append(f"{m.address} {kind} {key}\n")
    SSH_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    return write_atomic(KNOWN_HOSTS, "".join(lines), mode=0o644)


def console_tail(name: str, lines: int = 15) -> str:
    """Last lines of the machine's console log."""
    try:
        text = (mdir(name) / "console.log").read_text(errors="replace")
    except FileNotFoundError:
        return "(no console.log)"
    return "\n".join(text.splitlines()[-lines:])


# Who the lab logs in as: root on a fresh machine, the base role's admin user after onboarding.
LOGIN_USERS = ("root", "ops")


def login_user(m: Machine) -> str:
    """The first of LOGIN_USERS that the machine accepts (root if none answers)."""
    for user in LOGIN_USERS:
        cp = subprocess.run([*ssh_base_argv(batch=True), f"{user}@{m.address}", "true"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15)
        if cp.returncode == 0:
            return user
    return LOGIN_USERS[0]


def _init_pid(name: str) -> int | None:
    """PID 1 of the machine, as the host sees it (the child of systemd-nspawn)."""
    nsp = nspawn_pid(name)
    if not nsp:
        return None
    try:
        children = Path(f"/proc/{nsp}/task/{nsp}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


# Units that failed at boot because systemd could not spawn them: result "resources" (seen
# once on this kind of host, on backup1 (trixie), as "Failed to spawn executor: No such file or
# directory" for systemd-user-sessions), or exit status 219/CGROUP (db4 (bookworm): "Failed to
# attach to cgroup /system.slice/systemd-user-sessions.service: No such file or directory").
# Such a failure is the container's, never the tested software's; there it left /run/nologin,
# and every login but root's was refused.
_RETRY_SPAWN_FAILURES = (
    "for u in $(systemctl list-units --state=failed --plain --no-legend | awk '{print $1}'); do "
    "{ [ \"$(systemctl show -P Result \"$u\")\" = resources ] || [ \"$(systemctl show -P ExecMainStatus \"$u\")\" = 219 ]; } "
    # reset-failed first: a unit whose condition is now unmet (ConditionNeedsUpdate= met only on the
    # first boot's first try) is skipped by the restart and would otherwise stay failed for ever.
    "&& systemctl reset-failed \"$u\" && systemctl restart \"$u\" && echo \"$u\"; done; true"
)


def retry_spawn_failures(m: Machine) -> list[str]:
    """Start again the units that failed to spawn at boot (from the host, as logins may be refused)."""
    init = _init_pid(m.name)
    if not init:
        return []
    cp = subprocess.run(["nsenter", "-t", str(init), "-a", "sh", "-c", _RETRY_SPAWN_FAILURES],
                        capture_output=True, text=True, timeout=60)
    retried = cp.stdout.split()
    if retried:
        log(f"{m.name}: started again after a spawn failure at boot: {', '.join(retried)}")
    return retried


def wait_ssh(m: Machine, timeout: float = 120.0) -> tuple[float, str]:
    """Wait until `ssh root@ADDR` (or `ops@ADDR` once onboarded) works and boot has finished.

    Returns (seconds waited, systemd state: running or degraded).
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    users = [*LOGIN_USERS]
    while time.monotonic() < deadline:
        # Fresh machines take root; once the base role has onboarded them, only the admin user.
        users.append(users.pop(0))
        argv = [*ssh_base_argv(batch=True), f"{users[-1]}@{m.address}", "systemctl is-system-running --wait"]
        if not (supervisor_pid(m.name) or nspawn_pid(m.name)):
            raise LabError(f"{m.name}: machine exited while booting; console.log tail:\n"
                           f"{console_tail(m.name)}")
        try:
            cp = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=max(5.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
        sysstate = cp.stdout.strip()
        if sysstate == "running" or (sysstate == "degraded" and not retry_spawn_failures(m)):
            return time.monotonic() - t0, sysstate
        if cp.returncode != 0 and not sysstate:  # no login: maybe /run/nologin left by a spawn failure
            retry_spawn_failures(m)
        time.sleep(0.3)
    raise LabError(f"{m.name}: no SSH on {m.address} (or boot unfinished) after {timeout:.0f}s; "
                   f"console.log tail:\n{console_tail(m.name)}")

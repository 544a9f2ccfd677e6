"""Paths, subprocess helpers, errors and pid bookkeeping shared by the lab modules."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

CACHE_DIR = Path("/var/cache/webstack-lab")
BASE_DIR = CACHE_DIR / "base"
APT_POOL_DIR = CACHE_DIR / "apt-archives"
STATE_DIR = Path("/var/lib/webstack-lab")
MACHINES_DIR = STATE_DIR / "machines"
SSH_DIR = STATE_DIR / "ssh"
SSH_KEY = SSH_DIR / "id_ed25519"
KNOWN_HOSTS = SSH_DIR / "known_hosts"
REPO_ROOT = Path(__file__).resolve().parent.parent


class LabError(Exception):
    """An error with a message meant for the user (no traceback)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def log(msg: str) -> None:
    """Print a progress line to stderr."""
    print(msg, file=sys.stderr, flush=True)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    capture: bool = True,
    input: str | None = None,
    timeout: float | None = 120,
) -> subprocess.CompletedProcess[str]:
    """Run a command (argument list, never a shell). Raise LabError on failure if check."""
    args = [str(a) for a in argv]
    try:
        cp = subprocess.run(
            args,
            input=input,
            text=True,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise LabError(f"command not found: {args[0]} (is it installed?)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"command timed out after {timeout}s: {' '.join(args)}") from exc
    if check and cp.returncode != 0:
        err = (cp.stderr or "").strip() if capture else ""
        raise LabError(f"command failed ({cp.returncode}): {' '.join(args)}\n{err}".rstrip())
    return cp


def ok(argv: Sequence[str | os.PathLike[str]]) -> bool:
    """True if the command exits 0 (output discarded)."""
    return run(argv, check=False).returncode == 0


def write_atomic(path: Path, content: str, mode: int = 0o644) -> bool:
    """Write a file atomically; return False (and do nothing) if content is unchanged."""
    try:
        if path.read_text() == content:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(content)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def read_pid(path: Path) -> int | None:
    """Read a pid file; None if absent or garbage."""
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def cmdline(pid: int) -> list[str]:
    """The argv of a live process, or [] if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def pid_alive(pid: int) -> bool:
    """True if the pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def pid_matches(pid: int | None, needle: str) -> bool:
    """True if pid is alive and one of its argv elements contains needle (guards pid reuse)."""
    if not pid or not pid_alive(pid):
        return False
    return any(needle in a for a in cmdline(pid))


def is_mounted(path: Path) -> bool:
    """True if path is a mount point in our mount namespace (per /proc/self/mountinfo)."""
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == target:
                return True
    return False


def require_root() -> None:
    """Exit 2 with a clear message unless running as root."""
    if os.geteuid() != 0:
        raise LabError("the lab must be run as root (it manages mounts, netns, bridges, nftables)", code=2)


def check_kernel_features() -> None:
    """Fail clearly if overlayfs, network namespaces or systemd-nspawn are missing."""
    fs = Path("/proc/filesystems").read_text()
    if "\toverlay\n" not in fs:
        run(["modprobe", "overlay"], check=False)
        if "\toverlay\n" not in Path("/proc/filesystems").read_text():
            raise LabError("kernel has no overlayfs support (overlay not in /proc/filesystems)")
    if not Path("/proc/self/ns/net").exists():
        raise LabError("kernel has no network namespace support (/proc/self/ns/net missing)")
    # Every container's systemd takes inotify instances from root's per-user limit; at Debian's
    # default (128) a fleet of about 40 machines fails to boot ("Failed to allocate manager object").
    limit = Path("/proc/sys/fs/inotify/max_user_instances")
    try:
        if int(limit.read_text()) < 8192:
            limit.write_text("8192\n")
    except OSError as exc:  # a read-only /proc/sys: a small fleet boots anyway
        log(f"could not raise {limit} ({exc}); large fleets may fail to boot")
    for tool in ("systemd-nspawn", "ip", "nft", "ssh", "ssh-keygen", "mount", "umount"):
        if run(["which", tool], check=False).returncode != 0:
            pkg = {"systemd-nspawn": "systemd-container", "ip": "iproute2", "nft": "nftables",
                   "ssh": "openssh-client", "ssh-keygen": "openssh-client"}.get(tool, tool)
            raise LabError(f"{tool} not found: apt-get install {pkg}")

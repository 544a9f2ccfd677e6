"""Build and cache base root filesystems (one per Debian release) with debootstrap.

Layout: /var/cache/webstack-lab/base/<release>/ is a finished image, used read-only as
the overlayfs lower dir of every machine of that release. It is built in
<release>.tmp, finalized there, then renamed, so a half-built image is never used.
Never modify a finished image while machines are mounted on it (overlayfs forbids it):
`lab down`, delete the dir, `lab up` rebuilds.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from lab.util import BASE_DIR, LabError, log, run

MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
INCLUDE = "systemd,systemd-sysv,dbus,openssh-server,iproute2,python3,sudo,ca-certificates,apt-utils"
MARKER = "etc/webstack-lab-image"
# Timers that would grab the apt/dpkg locks at random moments during deploys, or
# that make no sense in a container. Disabled (not masked) so a deploy may enable them.
DISABLE_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.timer",
)
# Units that cannot work in an nspawn container.
MASK_UNITS = ("getty@tty1.service", "systemd-pstore.service")
SSHD_DROPIN = """\
# Written by the webstack lab image builder.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
HostKey /etc/ssh/ssh_host_ed25519_key
"""


def image_path(release: str) -> Path:
    """Path of the finished image for release."""
    return BASE_DIR / release


def _complete(root: Path) -> bool:
    """True if a debootstrap target finished (its /debootstrap work dir is gone)."""
    return (
        not (root / "debootstrap").exists()
        and (root / "usr/sbin/sshd").exists()
        and (root / "usr/bin/python3").exists()
        and (root / "usr/lib/systemd/systemd").exists()
    )


def _debootstrap(release: str, target: Path) -> None:
    log(f"image {release}: debootstrap into {target} (about a minute)")
    run(["debootstrap", "--variant=minbase", f"--include={INCLUDE}", release, target, MIRROR],
        timeout=1800)


def finalize(release: str, root: Path) -> None:
    """Make a debootstrapped tree usable as a lab machine image (idempotent)."""
    # Locally added CAs (TLS-intercepting proxy) so HTTPS works inside machines.
    cas = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    dest = root / "usr/local/share/ca-certificates"
    dest.mkdir(parents=True, exist_ok=True)
    for ca in cas:
        shutil.copy2(ca, dest / ca.name)
    run(["chroot", root, "update-ca-certificates", "--fresh"], timeout=300)

    (root / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {release} main\n"
        f"deb {MIRROR} {release}-updates main\n"
        f"deb {SECURITY_MIRROR} {release}-security main\n"
    )
    deb822 = root / "etc/apt/sources.list.d/debian.sources"
    if deb822.exists():
        deb822.unlink()
    # apt clean + no lists: machines run `apt-get update` themselves.
    for p in (root / "var/cache/apt/archives").glob("*.deb"):
        p.unlink()
    for p in (root / "var/cache/apt").glob("*.bin"):
        p.unlink()
    lists = root / "var/lib/apt/lists"
    for p in lists.iterdir() if lists.exists() else ():
        if p.is_file() and p.name != "lock":
            p.unlink()

    # Per-machine identity is written when a machine is created.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() and not dbus_id.is_symlink():
        dbus_id.unlink()
        dbus_id.symlink_to("/etc/machine-id")
    dropin = root / "etc/ssh/sshd_config.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "50-webstack-lab.conf").write_text(SSHD_DROPIN)

    run(["systemctl", f"--root={root}", "enable", "ssh.service"], check=False)
    for unit in DISABLE_UNITS:
        run(["systemctl", f"--root={root}", "disable", unit], check=False)
    for unit in MASK_UNITS:
        run(["systemctl", f"--root={root}", "mask", unit], check=False)
    (root / MARKER).write_text(f"release={release}\nbuilt={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")


def ensure_image(release: str, rebuild: bool = False) -> Path:
    """Return the finished image for release, building (or adopting a finished .tmp) if needed."""
    final = image_path(release)
    if final.exists() and not rebuild:
        if not (final / MARKER).exists():
            raise LabError(f"{final} exists but is not a finished lab image; remove it and rerun")
        return final
    BASE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = BASE_DIR / f"{release}.tmp"
    if tmp.exists() and not _complete(tmp):
        log(f"image {release}: removing incomplete build {tmp}")
        shutil.rmtree(tmp)
    if not tmp.exists():
        t0 = time.monotonic()
        _debootstrap(release, tmp)
        log(f"image {release}: debootstrap took {time.monotonic() - t0:.0f}s")
    else:
        log(f"image {release}: adopting finished debootstrap in {tmp}")
    finalize(release, tmp)
    if final.exists():  # rebuild: keep the old one aside until the new one is in place
        old = BASE_DIR / f"{release}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    log(f"image {release}: ready at {final}")
    return final

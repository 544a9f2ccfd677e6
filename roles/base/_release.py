"""Debian release differences for the base role (private: not settings)."""

from __future__ import annotations

# ssh-audit's hardening guides for OpenSSH 9.2 (bookworm) and 10.0 (trixie).
SSH_KEX = {
    "bookworm": (
        "sntrup761x25519-sha512@openssh.com", "curve25519-sha256", "curve25519-sha256@libssh.org",
        "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512", "diffie-hellman-group-exchange-sha256",
    ),
    "trixie": (
        "mlkem768x25519-sha256", "sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com",
        "curve25519-sha256", "curve25519-sha256@libssh.org",
        "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512", "diffie-hellman-group-exchange-sha256",
    ),
}
SSH_CIPHERS = (
    "chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com", "aes128-gcm@openssh.com",
    "aes256-ctr", "aes192-ctr", "aes128-ctr",
)
SSH_MACS = ("hmac-sha2-512-etm@openssh.com", "hmac-sha2-256-etm@openssh.com", "umac-128-etm@openssh.com")
SSH_HOST_KEY_ALGORITHMS = (
    "ssh-ed25519", "ssh-ed25519-cert-v01@openssh.com", "sk-ssh-ed25519@openssh.com",
    "sk-ssh-ed25519-cert-v01@openssh.com", "rsa-sha2-512", "rsa-sha2-512-cert-v01@openssh.com",
    "rsa-sha2-256", "rsa-sha2-256-cert-v01@openssh.com",
)

# Kernel/network hardening. net.* keys live in the network namespace and are
# applied in containers too; the others apply on VMs and metal (and at boot).
SYSCTLS = (
    ("net.ipv4.tcp_syncookies", "1"),
    ("net.ipv4.conf.all.rp_filter", "1"),
    ("net.ipv4.conf.default.rp_filter", "1"),
    ("net.ipv4.conf.all.accept_redirects", "0"),
    ("net.ipv4.conf.default.accept_redirects", "0"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.all.accept_source_route", "0"),
    ("net.ipv6.conf.all.accept_redirects", "0"),
    ("net.ipv6.conf.default.accept_redirects", "0"),
    ("net.ipv4.icmp_echo_ignore_broadcasts", "1"),
    ("kernel.kptr_restrict", "2"),
    ("kernel.dmesg_restrict", "1"),
    ("fs.protected_hardlinks", "1"),
    ("fs.protected_symlinks", "1"),
    ("fs.suid_dumpable", "0"),
    ("net.ipv4.conf.all.log_martians", "1"),
    ("net.ipv4.conf.default.log_martians", "1"),
)

# Kernel modules a server of this stack never needs (CIS 1.1.1, 3.4): rare network protocols and
# filesystems, USB storage. "install ... /bin/false" also stops a load on demand.
DISABLED_MODULES = ("dccp", "sctp", "rds", "tipc", "cramfs", "freevxfs", "hfs", "hfsplus", "jffs2", "udf",
                    "usb-storage")

# Installed without Recommends (roles._lib.install_all_packages). Named here, as they are
# recommendations (or "important" packages a minimal image lacks) the stack needs: logrotate (nginx,
# PostgreSQL and pgBackRest rotate their logs with it), libpam-systemd (logins as logind sessions,
# as on any Debian server), netbase (/etc/protocols and /etc/services: nft resolves the firewall's
# protocol and service names with them), python3-gi (unattended-upgrades' shutdown helper waits for
# logind's PrepareForShutdown signal with it; without it, it asks logind every 3 s and warns at boot).
PACKAGES = ("sudo", "openssh-server", "nftables", "chrony", "unattended-upgrades", "needrestart", "tzdata",
            "ca-certificates", "logrotate", "libpam-systemd", "netbase", "python3-gi")

# OpenSSH 9.8+ (Debian 13) penalises addresses that fail to authenticate (PerSourcePenalties):
# the admin networks are exempted, so a control machine's failed attempts never lock it out.
SSH_PENALTIES = {"bookworm": False, "trixie": True}

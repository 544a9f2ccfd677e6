"""The patch run's decisions, without hosts: what needs a reboot, what needs a restart, what apt would do."""

from __future__ import annotations

from roles import patch


def test_reboot_for_kernel_libc_openssl_systemd_only():
    assert patch.reboot_reasons(["tzdata", "nginx-common", "postgresql-17"]) == []
    for name in ("linux-image-6.12.48+deb13-amd64", "libc6", "libssl3t64", "openssl", "systemd", "libsystemd0"):
        assert patch.reboot_reasons(["tzdata", name]) == [f"{name} upgraded"]
    assert patch.reboot_reasons([], required=True) == ["/run/reboot-required"]
    assert patch.reboot_reasons([], "NEEDRESTART-VER: 3.6\nNEEDRESTART-KSTA: 1\n") == []
    assert patch.reboot_reasons([], "NEEDRESTART-KSTA: 3\n") == [
        "needrestart: the running kernel is not the newest installed"]


def test_restart_candidates_from_needrestart_batch_output():
    out = ("NEEDRESTART-VER: 3.6\nNEEDRESTART-KCUR: 6.1.0\nNEEDRESTART-KSTA: 0\n"
           "NEEDRESTART-SVC: nginx.service\nNEEDRESTART-SVC: cron.service\nNEEDRESTART-SVC: nginx.service\n")
    assert patch.restart_candidates(out) == ["cron.service", "nginx.service"]
    assert patch.restart_candidates("NEEDRESTART-KSTA: 0\n") == []


def test_pending_upgrades_parses_apt_simulation():
    lines = [
        "Reading package lists...",
        "The following packages will be upgraded:",
        "Inst libssl3t64 [3.5.1-1] (3.5.1-1+deb13u1 Debian-Security:13/stable-security [amd64])",
        "Inst linux-image-6.12.48+deb13-amd64 (6.12.48-1 Debian:13.2/stable [amd64])",
        "Conf libssl3t64 (3.5.1-1+deb13u1 Debian-Security:13/stable-security [amd64])",
    ]
    assert patch.PendingUpgrades().process(lines) == [
        {"package": "libssl3t64", "from": "3.5.1-1", "to": "3.5.1-1+deb13u1"},
        {"package": "linux-image-6.12.48+deb13-amd64", "from": "", "to": "6.12.48-1"},
    ]

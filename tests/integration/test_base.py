"""The base role on real lab servers (both Debian releases), checked from outside."""

from __future__ import annotations

import json
import re
import socket
import subprocess

import paramiko
import pytest

from tests.integration.conftest import (
    BIN,
    KEY,
    KNOWN_HOSTS,
    MACHINES,
    RELEASES,
    deploy,
    host_for,
    inventory_copy,
    lab,
    run,
    site,
    ssh_login,
    wait_for,
)

pytestmark = pytest.mark.lab


def test_lab_has_both_releases(converged):
    assert RELEASES == ["bookworm", "trixie"]
    for name, machine in MACHINES.items():
        release = host_for(name).system_info.codename
        assert release == machine["release"], name


def test_fresh_servers_took_root_only_then_were_onboarded(converged):
    assert all(state == {"root": True, "ops": False} for state in converged["fresh"].values()), converged["fresh"]
    out = converged["onboard"].output
    assert "onboard: " + ", ".join(MACHINES) in out


def test_second_site_run_changes_nothing(converged):
    first, second = converged["onboard"].output, converged["again"].totals()
    assert "Grand total" in first and second["error"] == "-"
    assert second["changed"] == "-", converged["again"].output[-4000:]
    assert int(second["no_change"]) > 100


# Facts one host's operations ask of another (a peer's live cluster, release, host keys): asked in
# that operation's context, they go by a command of their own.
PEER_FACTS = {"roles.postgres.facts.PgCluster", "roles.app.deploy.AppState", "roles.postgres.backup.SshHostKeys"}


def test_a_no_change_run_asks_each_host_one_command(converged, tmp_path):
    """Every fact a no-change site run asks of a host comes from the one command that brings what
    the last run asked (webstack.factprefetch), but what other hosts ask of it. Caught a regression:
    the base role's install, run with ``_retries``, sent its two facts alone on every host."""
    site()  # whatever an earlier test left, and this run's record of questions
    stats = tmp_path / "facts.json"
    again = site(env={"WEBSTACK_FACT_STATS": str(stats)})
    assert again.totals()["changed"] == "-", again.output[-3000:]
    facts = json.loads(stats.read_text())
    assert set(facts) == set(MACHINES)
    for name, asked in facts.items():
        assert asked["prefetched"] > 20 and asked["sent"] == 1 + len(asked["alone"]), (name, asked)
        assert set(asked["alone"]) <= PEER_FACTS, (name, asked["alone"])


def test_fast_users_fact_prints_what_pyinfras_prints(release_machine):
    """webstack.fastops's one-awk ``Users`` command against pyinfra's loop, byte for byte."""
    from webstack import fastops

    target = host_for(release_machine)
    slow = target.check_output(fastops.pyinfra_users_command())
    fast = target.check_output(fastops.USERS_COMMAND)
    assert slow == fast and "\nops:" in slow, slow


def test_shared_systemctl_show_gives_each_unit_question_its_own_lines(release_machine):
    """The prefetch answers every SystemdStatus/SystemdEnabled question from one ``systemctl show``
    (webstack.factprefetch): each question's lines equal those of pyinfra's own command."""
    from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus

    from webstack.factprefetch import systemd_command, systemd_lines

    target = host_for(release_machine)
    units = ["ssh.service", "nosuch.service", "apt-daily.timer", "sshd.service", "chrony.service"]
    shared = target.check_output(systemd_command(units)).splitlines()
    compared = 0
    for cls in (SystemdStatus, SystemdEnabled):
        fact = cls()
        for services in (["ssh.service"], ["nosuch.service"], ["apt-daily.timer", "sshd.service"], ["chrony.service"]):
            own = target.check_output(fact.command(services=services).get_raw_value()).splitlines()
            mine = systemd_lines(shared, units, services, fact.state_key)
            assert mine == own and fact.process(mine) == fact.process(own), (cls.__name__, services, shared)
            compared += 1
    assert compared == 8 and fact.process(own) == {"chrony.service": True}


def test_merged_directory_listing_gives_each_directory_its_own_lines(release_machine):
    """The prefetch lists a host's directories in one command (roles._lib.DirectoryFiles.merged):
    each directory's lines equal those of its own command, on a converged server."""
    from roles._lib import DirectoryFiles

    target = host_for(release_machine)
    paths = ["/etc", "/etc/ssh", "/etc/sudoers.d", "/etc/nosuchdir"]
    command, split = DirectoryFiles.merged([(None, {"path": p}) for p in paths])
    parts = split(target.check_output(command).splitlines())
    for path, part in zip(paths, parts, strict=True):
        own = target.check_output(DirectoryFiles().command(path=path).get_raw_value()).splitlines()
        assert part == own, path
    assert any(line.endswith("/etc/ssh/sshd_config") for line in parts[1]) and parts[3] == []


def test_shared_stat_gives_each_file_question_its_own_lines(release_machine):
    """The prefetch answers File/Link/Directory questions from one ``stat`` (webstack.factprefetch):
    each equals pyinfra's own command for a directory, a file, a symlink and a missing path."""
    from pyinfra.facts.files import Directory, File, Link

    from webstack.factprefetch import stat_command, stat_lines

    target = host_for(release_machine)
    paths = ["/etc", "/etc/ssh/sshd_config", "/etc/localtime", "/etc/nosuchfile", "/home/ops/.ssh"]
    shared = target.check_output(stat_command(paths)).splitlines()
    for path in paths:
        for cls in (File, Link, Directory):
            own = target.check_output(cls().command(path=path).get_raw_value()).splitlines()
            mine = stat_lines(shared, path)
            assert mine == own, (cls.__name__, path)
            assert (cls().process(mine) if mine else None) == (cls().process(own) if own else None)
    assert Link().process(stat_lines(shared, "/etc/localtime"))["link_target"].startswith("/usr/share/zoneinfo")


def test_secret_never_printed(converged):
    hashes = [line.split(":")[1] for line in
              host_for("spare1").check_output("getent shadow ops").splitlines()]
    assert hashes and hashes[0].startswith("$6$")
    for key in ("onboard", "again"):
        assert hashes[0] not in converged[key].output


def test_root_login_refused(machine):
    with pytest.raises(paramiko.AuthenticationException):
        ssh_login(MACHINES[machine]["address"], "root", key_filename=str(KEY))


def test_admin_logs_in_with_key_and_has_sudo(machine):
    host = host_for(machine)
    assert host.check_output("id -un") == "root"  # via sudo
    assert host.user("ops").exists
    assert "webstack-admin" in host.user("ops").groups


def test_passwords_refused_even_with_the_right_one(release_machine):
    """sshd offers publickey only: a password is never even asked for."""
    transport = paramiko.Transport((MACHINES[release_machine]["address"], 22))
    try:
        transport.start_client(timeout=10)
        with pytest.raises(paramiko.BadAuthenticationType) as info:
            transport.auth_password("ops", "whatever-the-password")
        assert info.value.allowed_types == ["publickey"]
    finally:
        transport.close()


@pytest.mark.parametrize("options", [
    ["KexAlgorithms=diffie-hellman-group14-sha1"],
    ["Ciphers=aes128-cbc"],
    ["Ciphers=aes128-ctr", "MACs=hmac-sha1"],  # a non-AEAD cipher, so the MAC is negotiated
    ["HostKeyAlgorithms=ssh-rsa"],
], ids=["kex", "cipher", "mac", "hostkey"])
def test_weak_ssh_algorithms_refused(release_machine, options):
    address = MACHINES[release_machine]["address"]
    base = ["ssh", "-i", str(KEY), "-o", f"UserKnownHostsFile={KNOWN_HOSTS}", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5", f"ops@{address}", "true"]
    assert subprocess.run(base, capture_output=True).returncode == 0
    extra = [arg for option in options for arg in ("-o", option)]
    weak = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True)
    assert weak.returncode != 0
    assert "no matching" in weak.stderr or "Unable to negotiate" in weak.stderr, weak.stderr


def test_sshd_config_validates_on_server(machine):
    host = host_for(machine)
    assert host.run("sshd -t").rc == 0
    assert host.file("/etc/ssh/sshd_config").contains("Managed by webstack")


def test_hostname_and_peers_resolve(machine):
    host = host_for(machine)
    assert host.check_output("hostname") == machine
    for peer, m in MACHINES.items():
        assert host.check_output(f"getent hosts {peer}").split()[0] == m["address"]


def _connect_from(src: str, address: str, port: int) -> str:
    """From lab machine ``src``, try a TCP connection; 'open', 'refused' or 'timeout'."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(2)\n"
        f"try: s.connect(('{address}',{port})); print('open')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except OSError: print('timeout')\n"
    )
    return host_for(src).check_output(f"python3 -c \"{code}\"")


@pytest.fixture(scope="module")
def listener(converged):
    """A TCP listener on spare1:9100 (the port the lab inventory opens to the worker group)."""
    spare = host_for("spare1")
    spare.run("systemd-run --unit=webstack-test-listener --collect python3 -m http.server 9100")
    # systemd-run returns once the process is started, before Python has bound the port.
    wait_for(lambda: spare.socket("tcp://0.0.0.0:9100").is_listening, 15, "the test listener binds 9100")
    yield spare
    spare.run("systemctl stop webstack-test-listener")


def test_firewall_opening_only_for_allowed_group(listener):
    target = MACHINES["spare1"]["address"]
    assert listener.socket("tcp://0.0.0.0:9100").is_listening
    assert _connect_from("worker1", target, 9100) == "open"       # group worker: allowed
    assert _connect_from("app1", target, 9100) == "timeout"       # dropped, not refused
    assert _connect_from("db2", target, 9100) == "timeout"
    # The control machine (admin network) has SSH but not this port.
    with pytest.raises(OSError):
        socket.create_connection((target, 9100), timeout=2)


def test_ssh_only_from_admin_network(converged):
    target = MACHINES["db1"]["address"]
    socket.create_connection((target, 22), timeout=3).close()   # from the control machine
    assert _connect_from("app1", target, 22) == "timeout"        # another lab host: dropped


def test_firewall_is_persistent(release_machine):
    host = host_for(release_machine)
    assert host.service("nftables").is_enabled
    assert "policy drop" in host.check_output("nft list chain inet webstack input")


def test_packages_come_without_recommends_and_what_the_stack_needs_is_there(machine):
    """Every role's packages are installed without Recommends: no MIME database (a recommendation
    of GLib), no sysstat (of PostgreSQL), no bash completion; the recommendations the stack does
    need are named and work."""
    host = host_for(machine)
    for absent in ("shared-mime-info", "sysstat", "bash-completion"):
        assert not host.package(absent).is_installed, f"{machine}: {absent} (a recommendation) installed"
    # netbase: nft and the firewall resolve protocol and service names with /etc/protocols, /etc/services
    assert host.run("getent protocols tcp udp icmp && getent services ssh https").rc == 0
    # logrotate rotates nginx's, PostgreSQL's and pgBackRest's logs (--debug: reads all, rotates nothing)
    rotate = host.run("logrotate --debug /etc/logrotate.conf")
    assert rotate.rc == 0, rotate.stderr[-2000:]
    # libpam-systemd: an SSH login is a logind session, as on any Debian server
    assert re.search(r"/session-[^/]+\.scope$", host.check_output("cat /proc/self/cgroup"), re.M), machine
    # unattended-upgrades' shutdown helper waits for logind's signal (python3-gi's GLib) instead of polling
    assert host.service("unattended-upgrades").is_running
    glib = host.run("python3 -c 'from gi.repository import GLib'")
    assert glib.rc == 0, glib.stderr[-2000:]
    upgrade = host.run("unattended-upgrade --help")
    assert upgrade.rc == 0, upgrade.stderr[-2000:]


# Holds the dpkg lock as unattended-upgrades does (python-apt), until an apt-get install has waited
# for it 3 s (or 120 s went by), then says whether it saw one waiting.
LOCK_HOLDER = """
import apt_pkg, subprocess, time
apt_pkg.init(); apt_pkg.pkgsystem_lock()
open('/run/webstack-test-locked', 'w').close()
seen, until = False, time.time() + 120
while time.time() < until and not seen:
    seen = subprocess.run(['pgrep', '-f', '[a]pt-get .*install'], capture_output=True).returncode == 0
    time.sleep(0.2)
time.sleep(3)
open('/run/webstack-test-released', 'w').write(f"{time.time()} {'waited' if seen else 'none'}")
"""


def test_a_deploy_waits_for_the_daily_upgrade_holding_the_dpkg_lock(converged, tmp_path):
    """Fault: unattended-upgrades is installing (it holds the dpkg lock, as apt-daily-upgrade.service
    did on app2 when run 43's patch run failed at once) when a deploy needs apt-get. The deploy's
    apt-get waits for the lock and installs after it is released."""
    host = host_for("spare1")
    inv = inventory_copy(tmp_path)
    spare = inv.parent / "lab" / "group_data" / "spare.yml"
    spare.write_text(spare.read_text() + "base__extra_packages: [psmisc]\n")
    host.run("apt-get purge -y -q psmisc; rm -f /run/webstack-test-locked /run/webstack-test-released")
    assert not host.package("psmisc").is_installed
    host.check_output("systemd-run --quiet --collect --unit webstack-test-dpkg-lock python3 -c %s", LOCK_HOLDER)
    try:
        wait_for(lambda: host.file("/run/webstack-test-locked").exists, 20, "the lock holder never took the lock")
        result = deploy(inv, "site", "--limit", "spare1")
        assert host.package("psmisc").is_installed, result.output[-2000:]
        released, seen = host.file("/run/webstack-test-released").content_string.split()
        assert seen == "waited", "the deploy's apt-get never ran while the lock was held"
        installed = host.check_output("stat -c %Y /var/lib/dpkg/info/psmisc.list")  # written as dpkg unpacks it
        assert int(installed) >= int(float(released)), (installed, released)  # only once the lock was free
    finally:
        host.run("systemctl stop webstack-test-dpkg-lock; apt-get purge -y -q psmisc; "
                 "rm -f /run/webstack-test-locked /run/webstack-test-released")


def test_security_updates_and_journal(machine):
    host = host_for(machine)
    assert host.package("unattended-upgrades").is_installed
    dump = host.check_output("apt-config dump APT::Periodic::Unattended-Upgrade")
    assert dump == 'APT::Periodic::Unattended-Upgrade "1";'
    assert host.service("apt-daily-upgrade.timer").is_enabled
    machine_id = host.file("/etc/machine-id").content_string.strip()
    assert host.file(f"/var/log/journal/{machine_id}").is_directory
    assert host.file("/etc/chrony/chrony.conf").contains("pool 10.77.0.1 iburst")
    assert host.sysctl("net.ipv4.tcp_syncookies") == 1
    assert host.sysctl("net.ipv4.conf.all.accept_redirects") == 0


def test_owed_reload_is_not_forgotten(converged):
    """A run that swapped sshd_config but died before reloading leaves a marker; the next run reloads."""
    host = host_for("spare1")
    host.run("mkdir -p /var/lib/webstack/pending && touch /var/lib/webstack/pending/reload-ssh")
    before = host.check_output("systemctl show ssh -p ExecMainStartTimestampMonotonic")
    result = site("--limit", "spare1")
    assert "reload-ssh (owed)" in result.output
    assert not host.file("/var/lib/webstack/pending/reload-ssh").exists
    assert result.totals()["changed"] == "2"  # the owed reload, and the audit trail's line recording it
    assert re.search(r"Audit trail\s+1\s+1\s", result.output)
    assert host.check_output("systemctl show ssh -p ExecMainStartTimestampMonotonic") == before  # reload, not restart


def test_invalid_config_is_never_swapped_in(converged):
    """validated_file refuses a file its validator rejects; the live sshd config stays as it was."""
    host = host_for("app2")
    before = host.check_output("sha1sum /etc/ssh/sshd_config")
    result = run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "tests/integration/deploys/broken_sshd.py",
                 "--limit", "app2", check=False)
    assert result.returncode != 0
    assert host.check_output("sha1sum /etc/ssh/sshd_config") == before
    assert not host.file("/etc/ssh/sshd_config.webstack-new").exists
    assert not host.file("/var/lib/webstack/pending/reload-ssh").exists
    ssh_login(MACHINES["app2"]["address"], "ops", key_filename=str(KEY))


def test_unreachable_host_reported_alone(converged):
    """A powered-off server fails its own run; the others converge."""
    lab("poweroff", "spare1")
    try:
        result = site("--limit", "spare1", "--limit", "worker1", check=False)
        assert result.returncode != 0
        assert "[spare1]" in result.output and "Could not connect" in result.output
        assert re.search(r"\[worker1\]\s+Connected", result.output)
        assert re.search(r"\[spare1\]\s+Could not connect", result.output)
    finally:
        lab("start", "spare1")
    ssh_login(MACHINES["spare1"]["address"], "ops", key_filename=str(KEY))

"""Stage 1 (one server) to the full stack under live traffic (tests/integration/growth.py walks it)."""

from __future__ import annotations

import pytest

from lab.probe import host
from tests.integration.growth import GROW_VIP, grow, stored_signups, write_pause

pytestmark = pytest.mark.lab


def slots(name: str) -> dict[str, str]:
    out = host(name).check_output("runuser -u postgres -- psql -XAt -F ' ' -c "
                                  "\"select slot_name, active from pg_replication_slots where slot_type = 'physical'\"")
    return dict(line.split() for line in out.splitlines())


def test_stage1_grows_to_the_full_stack_without_a_failed_request_or_a_lost_row(lab_ready, tmp_path):
    g = grow(tmp_path)
    assert g.pages and g.signups and g.vip_pages and g.vip_signups
    for name, seconds in g.seconds.items():
        print(f"{name}: {seconds:.0f} s")
    print(f"{len(g.pages.results)} page requests to grow1, {len(g.pages.failures())} failed; "
          f"{len(g.signups.results)} sign-ups, {len(g.signups.failures())} failed; "
          f"longest write wait {write_pause(g.signups):.2f} s")
    for t, _ok, detail in g.pages.failures():
        print(f"page failed during {g.during(t)}: {detail}")
    for t, seconds, _ok, email in g.signups.failures():
        print(f"sign-up failed during {g.during(t)} after {seconds:.2f} s: {email}")
    # The site kept answering on the stage-1 address, and no write was refused.
    assert g.pages.failures() == [] and len(g.pages.results) > 500, g.pages.failures()[:5]
    assert g.signups.failures() == [] and len(g.signups.results) > 100, g.signups.failures()[:5]
    # Every acknowledged sign-up, made through either address, is on the new primary.
    stored = stored_signups("grow3", g.signups.tag) | stored_signups("grow3", g.vip_signups.tag)
    assert g.signups.acknowledged() | g.vip_signups.acknowledged() <= stored
    # The floating IP serves through both application servers.
    assert g.vip_pages.failures() == [] and g.vip_signups.failures() == []
    assert g.vip_pages.served_by() == {"grow1", "grow2"}
    assert "inet " + GROW_VIP in host("grow1").check_output("ip -4 -o addr show")
    # The data moved: grow3 is the primary, grow4 streams from it through its slot, and grow1 is no
    # longer a member: its slot is dropped and its replication access gone.
    assert host("grow3").check_output("runuser -u postgres -- psql -XAtc 'select pg_is_in_recovery()'") == "f"
    assert slots("grow3") == {"grow4": "t"}
    hba = host("grow3").check_output("cat /etc/postgresql/17/main/pg_hba.conf")
    replication = [line for line in hba.splitlines() if " replication " in line]
    assert replication and not any("10.77.0.91" in line for line in replication)
    # The backup host's account for cluster grow takes the key only from the members left, and its
    # firewall no longer opens SSH to grow1 (the opening follows the same member list).
    keys = host("grow5").check_output("cat /etc/ssh/webstack-sftp/pgbr-grow")
    assert "10.77.0.93" in keys and "10.77.0.94" in keys and "10.77.0.91" not in keys
    ruleset = host("grow5").check_output("nft list ruleset")
    assert "10.77.0.93" in ruleset and "10.77.0.91" not in ruleset
    # Off-site backups of the new primary.
    info = host("grow3").check_output("runuser -u postgres -- pgbackrest --stanza=grow --output=json info")
    assert '"type":"full"' in info.replace(" ", "")
    # Workers run on both web servers and take the sign-ups' jobs (the growth inventory names no mail
    # provider, so the welcome mails themselves are retried, not delivered: attempts count).
    taken = host("grow3").check_output("runuser -u postgres -- psql -XAt -d app -c "
                                       "\"select count(*) from jobs where kind = 'welcome_email' and attempts > 0\"")
    assert int(taken) > 0, "no worker took a job"
    for name in ("grow1", "grow2"):
        units = host(name).check_output("systemctl list-units --plain --no-legend --state=active '*-worker@*'")
        assert "-worker@" in units, f"no worker runs on {name}"
    # A deploy applied again changes nothing.
    assert g.runs["again"].totals()["changed"] == "-", g.runs["again"].output[-3000:]

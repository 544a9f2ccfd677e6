"""The worker tier on real lab servers: welcome emails through the stand-in provider, faults of the
provider and of a worker host, dead letters, scheduled jobs run once per period.

worker1 (Debian 12) and worker2 (Debian 13) run two workers each (group_data/worker.yml, lab pace:
retries after 1, 2, 4, 8, 8... s (each delay jittered down to half), dead after 10 tries, a silent worker's jobs freed after 20 s).
Sign-ups go through the VIP like a customer's; mail is read in mail1's catch-all Maildir.
"""

from __future__ import annotations

import re
import shlex
import time
import uuid
from collections import Counter

import pytest

from lab.probe import SignupForm, host
from tests.integration.conftest import BIN, lab, run, wait_for

pytestmark = pytest.mark.lab

WORKERS = ["worker1", "worker2"]
MAILDIR = "/var/mail/webstack/all/new"


@pytest.fixture(scope="module")
def provider(converged):
    mail1 = host("mail1")
    mail1.check_output("mail-fault off")
    yield mail1
    mail1.run("mail-fault off")


def signup(tag: str) -> str:
    """Sign up a new address through the VIP; the address."""
    email = f"{tag}-{uuid.uuid4().hex[:10]}@customer.test"
    status, _, body = SignupForm(timeout=10).post(email)
    assert status in (200, 201, 303), body[:300]
    return email


def message_ids(mail1, email: str) -> list[str]:
    """Message-IDs of the mails delivered to ``email`` (one per copy)."""
    out = mail1.run(f"grep -l -r -F -e {shlex.quote('To: ' + email)} {MAILDIR} 2>/dev/null | "
                    "xargs -r grep -h -i '^Message-ID:'")
    return [line.split(":", 1)[1].strip() for line in out.stdout.splitlines()]


def jobs(worker: str, args: str) -> str:
    """``jobs.py ARGS`` on a worker host, as the application user with its environment."""
    cmd = ("systemd-run --quiet --wait --pipe --collect --uid=webapp --gid=webapp "
           "-p EnvironmentFile=/etc/webstack/webapp.env -p WorkingDirectory=/srv/webapp/current "
           f"/usr/bin/python3 jobs.py {args}")
    return host(worker).check_output(cmd)


def test_workers_run_on_both_releases_and_timers_only_on_worker_hosts(converged):
    for name in WORKERS:
        units = host(name).check_output("systemctl list-units --plain --no-legend --state=active 'webapp-worker@*'")
        assert len(units.splitlines()) == 2, units
        timers = host(name).check_output("systemctl list-timers --all --plain --no-legend 'webstack-job-*'")
        assert "webstack-job-cleanup.timer" in timers and "webstack-job-tick.timer" in timers
    for name in ("app1", "app2", "db1", "lb1"):
        assert host(name).check_output("ls /etc/systemd/system | grep -c '^webstack-job-' || true") == "0"
    release = {host(n).check_output("readlink /srv/webapp/current") for n in ["app1", "app2", *WORKERS]}
    assert len(release) == 1, release


def test_signup_sends_one_welcome_email(provider):
    started = time.monotonic()
    email = signup("welcome")
    wait_for(lambda: message_ids(provider, email), 10, f"the welcome mail to {email} is in the mailbox")
    took = time.monotonic() - started
    ids = message_ids(provider, email)
    assert len(ids) == 1 and re.fullmatch(r"<job-\d+\.welcome@webstack\.test>", ids[0]), ids
    assert took < 5, f"sign-up to inbox took {took:.1f} s"


def test_provider_down_for_a_while_then_back_every_mail_once(provider):
    provider.check_output("mail-fault down")
    try:
        emails = [signup("outage") for _ in range(10)]
        # The workers retry meanwhile: 5 to 7 tries of each job fail, and the 10th (dead-letter) try
        # is at least 27.5 s after the first.
        time.sleep(15)
        assert not any(message_ids(provider, e) for e in emails), "mail was delivered while the provider was down"
    finally:
        provider.check_output("mail-fault off")
    wait_for(lambda: all(message_ids(provider, e) for e in emails), 30, "every mail queued during the outage arrives")
    time.sleep(3)
    copies = Counter(len(message_ids(provider, e)) for e in emails)
    assert copies == Counter({1: 10}), copies


def test_4xx_until_dead_letter_reported_requeued_delivered(provider):
    provider.check_output("mail-fault 4xx")
    try:
        email = signup("deferred")
        wait_for(lambda: '"dead": 0' not in jobs("worker1", "stats"), 90, "the job is dead-lettered after 10 tries")
        dead = [line for line in jobs("worker1", "dead").splitlines() if email in line]
        assert len(dead) == 1 and "451" in dead[0], dead
        check = run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/check.py", "--limit", "worker",
                    check=False)
        assert check.returncode != 0 and "dead-lettered" in check.output, check.output[-2000:]
    finally:
        provider.check_output("mail-fault off")
    assert message_ids(provider, email) == []
    requeue = run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/jobs.py", "--limit", "worker",
                  "--data", "requeue=all")
    assert "dead-lettered job(s)" in requeue.output
    wait_for(lambda: message_ids(provider, email), 15, "the re-queued mail arrives")
    assert len(message_ids(provider, email)) == 1
    check = run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/check.py", "--limit", "worker")
    assert "Job queue within thresholds" in check.output


def test_worker_host_powered_off_mid_stream_loses_no_mail(provider):
    emails = []
    try:
        for i in range(30):
            emails.append(signup("poweroff"))
            if i == 10:
                lab("poweroff", "worker1")
            time.sleep(0.1)
        # worker2 takes everything; what worker1 held is freed after the 20 s lock timeout.
        wait_for(lambda: all(message_ids(provider, e) for e in emails), 60, "every mail arrives from worker2")
        time.sleep(3)
        copies = Counter(len(message_ids(provider, e)) for e in emails)
        duplicates = sum(n - 1 for n in copies.elements() if n > 1)
        print(f"power-off mid-stream: {len(emails)} mails, {duplicates} duplicate(s) (same Message-ID)")
        assert set(copies) <= {1, 2} and copies[1] >= len(emails) - 2, copies
    finally:
        lab("start", "worker1")
    wait_for(lambda: len(host("worker1").check_output(
        "systemctl list-units --plain --no-legend --state=active 'webapp-worker@*'").splitlines()) == 2,
        60, "worker1's workers start again at boot")


def test_scheduled_job_runs_once_per_period_across_both_worker_hosts(converged):
    since = time.time()
    time.sleep(45)
    until = time.time()
    window = f"--since=@{int(since)} --until=@{int(until)}"
    ticks = {n: host(n).check_output(f"journalctl -q -t webstack-tick {window} -o cat | wc -l") for n in WORKERS}
    taken = {n: host(n).check_output(f"journalctl -q -u webstack-job-tick {window} -o cat | "
                                     "grep -c 'already taken by' || true") for n in WORKERS}
    total = sum(int(v) for v in ticks.values())
    # Four or five periods of 10 s in 45 s (random delay up to 3 s), each run by one host, skipped by the other.
    assert 4 <= total <= 5, ticks
    assert sum(int(v) for v in taken.values()) >= total - 1, (ticks, taken)

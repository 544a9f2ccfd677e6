"""The worker role's inventory checks (before any connection) and its rendered units."""

from __future__ import annotations

import pytest

from roles.worker.deploy import exec_word, job_units, unit_content, worker_env
from roles.worker.settings import WorkerSettings
from tests.unit.conftest import SECRETS
from webstack.errors import ConfigError
from webstack.inventory import load

HOSTS = {
    "app1": {"address": "10.1.0.21", "roles": ["app"]},
    "w1": {"address": "10.1.0.41", "roles": ["worker"], "groups": ["jobs"]},
    "w2": {"address": "10.1.0.42", "roles": ["worker"], "groups": ["jobs"]},
    "db1": {"address": "10.1.0.31", "roles": ["postgres"]},
}
GROUPS = {
    "postgres": {"postgres__primary": "db1", "postgres__users": ["app"],
                 "postgres__databases": [{"name": "app", "owner": "app"}]},
    "jobs": {"worker__smtp_host": "mail.example.net", "worker__smtp_user": "app",
             "worker__scheduled_jobs": [{"name": "cleanup", "schedule": "daily", "command": "python3 jobs.py cleanup"}]},
}


def error_of(inv) -> str:
    with pytest.raises(ConfigError) as info:
        load(inv, secrets=SECRETS)
    return str(info.value)


def with_jobs(*jobs: dict) -> dict:
    return {**GROUPS, "jobs": {**GROUPS["jobs"], "worker__scheduled_jobs": list(jobs)}}


def test_workers_load_and_render(make_inventory):
    cfgs = {c.name: c for c in load(make_inventory(hosts=HOSTS, groups=GROUPS), secrets=SECRETS)}
    w1 = cfgs["w1"]
    assert "User=webapp" in unit_content(w1) and "TimeoutStopSec=30" in unit_content(w1)
    env = worker_env(w1)
    assert "SMTP_HOST=mail.example.net" in env and "SMTP_PASSWORD_FILE=/etc/webstack/webapp-smtp.password" in env
    assert SECRETS["smtp_password_app"] not in env  # the password has a file of its own
    service, timer = job_units(w1, w1.settings(WorkerSettings).scheduled_jobs[0])
    assert "OnCalendar=daily" in timer and "Persistent=true" in timer and "AccuracySec=1s" in timer
    assert '--job cleanup --calendar "daily" --lookback 131072 -- /bin/sh -c "python3 jobs.py cleanup"' in service
    assert "ConditionPathExists=/srv/webapp/current/" in service


def test_duplicate_job_name_is_refused(make_inventory):
    job = {"name": "cleanup", "schedule": "daily", "command": "true"}
    inv = make_inventory(hosts=HOSTS, groups=with_jobs(job, job))
    assert error_of(inv) == (f"{inv}/group_data/jobs.yml: worker__scheduled_jobs[1].name: "
                             "duplicate job name 'cleanup'")


def test_schedule_systemd_refuses_is_refused(make_inventory):
    inv = make_inventory(hosts=HOSTS, groups=with_jobs({"name": "x", "schedule": "every tuesday-ish",
                                                        "command": "true"}))
    message = error_of(inv)
    assert message.startswith(f"{inv}/group_data/jobs.yml: worker__scheduled_jobs[0].schedule: "
                              "systemd-analyze calendar refuses 'every tuesday-ish'"), message


def test_delay_as_long_as_the_period_is_refused(make_inventory):
    inv = make_inventory(hosts=HOSTS, groups=with_jobs({"name": "x", "schedule": "*:0/5", "command": "true",
                                                        "randomized_delay": 300}))
    assert "randomized_delay: 300 s is not shorter than the shortest period (300 s)" in error_of(inv)


def test_scheduled_job_in_a_group_without_worker_is_refused(make_inventory):
    groups = {**GROUPS, "app": {"worker__scheduled_jobs": [{"name": "x", "schedule": "daily", "command": "true"}]}}
    inv = make_inventory(hosts=HOSTS, groups=groups)
    assert error_of(inv) == (f"{inv}/group_data/app.yml: worker__scheduled_jobs: no host this file applies to "
                             "has role 'worker': the setting would never be used")


def test_worker_without_application_server_is_refused(make_inventory):
    hosts = {k: v for k, v in HOSTS.items() if k != "app1"}
    inv = make_inventory(hosts=hosts, groups=GROUPS)
    assert error_of(inv) == (f"{inv}/hosts.yml: hosts.w1.roles: a worker runs the application's release: "
                             "the inventory needs an app server")


def test_missing_smtp_secret_is_refused(make_inventory):
    groups = {**GROUPS, "jobs": {**GROUPS["jobs"], "worker__smtp_user": "mailer"}}
    inv = make_inventory(hosts=HOSTS, groups=groups)
    assert "smtp_password_mailer: missing secret (needed by host w1)" in error_of(inv)


def test_job_command_reaches_the_shell_intact():
    # systemd expands %specifiers and $VARIABLES in ExecStart and reads C escapes inside quotes:
    # all escaped, the command is one double-quoted word, given to sh -c as written.
    assert exec_word('logger -t tick "tick $(hostname)" 50% a\\b') == '"logger -t tick \\"tick $$(hostname)\\" 50%% a\\\\b"'
    assert exec_word("*:*:0/10") == '"*:*:0/10"'

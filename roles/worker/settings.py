"""Settings of the worker role: background job processes and scheduled jobs (keys ``worker__<field>``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache

from webstack.settings import required, setting

JOB_NAME = re.compile(r"^[a-z][a-z0-9-]{0,40}$")


@cache
def calendar_gaps(schedule: str) -> tuple[str, float, float] | None:
    """``systemd-analyze calendar``'s verdict on an ``OnCalendar`` expression, run on the control machine:
    (error, 0, 0) when it is refused, else ("", shortest, longest gap in seconds between its next 20
    elapses). None when this machine has no systemd-analyze."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return None
    out = subprocess.run([tool, "calendar", "--iterations=20", schedule], capture_output=True, text=True,
                         env={"TZ": "UTC", "PATH": "/usr/bin:/bin", "LC_ALL": "C"}, check=False)
    if out.returncode != 0:
        return (out.stderr.strip().splitlines() or ["refused"])[-1], 0.0, 0.0
    import datetime as dt
    stamps = [dt.datetime.strptime(m, "%Y-%m-%d %H:%M:%S")
              for m in re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\S+ \S+) UTC", out.stdout)]
    gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:], strict=False)]
    if not gaps:
        return "", float("inf"), float("inf")
    return "", min(gaps), max(gaps)


@dataclass(frozen=True)
class ScheduledJob:
    """A job run on a schedule by one worker host per period (systemd timer on every worker host;
    the first to claim the period in the database runs it)."""

    name: str = required("job name (unit webstack-job-<name>), unique")
    schedule: str = required("systemd OnCalendar expression, e.g. 'daily' or '*:0/15'")
    command: str = required("shell command, run as the application user in the current release's directory")
    timeout: int = setting(3600, "seconds before the run is killed (and counted failed)")
    randomized_delay: int = setting(0, "seconds of random delay after each elapse (RandomizedDelaySec)")
    catch_up: bool = setting(True, "run once at boot if the host was off when a run was due (Persistent)")


@dataclass(frozen=True)
class WorkerSettings:
    """Background job workers running the application's release (the app servers' settings name it)."""

    processes: int = setting(2, "worker processes per host (units <app>-worker@1..N)")
    stop_timeout: int = setting(30, "seconds a stopping worker gets to finish its current job (then SIGKILL)")
    max_attempts: int = setting(12, "tries of a job before it is dead-lettered (12 with the default delays: "
                                    "about 3.5 h, a provider outage survived)")
    retry_base: int = setting(10, "first retry delay in seconds (doubles per attempt, with jitter)")
    retry_max: int = setting(3600, "longest retry delay in seconds")
    lock_timeout: int = setting(60, "seconds after which a silent worker's job is released to others")
    smtp_host: str = setting("", "mail provider's submission host (its certificate must name it); empty = no mail")
    smtp_port: int = setting(587, "submission port (STARTTLS required)")
    smtp_user: str = setting("", "SMTP user name; the password is the secret smtp_password_<user>")
    smtp_ca: str = setting("", "PEM file on the control machine (relative to the inventory directory) that "
                                "verifies the provider's certificate; empty = the server's system CA store")
    mail_from: str = setting("webstack@example.com", "sender address of the application's email")
    max_queue_depth: int = setting(1000, "deploys/check.py fails above this many jobs ready to run")
    max_queue_age: int = setting(300, "deploys/check.py fails when the oldest ready job waited longer (seconds)")
    max_dead: int = setting(0, "deploys/check.py fails above this many dead-lettered jobs")
    scheduled_jobs: tuple[ScheduledJob, ...] = setting((), "jobs run once per period across all worker hosts")

    def check(self) -> tuple[str, str] | None:
        """Field-level consistency; returns (key, message) on a problem."""
        if not 1 <= self.processes <= 64:
            return "processes", f"must be 1-64, got {self.processes}"
        if self.lock_timeout < 10:
            return "lock_timeout", "at least 10 s (an SMTP dialogue gets half of it)"
        if self.stop_timeout < 5:
            return "stop_timeout", "give a job at least 5 s to finish"
        if self.smtp_host and not self.smtp_user:
            return "smtp_user", "the provider needs a user (and the secret smtp_password_<user>)"
        seen: set[str] = set()
        for i, job in enumerate(self.scheduled_jobs):
            if not JOB_NAME.match(job.name):
                return f"scheduled_jobs[{i}].name", f"not a usable unit name: {job.name!r}"
            if job.name in seen:
                return f"scheduled_jobs[{i}].name", f"duplicate job name {job.name!r}"
            seen.add(job.name)
            if not job.command.strip():
                return f"scheduled_jobs[{i}].command", "empty command"
            if job.timeout < 1:
                return f"scheduled_jobs[{i}].timeout", "must be at least 1 s"
            verdict = calendar_gaps(job.schedule)
            if verdict is not None:
                error, gap, _longest = verdict
                if error:
                    return f"scheduled_jobs[{i}].schedule", f"systemd-analyze calendar refuses {job.schedule!r}: {error}"
                # A run belongs to the period of the latest elapse before it: a random delay as long as
                # the shortest period would put one elapse's runs on two hosts into two periods.
                if job.randomized_delay >= gap:
                    return (f"scheduled_jobs[{i}].randomized_delay",
                            f"{job.randomized_delay} s is not shorter than the shortest period ({gap:.0f} s)")
        return None

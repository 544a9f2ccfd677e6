"""The worker tier on the lab (make demo first); a script, not a test.

    .venv/bin/python bench/worker.py --jobs 50000 --signups 50
    .venv/bin/python bench/worker.py --skip-throughput --drain 10000 --outage 300 --max-attempts 60

- no-op jobs per second through the queue, drained by the running workers of both worker
  hosts (2 per host): N jobs enqueued in one transaction on worker1, the clock runs from
  its commit until jobs.py stats shows nothing ready or running;
- with --drain N: N welcome mails enqueued while mail1 refuses connections for --outage s,
  then the time from its return until all are delivered, and mails lost or duplicated;
- sign-up to inbox: POST /signup through the VIP, one at a time; the latency of each is the
  delivered file's time in mail1's Maildir minus the moment the request was sent (the lab
  machines share the control machine's kernel clock). p50 / p99 / max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.probe import SignupForm, host  # noqa: E402

MAILDIR = "/var/mail/webstack/all/new"
JOBS = ("systemd-run --quiet --wait --pipe --collect --uid=webapp --gid=webapp "
        "-p EnvironmentFile=/etc/webstack/webapp.env -p WorkingDirectory=/srv/webapp/current /usr/bin/python3 jobs.py ")


def noop(n: int) -> dict[str, float]:
    w1 = host("worker1")
    out = w1.check_output(f"{JOBS} enqueue-noop {n} >/dev/null && date +%s.%N")
    committed = float(out.split()[-1])
    while True:
        stats = json.loads(w1.check_output(f"{JOBS} stats"))
        if stats["ready"] == 0 and stats["running"] == 0:
            done = float(w1.check_output("date +%s.%N"))
            break
        time.sleep(0.2)
    seconds = done - committed
    return {"jobs": n, "seconds": round(seconds, 2), "jobs_per_s": round(n / seconds)}


def signups(count: int) -> dict[str, float]:
    sent: dict[str, float] = {}
    form = SignupForm(timeout=10)
    form.load()  # the form once (cookies, CSRF token): the clock runs from each POST
    for _ in range(count):
        email = f"bench-{uuid.uuid4().hex[:12]}@customer.test"
        sent[email] = time.time()
        status, _, _ = form.post(email)
        assert status in (200, 201), status
        time.sleep(0.2)
    mail1 = host("mail1")
    arrived: dict[str, float] = {}
    deadline = time.time() + 60
    while len(arrived) < count and time.time() < deadline:
        listing = mail1.check_output(
            f"cd {MAILDIR} && grep -l -r -e '^To: bench-' . | xargs -r stat -c '%.9Y %n' 2>/dev/null; "
            f"grep -r -H -m1 -e '^To: bench-' . || true")
        times = {}
        for line in listing.splitlines():
            if line[:1].isdigit() and " " in line:
                stamp, name = line.split(" ", 1)
                times[name] = float(stamp)
            elif ":To: " in line:
                name, _, to = line.partition(":To: ")
                if to.strip() in sent and name in times:
                    arrived[to.strip()] = times[name]
        time.sleep(1)
    latencies = sorted(arrived[e] - sent[e] for e in arrived)
    if not latencies:
        sys.exit("no welcome mail arrived")
    return {"count": count, "arrived": len(latencies), "p50_s": round(statistics.median(latencies), 3),
            "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
            "max_s": round(latencies[-1], 3)}


def drain(n: int, outage: int) -> dict[str, float]:
    """N welcome mails enqueued while the provider is down for ``outage`` s; seconds from its
    return until all are in the mailbox, mails lost, duplicates."""
    tag = uuid.uuid4().hex[:8]
    mail1, w1 = host("mail1"), host("worker1")
    mail1.check_output("mail-fault down")
    started = time.time()
    script = ("import os, jobs; conn = jobs.connect(os.environ['DATABASE_URL']); cur = conn.cursor(); "
              f"[jobs.enqueue(cur, 'welcome_email', {{'email': 'drain-{tag}-' + str(i) + '@customer.test'}}) for i in range({n})]; "
              "conn.commit()")
    w1.check_output(f"{JOBS.replace('/usr/bin/python3 jobs.py ', '/usr/bin/python3 -c ')}\"{script}\"")
    time.sleep(max(0.0, outage - (time.time() - started)))
    mail1.check_output("mail-fault off")
    back = time.time()
    count = f"grep -l -r -e '^To: drain-{tag}-' {MAILDIR} | wc -l"
    delivered, last_change, last = 0, time.time(), -1
    while time.time() - last_change < 60:
        delivered = int(mail1.check_output(count))
        if delivered != last:
            last, last_change = delivered, time.time()
        if delivered >= n:
            break
        time.sleep(2)
    took = time.time() - back
    distinct = int(mail1.check_output(f"grep -h -r -e '^To: drain-{tag}-' {MAILDIR} | sort -u | wc -l"))
    return {"mails": n, "outage_s": outage, "drained_after_s": round(took, 1), "lost": n - distinct,
            "duplicates": delivered - distinct}


def with_worker_settings(extra: str) -> None:
    """Converge the worker hosts with ``extra`` appended to the lab's worker group data ("" = the lab's own)."""
    import shutil
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="webstack-worker-bench-") as tmp:
        inv = Path(tmp) / "inventories"
        shutil.copytree(ROOT / "inventories" / "lab", inv / "lab")
        shutil.copy(ROOT / "inventories" / "lab.py", inv / "lab.py")
        if extra:
            with open(inv / "lab" / "group_data" / "worker.yml", "a") as f:
                f.write("\n" + extra + "\n")
        subprocess.run([str(Path(sys.executable).parent / "pyinfra"), "-y", str(inv / "lab.py"), "deploys/site.py",
                        "--limit", "worker"], cwd=ROOT, check=True, capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50000)
    parser.add_argument("--signups", type=int, default=50)
    parser.add_argument("--drain", type=int, default=0, help="mails queued during a provider outage (0: skip)")
    parser.add_argument("--outage", type=int, default=20, help="seconds the provider is down")
    parser.add_argument("--max-attempts", type=int, default=0,
                        help="worker__max_attempts for the drain (the lab's 10 tries at most 8 s apart last "
                             "28-55 s: a longer outage needs more), set for the drain and put back after")
    parser.add_argument("--skip-throughput", action="store_true", help="only the drain")
    args = parser.parse_args()
    if not args.skip_throughput:
        print("no-op throughput, 4 workers on worker1 + worker2:", noop(args.jobs))
        print("sign-up to inbox:", signups(args.signups))
    if args.drain:
        if args.max_attempts:
            with_worker_settings(f"worker__max_attempts: {args.max_attempts}")
        try:
            result = drain(args.drain, args.outage)
        finally:
            if args.max_attempts:
                with_worker_settings("")
        print("drain after an outage:", result)
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        (out / f"drain-{stamp}.json").write_text(json.dumps({**result, "max_attempts": args.max_attempts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""drift and status reports without hosts: masking, parsing, formatting."""

from __future__ import annotations

from roles import status
from roles._lib import mask
from webstack import reports


def test_mask_hides_secret_values_keys_and_secret_like_settings():
    text = ("DATABASE_URL=host=db1 user=app password=s3cr3t-value dbname=app\n"
            "SECRET_KEY=abcdef\nJOB_POLL_INTERVAL=5\n"
            "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----\n")
    out = mask(text, ["s3cr3t-value", "abc"])
    assert "s3cr3t-value" not in out and "password=*MASKED*" in out
    assert "SECRET_KEY=*MASKED*" in out and "abcdef" not in out
    assert "JOB_POLL_INTERVAL=5" in out
    assert "MIIEvQIBADANBg" not in out and "*MASKED PRIVATE KEY*" in out


def test_drift_report_text_and_verdict():
    report = {
        "app2": {"changes": ["Configure /etc/ssh/sshd_config", "reload-ssh (owed)"],
                 "files": [{"path": "/etc/ssh/sshd_config", "meta": "",
                            "diff": "--- a\n+++ b\n-MaxAuthTries 6\n+MaxAuthTries 3\n"}]},
        "db1": {"changes": [], "files": []},
    }
    text = reports.format_drift(report)
    assert "app2: 2 change(s)" in text and "    -MaxAuthTries 6" in text and "db1: no drift" in text
    assert reports.drifted(report)
    assert not reports.drifted({"db1": {"changes": [], "files": []}})
    assert reports.drifted({"db1": {"error": "not connected", "changes": [], "files": []}})


def test_status_fact_parses_words_and_json():
    lines = ["pending=3", "security=1", "reboot_required=no", 'last_patch={"health": "ok", "finished": "x"}',
             "vip=10.77.0.100", "queue=null", "garbage"]
    row = status.HostStatus().process(lines)
    assert row == {"pending": "3", "security": "1", "reboot_required": "no",
                   "last_patch": {"health": "ok", "finished": "x"}, "vip": "10.77.0.100", "queue": None}


def test_status_table_names_the_vip_holder_primary_and_stale_inventory():
    report = {
        "lb1": {"roles": ["lb"], "vip": "10.77.0.100", "pending": "0", "security": "0", "reboot_required": "no",
                "last_patch": None},
        "db2": {"roles": ["postgres"], "pg": "primary", "cluster": "main", "inventory_primary": "db1",
                "streaming": "1", "timeline": "3", "pending": "2", "security": "2", "reboot_required": "yes",
                "last_patch": {"finished": "2026-12-02T09:00:00+00:00", "health": "ok"},
                "backups": {"full": None, "diff": None, "incr": None}, "last_archived": "", "wal_ready": "0"},
        "db9": {"error": "not connected"},
    }
    text = reports.format_status(report)
    assert "holds VIP 10.77.0.100" in text
    assert "main primary, 1 streaming, tl 3; (inventory says db1)" in text
    assert "2026-12-02T09:00:00+00:00 (ok)" in text and "not connected" in text
    assert "backups of main (from db2): full -" in text


def test_the_runs_audit_line_asks_git_once_when_every_host_asks_at_once(monkeypatch):
    """Every host's deploy asks for the run's audit line at once (greenlets, as pyinfra runs them):
    git is asked once, not once per host that came while it ran."""
    import gevent

    from roles import audit

    calls: list[int] = []

    def slow_git() -> tuple[str, bool]:
        calls.append(1)
        gevent.sleep(0.05)  # as a subprocess: the other greenlets run meanwhile
        return "abc123", False

    monkeypatch.setattr(audit, "_git", slow_git)
    monkeypatch.setattr(audit, "_options", lambda: {})
    audit.reset()
    lines = [g.value for g in gevent.joinall([gevent.spawn(audit._base, "site") for _ in range(10)])]
    assert len(calls) == 1 and all(line == lines[0] and line["commit"] == "abc123" for line in lines)
    audit.reset()

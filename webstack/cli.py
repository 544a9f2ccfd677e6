"""``webstack``: the operator's helper commands (secrets, inventory check, docs).

    webstack check INVENTORY_DIR          validate an inventory (no connection)
    webstack secrets init INVENTORY_DIR   new key + empty secrets file
    webstack secrets edit INVENTORY_DIR   decrypt to a private temp file, $EDITOR, re-encrypt
    webstack secrets set INVENTORY_DIR KEY   value from stdin (never from argv)
    webstack secrets unset INVENTORY_DIR KEY
    webstack secrets list INVENTORY_DIR   names only, never values
    webstack secrets rotate INVENTORY_DIR new key; re-encrypt; old key kept as .old
    webstack docs [--check]               regenerate (or check) the README settings tables
    webstack drift INVENTORY_DIR [--json FILE] [PYINFRA_ARGS...]
                                          dry-run site: what would change per host, with
                                          file diffs (secrets masked); exit 1 on drift
    webstack status INVENTORY_DIR [--json FILE] [PYINFRA_ARGS...]
                                          the live stack in one table (read-only)
    webstack onboard INVENTORY_DIR [HOST...] [PYINFRA_ARGS...]
                                          one site run over the inventory in which the hosts
                                          that refuse the admin user but take root with a key
                                          (of HOST..., default all) are reached as root, once
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from webstack import secrets
from webstack.errors import ConfigError


def _write_recipients(inv: Path, public: str) -> None:
    (inv / "secrets.recipients").write_text(
        "# age public keys the secrets file is encrypted to (one per operator)\n" + public + "\n"
    )


def cmd_init(inv: Path) -> int:
    if (inv / "secrets.age").exists():
        print(f"{inv / 'secrets.age'} exists already; use `edit` or `rotate`", file=sys.stderr)
        return 2
    inv.mkdir(parents=True, exist_ok=True)
    path, public = secrets.ensure_identity(inv.name)
    _write_recipients(inv, public)
    secrets.encrypt(inv, {})
    print(f"key: {path} (keep it safe, outside git)\nrecipients: {inv / 'secrets.recipients'}\nsecrets: {inv / 'secrets.age'}")
    return 0


def cmd_edit(inv: Path) -> int:
    data = secrets.decrypt(inv)
    import yaml

    editor = os.environ.get("EDITOR", "vi")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, name = tempfile.mkstemp(prefix="webstack-secrets-", suffix=".yml", dir=shm)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(yaml.safe_dump(data, default_flow_style=False))
        while True:
            subprocess.run([editor, name], check=False)
            try:
                new = secrets.parse_plaintext(Path(name).read_text(), name)
                break
            except ConfigError as exc:
                print(f"error: {exc}; editing again (Ctrl-C aborts, nothing is saved)", file=sys.stderr)
        secrets.encrypt(inv, new)
    finally:
        os.unlink(name)
    return 0


def cmd_set(inv: Path, key: str) -> int:
    data = secrets.decrypt(inv)
    value = sys.stdin.read().rstrip("\n")
    if not value:
        print("no value on stdin", file=sys.stderr)
        return 2
    data[key] = value
    secrets.encrypt(inv, data)
    return 0


def cmd_unset(inv: Path, key: str) -> int:
    data = secrets.decrypt(inv)
    data.pop(key, None)
    secrets.encrypt(inv, data)
    return 0


def cmd_rotate(inv: Path) -> int:
    """A new key for this operator: their old public key is replaced in secrets.recipients (the other
    operators' stay), and the file is encrypted again to them all."""
    data = secrets.decrypt(inv)
    old = secrets.key_file(inv.name)
    old_public = secrets.ensure_identity(inv.name)[1] if old.exists() else ""
    if old.exists():
        old.replace(old.with_suffix(".agekey.old"))
    path, public = secrets.new_identity(inv.name)
    listed = inv / "secrets.recipients"
    lines = listed.read_text().splitlines() if listed.exists() else []
    kept = [line for line in lines if line.strip() != old_public]
    if not any(line.strip() and not line.startswith("#") for line in kept):
        _write_recipients(inv, public)
    else:
        listed.write_text("\n".join([*kept, public]) + "\n")
    secrets.encrypt(inv, data)
    print(f"new key: {path}; old key kept as {old.with_suffix('.agekey.old')}; commit {inv / 'secrets.recipients'} and secrets.age")
    return 0


def _admin_login(address: str, port: int, ssh: dict, user: str) -> bool | None:
    """Whether ``user`` logs in: True, False (refused: a fresh server), None (nothing answers on ``port``)."""
    import paramiko

    client = paramiko.SSHClient()
    if ssh.get("known_hosts"):
        client.load_host_keys(ssh["known_hosts"])
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(address, port=port, username=user, key_filename=ssh.get("key"), timeout=10,
                       allow_agent=not ssh.get("key"), look_for_keys=not ssh.get("key"))
        return True
    except paramiko.AuthenticationException:
        return False
    except OSError:  # refused or timed out (an unknown host key still raises)
        return None
    finally:
        client.close()


def needs_onboarding(inv: Path, hosts: list[str], ports: dict[str, int]) -> dict[str, int]:
    """Hosts whose admin user cannot log in yet (a fresh server that takes only root) -> the port sshd answers on.

    ``ports``: each host's ``base__ssh_port``. A fresh server's sshd may still
    listen on Debian's 22 until the base role has moved it.
    """
    from webstack.inventory import _hosts

    ssh, entries = _hosts(inv)
    user = ssh.get("user", "root")
    fresh = {}
    for name in hosts or list(entries):
        if name not in entries:
            raise ConfigError(str(inv / "hosts.yml"), f"hosts.{name}", "no such host")
        address, port = str(entries[name]["address"]), ports[name]
        answer = _admin_login(address, port, ssh, user)
        if answer is None and port != 22:
            port, answer = 22, _admin_login(address, 22, ssh, user)
        if answer is None:
            raise ConfigError(str(inv / "hosts.yml"), f"hosts.{name}", f"no SSH server answers on {address}:{ports[name]}")
        if answer is False:
            fresh[name] = port
    return fresh


def cmd_onboard(inv: Path, hosts: list[str], extra: list[str]) -> int:
    from webstack.catalog import discover
    from webstack.inventory import load

    catalog = discover()
    configs = load(inv, catalog=catalog)  # validate everything before touching any server
    ports = {c.name: catalog.ssh_port(c) for c in configs}
    fresh = needs_onboarding(inv, hosts, ports)
    if not fresh:
        print("onboard: every host already accepts its admin user; nothing to do")
        return 0
    print(f"onboard: {', '.join(fresh)} (as root, once; the other hosts as the admin user)")
    # One run over the whole inventory (or the operator's --limit): the hosts already there learn
    # about the new ones in it (upstreams, pg_hba, firewall openings, backup accounts), and a new
    # replica finds its primary ready to be cloned from.
    from webstack.inventory import ROOT_LOGIN_ENV

    env = {**os.environ, ROOT_LOGIN_ENV: ",".join(f"{n}:{p}" for n, p in fresh.items())}
    cmd = [str(Path(sys.executable).parent / "pyinfra"), "-y", str(inv.with_suffix(".py")), "deploys/site.py"]
    return subprocess.run(cmd + extra, check=False, env=env).returncode


def cmd_report(kind: str, inv: Path, json_file: Path | None, extra: list[str]) -> int:
    """``drift``: 0 none, 1 drift (or a host not reached), 2 the run failed; ``status``: 0, or 2."""
    import json

    from webstack import reports
    from webstack.inventory import load

    load(inv.with_suffix("") if inv.suffix == ".py" else inv)  # bad input: reported and named, nothing connected
    env = reports.DRIFT_ENV if kind == "drift" else reports.STATUS_ENV
    report, output, code = reports.dry_run(inv, "site" if kind == "drift" else "status", env, extra)
    if report is None or code != 0:
        print(output[-4000:], file=sys.stderr)
        print(f"webstack {kind}: the dry run failed (exit {code})", file=sys.stderr)
        return 2
    if json_file:
        json_file.write_text(json.dumps(report, indent=2) + "\n")
    if kind == "status":
        print(reports.format_status(report))
        return 0
    print(reports.format_drift(report))
    return 1 if reports.drifted(report) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="webstack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="validate an inventory without connecting")
    check.add_argument("inventory", type=Path)
    sec = sub.add_parser("secrets", help="manage an inventory's encrypted secrets")
    sec.add_argument("action", choices=["init", "edit", "set", "unset", "list", "rotate"])
    sec.add_argument("inventory", type=Path)
    sec.add_argument("key", nargs="?")
    onboard = sub.add_parser("onboard", help="site over the inventory, fresh servers reached as root")
    onboard.add_argument("inventory", type=Path)
    onboard.add_argument("hosts", nargs="*")
    for name, helptext in (("drift", "what site would change on each host (dry run), exit 1 on drift"),
                           ("status", "the live stack in one table (read-only)")):
        rep = sub.add_parser(name, help=helptext)
        rep.add_argument("inventory", type=Path)
        rep.add_argument("--json", type=Path, help="also write the report as JSON to this file")
        rep.epilog = "Other options are passed to pyinfra (e.g. --limit web)."
    logs = sub.add_parser("logs", help="a unit's journal on every host of a host or group, merged, host-prefixed")
    logs.add_argument("inventory", type=Path)
    logs.add_argument("target", help="a host, role or group")
    logs.add_argument("--unit", default="", help="default: the application (its workers on worker hosts)")
    logs.add_argument("--since", default="", help="journalctl --since (e.g. '10 min ago', '2026-12-03 10:00')")
    logs.add_argument("-n", "--lines", type=int, default=50, help="lines per host without --since (default 50)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines from every host")
    run_ = sub.add_parser("exec", help="a command as the application's user, in its release and environment")
    run_.add_argument("inventory", type=Path)
    run_.add_argument("host")
    run_.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command and its arguments")
    aud = sub.add_parser("audit", help="who deployed what, when, from which commit (control machine and servers)")
    aud.add_argument("inventory", type=Path)
    aud.add_argument("--json", type=Path, help="also write the merged runs as JSON to this file")
    cert = sub.add_parser("certificate", help="the load balancers' certificate from ACME, when due (HTTP-01)")
    cert.add_argument("inventory", type=Path)
    cert.add_argument("--force", action="store_true", help="order a new certificate even if the current one is not due")
    cert.add_argument("--renew-days", type=int, default=None, help="override lb__acme_renew_days")
    cert.add_argument("--no-push", action="store_true", help="store it in secrets only (no deploys/site.py --limit lb)")
    docs = sub.add_parser("docs", help="regenerate the README settings tables")
    docs.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args, extra = parser.parse_known_args(argv)
    if extra and args.cmd not in ("drift", "status"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.cmd == "check":
            from webstack.inventory import load

            configs = load(args.inventory)
            # A secret no host needs: a typo of a needed name (that one is reported missing), or a
            # leftover of a removed host or user that should not linger in the file.
            used = {k for cfg in configs for k in cfg.secrets}
            from webstack.labsecrets import CONTROL_ONLY

            unknown = sorted(set(secrets.decrypt(args.inventory)) - used - CONTROL_ONLY)
            if unknown:
                print(f"webstack: error: {args.inventory / 'secrets.age'}: {', '.join(unknown)}: unknown secret(s), "
                      f"needed by no host; remove with `webstack secrets unset {args.inventory} KEY`", file=sys.stderr)
                return 1
            print(f"{args.inventory}: {len(configs)} hosts OK")
            return 0
        if args.cmd in ("drift", "status"):
            return cmd_report(args.cmd, args.inventory, args.json, extra)
        if args.cmd == "logs":
            from webstack import remote

            return remote.logs(args.inventory, args.target, args.unit, args.since, args.lines, args.follow)
        if args.cmd == "audit":
            from webstack import auditlog

            return auditlog.show(args.inventory, args.json)
        if args.cmd == "exec":
            from webstack import remote

            return remote.run_exec(args.inventory, args.host,
                                   args.command[1:] if args.command[:1] == ["--"] else args.command)
        if args.cmd == "onboard":
            return cmd_onboard(args.inventory, args.hosts, [])
        if args.cmd == "certificate":
            from webstack import acme, certificate

            try:
                return certificate.run(args.inventory, force=args.force, renew_days=args.renew_days,
                                       push=not args.no_push)
            except acme.AcmeError as exc:
                print(f"webstack certificate: {exc}", file=sys.stderr)
                return 1
        if args.cmd == "docs":
            from webstack.docs import update_readme


            return update_readme(Path(__file__).resolve().parent.parent / "README.md", check=args.check)
        inv = args.inventory
        if args.action in ("set", "unset") and not args.key:
            parser.error(f"secrets {args.action} needs KEY")
        if args.action == "init":
            return cmd_init(inv)
        if args.action == "edit":
            return cmd_edit(inv)
        if args.action == "set":
            return cmd_set(inv, args.key)
        if args.action == "unset":
            return cmd_unset(inv, args.key)
        if args.action == "list":
            for key in sorted(secrets.decrypt(inv)):
                print(key)
            return 0
        return cmd_rotate(inv)
    except ConfigError as exc:
        print(f"webstack: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Prepare a deploy the way the pyinfra CLI does, against invented server state, without connecting.

``plan(deploy, data, limit)`` loads the lab inventory (from lab/fleet.yml, fixed
secrets), runs ``deploys/<deploy>.py`` for every host in CLI mode (operations
identified by their call-stack lines, as ``pyinfra`` does), answers every fact
from a fixed picture of a converged-but-changed fleet, and returns the global
operation order: for each operation, its names and, per host, the commands it
would run (uploaded files in full). Two versions of the code that produce the
same text make the same run: same operations, same order across hosts, same
files. Used by tests/unit/test_plan.py, and to compare a refactoring with its
base (``python -m tests.unit.simulate site > before.txt``).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]

# Fixed keys, so rendered files (authorized keys, derived certificates) are the same on every run
# (an OpenSSH private key carries a random check number, so these are written out).
_SFTP_KEYS = {
    "main": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtz\n"
            "c2gtZWQyNTUxOQAAACCdQNP1eMa95w0h7nMxyg2arLDiJ/umgmKOfkFRoGNW+QAA\n"
            "AIhPvP6IT7z+iAAAAAtzc2gtZWQyNTUxOQAAACCdQNP1eMa95w0h7nMxyg2arLDi\n"
            "J/umgmKOfkFRoGNW+QAAAEDt5E1WTRETIsD1NH9vqZD2tyEzsQh1KslrahDfcooA\n"
            "AJ1A0/V4xr3nDSHuczHKDZqssOIn+6aCYo5+QVGgY1b5AAAAAAECAwQF\n-----END OPENSSH PRIVATE KEY-----\n",
    "legacy": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtz\n"
              "c2gtZWQyNTUxOQAAACCDe9wKU79s6gSw3eeeP0mc+BqxQlIaqvpmGzMVGXuUOwAA\n"
              "AIg3L6yHNy+shwAAAAtzc2gtZWQyNTUxOQAAACCDe9wKU79s6gSw3eeeP0mc+Bqx\n"
              "QlIaqvpmGzMVGXuUOwAAAEDtb0BcmVe2sPtsknxuSr9XWQQiY9uMWtT+IKLJfP/1\n"
              "0oN73ApTv2zqBLDd554/SZz4GrFCUhqq+mYbMxUZe5Q7AAAAAAECAwQF\n-----END OPENSSH PRIVATE KEY-----\n",
}


def _fixed_secrets() -> dict[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from tests.unit.conftest import SECRETS
    from webstack.tls import derived_leaf

    out = dict(SECRETS)
    for i, cluster in enumerate(("main", "legacy")):
        ca = ed25519.Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)
        out[f"pgbackrest_sftp_key_{cluster}"] = _SFTP_KEYS[cluster]
        out[f"pgbackrest_tls_ca_key_{cluster}"] = ca.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
        out[f"postgres_tls_ca_key_{cluster}"] = ec.derive_private_key(1000 + i, ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    # The load balancers' certificate and key: a pair that matches (the lb role checks), the same on
    # every run (Ed25519 signatures are deterministic).
    out["tls_key"], out["tls_cert"] = derived_leaf(out["pgbackrest_tls_ca_key_main"], "sim", "www.webstack.test", [])
    return out


def _fact(host: Any, cls: type, kwargs: dict[str, Any], down: frozenset[str] = frozenset()) -> Any:
    """The invented answer of one fact: a fleet where every file differs and every service runs."""
    name = cls.__name__
    release = {m["name"]: m["release"] for m in _machines()}[host.name]
    primaries = {"db1", "db3", "drill1"}
    if name == "Codename":
        return release
    if name == "PgCluster":
        if not host.name.startswith(("db", "drill")):
            return None
        primary = host.name in primaries
        system = {"db1": "m", "db2": "m", "db3": "l", "db4": "l"}.get(host.name, "d")
        running = host.name not in down
        return {"system_id": system, "state": "in production", "standby_signal": not primary, "running": running,
                "in_recovery": (not primary) if running else None, "timeline": 1,
                "user_databases": 1 if running else None}
    if name == "NetworkDevices":  # as parsed from `ip -j addr show` in a lab container
        address = {m["name"]: m["address"] for m in _machines()}[host.name]
        return {"lo": {"state": "UNKNOWN", "mtu": 65536, "ipv4": {"address": "127.0.0.1", "mask_bits": 8}},
                "host0": {"state": "UP", "mtu": 1500, "ether": "02:00:00:00:00:01",
                          "ipv4": {"address": address, "mask_bits": 24, "netmask": "255.255.255.0"}}}
    if name == "MemTotalMb":
        return 2048
    if name == "Memory":
        return 2048
    if name == "AppState":
        older, current = "aaaaaaaaaaaa", "0123456789ab"
        return {"current": current, "releases": [older, current], "history": [older, current], "active": True,
                "unverified": ""}
    if name == "SshHostKeys":
        return [f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA{host.name}"]
    if name in ("Container",):
        return "systemd-nspawn"
    if name == "WeakSshModuli":
        return 0
    if name == "CertificateNotAfter":
        from datetime import UTC, datetime, timedelta

        return datetime.now(UTC) + timedelta(days=100, hours=1)
    if name == "File" and str(kwargs.get("path", "")).endswith("/PG_VERSION"):
        return {"mode": 600, "user": "postgres", "group": "postgres", "size": 3}
    if name == "Which":
        return f"/usr/bin/{kwargs.get('command', 'x')}"
    if name == "Os":
        return "Linux"
    if name == "PendingUpgrades":  # the patch run: one library everywhere, a kernel-ish one on the lb pair
        extra = [{"package": "libssl3t64", "from": "3.5.1-1", "to": "3.5.1-1+deb13u1"}] if host.name.startswith("lb") else []
        return [{"package": "tzdata", "from": "2025a-1", "to": "2025b-0+deb13u1"}, *extra]
    if name == "PgReplicationSlots":  # db1: the slot of a removed server; db2's invalidated by max_slot_wal_keep_size
        return {"db1": {"db2": "lost", "db9": "reserved"}, "db3": {"db4": "reserved"}}.get(host.name, {})
    if name == "VipHeld":
        return host.name == "lb1"
    instance = cls()
    default = getattr(instance, "default", None)
    return default() if callable(default) else None


def _machines() -> list[dict[str, Any]]:
    import yaml

    machines = yaml.safe_load((ROOT / "lab" / "fleet.yml").read_text())["machines"]
    return [m for m in machines if not m.get("on_demand")]  # booted by their own test, not in the lab inventory


@contextmanager
def _lab_inventory(group_data: dict[str, str] | None = None) -> Iterator[Path]:
    """The lab inventory in a temporary directory, with its pyinfra inventory file (``group_data``:
    YAML lines appended to group_data/<group>.yml)."""
    import tempfile

    from tests.unit.test_templates import lab_inventory

    with tempfile.TemporaryDirectory() as tmp:
        inv = lab_inventory(Path(tmp))
        for group, lines in (group_data or {}).items():
            with open(inv / "group_data" / f"{group}.yml", "a") as f:
                f.write("\n" + lines + "\n")
        shim = inv.with_suffix(".py")
        shim.write_text((ROOT / "inventories" / "lab.py").read_text())
        yield shim


def _describe(command: Any) -> str:
    from pyinfra.api.command import FileUploadCommand, FunctionCommand

    if isinstance(command, FileUploadCommand):
        src = command.src
        if isinstance(src, (io.BytesIO, io.StringIO)):
            content = src.getvalue()
        else:
            content = Path(str(src)).read_bytes()
        try:
            text = content.decode() if isinstance(content, bytes) else content
        except UnicodeDecodeError:  # a release tarball: its gzip header holds the time it was packed
            return f"upload {command.dest}: {len(content)} bytes"
        return f"upload {command.dest}:\n" + "".join(f"    | {line}\n" for line in text.splitlines())
    if isinstance(command, FunctionCommand):
        return f"call {getattr(command.function, '__name__', command.function)}"
    return f"run {command.get_raw_value()}" if hasattr(command, "get_raw_value") else f"run {command}"


def _layers(state: Any) -> list[list[str]]:
    """pyinfra's operation order (``State.get_op_order``) as its successive groups of ready operations.

    Within a group pyinfra sorts by call-stack line numbers, which move with any edit; the
    groups themselves follow only from each host's sequence and the operations hosts share,
    so they are what two versions of the code must agree on. Sorted by name within a group.
    """
    from graphlib import TopologicalSorter

    ts: TopologicalSorter = TopologicalSorter()
    for host in state.inventory:
        for i, op_hash in enumerate(host.op_hash_order):
            ts.add(op_hash, *([host.op_hash_order[i - 1]] if i else []))
    ts.prepare()
    out = []
    while ts.is_active():
        ready = sorted(ts.get_ready(), key=lambda h: sorted(state.op_meta[h].names))
        ts.done(*ready)
        out.append(ready)
    return out


def plan(deploy: str, data: dict[str, Any] | None = None, limit: list[str] | None = None,
         down: frozenset[str] = frozenset(), group_data: dict[str, str] | None = None) -> str:
    """The global operation order of ``deploys/<deploy>.py`` on the lab (see the module doc)."""
    import click
    import pyinfra
    from pyinfra.api import Config, Inventory, State
    from pyinfra.api import facts as pyinfra_facts
    from pyinfra.api.state import StateStage
    from pyinfra.context import ctx_config, ctx_host, ctx_inventory, ctx_state
    from pyinfra_cli.util import exec_file, load_deploy_file

    from roles import audit
    from roles.app import hooks

    audit.reset()
    hooks.reset()
    secrets = _fixed_secrets()

    def fake_get_fact(state, host, cls, args=None, kwargs=None, ensure_hosts=None, apply_failed_hosts=True):
        return _fact(host, cls, kwargs or {}, down)

    deploy_file = str(ROOT / "deploys" / f"{deploy}.py")
    argv = ["pyinfra", "inventory.py", deploy_file, *[f"--data={k}={v}" for k, v in (data or {}).items()]]
    with _lab_inventory(group_data) as shim, \
            mock.patch("webstack.secrets.decrypt", lambda inv: dict(secrets)), \
            mock.patch.object(pyinfra_facts, "_get_fact", fake_get_fact), \
            mock.patch.object(sys, "argv", argv), \
            mock.patch("roles.postgres.scram.os.urandom", lambda n: bytes(n)), \
            mock.patch.object(pyinfra, "is_cli", True):
        ctx = click.Context(click.Command("pyinfra"))
        ctx.params = {"inventory": str(shim), "operations": (deploy_file,),
                      "data": tuple(f"{k}={v}" for k, v in (data or {}).items())}
        state = State(check_for_changes=False)
        config = Config()
        with ctx, ctx_state.use(state):
            groups = exec_file(str(shim), return_locals=True)
        groups = {k: v for k, v in groups.items() if not k.startswith("_") and isinstance(v, (list, tuple))}
        inventory = Inventory((groups.pop("all"), {}), override_data=dict(data or {}),
                              **{name: (hosts, {}) for name, hosts in groups.items()})
        with ctx_state.use(state), ctx_inventory.use(inventory), ctx_config.use(config):
            state.init(inventory, config, initial_limit=[inventory.get_host(n) for n in limit] if limit else None)
            state.set_stage(StateStage.Connect)
            for host in inventory:
                if state.is_host_in_limit(host):
                    state.activate_host(host)
                    host.connected = True
            state.set_stage(StateStage.Prepare)
            state.current_op_file_number = 0
            out = []
            try:
                load_deploy_file(state, deploy_file)
            except Exception as exc:
                return f"refused: {exc}\n"
            for depth, layer in enumerate(_layers(state)):
                out.append(f"-- step {depth}")
                for op_hash in layer:
                    names = " / ".join(sorted(state.op_meta[op_hash].names))
                    out.append(f"== {names}")
                    for host in inventory:
                        op = state.ops.get(host, {}).get(op_hash)
                        if op is None:
                            continue
                        # Commands run as another user (``_sudo_user``) say so: the generator yields them bare.
                        user = op.global_arguments.get("_sudo_user")
                        prefix = f"as {user}: " if user else ""
                        with ctx_host.use(host):
                            try:
                                commands = [prefix + _describe(c) for c in op.command_generator()]
                            except Exception as exc:  # an invented fact a pyinfra operation cannot use
                                commands = [f"error {type(exc).__name__}: {exc}"]
                        out.append(f"  [{host.name}]" + ("" if commands else " (no commands)"))
                        out += [f"    {c}" for c in commands]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    args = sys.argv[1:]
    name = args[0]
    options = dict(a.split("=", 1) for a in args[1:] if "=" in a)
    hosts = [a[1:] for a in args[1:] if a.startswith("@")]
    stopped = frozenset(a[1:] for a in args[1:] if a.startswith("-"))
    sys.stdout.write(plan(name, options, hosts or None, stopped))

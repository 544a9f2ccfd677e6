"""The database tier on both Debian releases: replication, access rules, switchover, failover, rejoin.

Clients connect from app1 (a host of the `app` group, which pg_hba and the
firewall admit) with psql over TLS, as the application does.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import yaml

from lab.probe import ADDRESS, PGPASS, Writer, conninfo, sql
from tests.integration.conftest import BIN, MACHINES, ROOT, deploy, host_for, inventory_copy, lab, run, wait_for
from webstack.inventory import load

pytestmark = pytest.mark.lab

def clusters() -> list[tuple[str, str, str]]:
    """(cluster, primary, replica) per the lab fleet and the lab's group data, one per Debian release.

    Read from lab/fleet.yml and inventories/lab/group_data (not hosts.yml, which
    only exists once the lab is up), so the test matrix is known at collection.
    """
    out = {}
    data_dir = ROOT / "inventories" / "lab" / "group_data"
    for machine in MACHINES.values():
        if "postgres" not in machine["roles"]:
            continue
        settings: dict = {}
        for group in ["all", *machine["roles"], *machine["groups"]]:
            path = data_dir / f"{group}.yml"
            if path.exists():
                settings.update(yaml.safe_load(path.read_text()) or {})
        cluster, primary = settings.get("postgres__cluster", "main"), settings["postgres__primary"]
        if machine["name"] != primary:
            out[cluster] = (cluster, primary, machine["name"])
    return sorted(out.values())


CLUSTERS = clusters()


def slots(name: str) -> dict[str, str]:
    """Physical replication slots on a server: name -> active (t/f)."""
    out = host_for(name).check_output("runuser -u postgres -- psql -XAt -F ' ' -c "
                                      "\"select slot_name, active from pg_replication_slots where slot_type = 'physical'\"")
    return dict(line.split() for line in out.splitlines())


@pytest.fixture(scope="module")
def client(converged):
    """app1 with a psql client and the app's password in a private pgpass file."""
    app1 = host_for("app1")
    app1.run("DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-client >/dev/null")
    db = next(c for c in load(ROOT / "inventories" / "lab") if "postgres" in c.roles)
    password = db.secret("postgres_password_app").unmask()
    app1.run(f"umask 077; echo '*:*:app:app:{password}' > {PGPASS}")
    for _cluster, primary, _replica in CLUSTERS:
        sql(app1, primary, "create table if not exists marks (id bigint primary key, at timestamptz default now())")
    return app1


@pytest.mark.parametrize("cluster,primary,replica", CLUSTERS)
def test_one_psql_session_answers_each_query_fact_as_its_own_psql(converged, cluster, primary, replica):
    """The prefetch's merged psql (roles.postgres.facts.PsqlQuery.merged) against each fact's own
    command, on a primary (slots, a streaming standby) and its replica; and on a stopped server it
    declines (each fact is then asked by itself and answers empty)."""
    from roles.postgres.deploy import PgRewindGrants
    from roles.postgres.facts import PgReplicationSlots, PgRoleVerifiers, PgStreamingStandbys

    facts = [PgRoleVerifiers(), PgReplicationSlots(), PgStreamingStandbys(), PgRewindGrants()]
    command, split = facts[0].merged([(f, {}) for f in facts])
    for name in (primary, replica):
        target = host_for(name)
        parts = split(target.check_output(command).splitlines())
        assert parts is not None, name
        for fact, part in zip(facts, parts, strict=True):
            own = target.check_output(fact.command()).splitlines()
            assert part == own and fact.process(part) == fact.process(own), (name, type(fact).__name__)
    primary_parts = split(host_for(primary).check_output(command).splitlines())
    assert primary_parts is not None and replica.replace("-", "_") in "\n".join(primary_parts[1])
    assert primary_parts[2] and any(line.startswith("app SCRAM-SHA-256$") for line in primary_parts[0])
    assert split([]) is None  # what a stopped server prints


@pytest.mark.parametrize("cluster,primary,replica", CLUSTERS)
def test_row_readable_on_replica_within_a_second(client, cluster, primary, replica):
    mark = int(time.time() * 1000)
    sql(client, primary, f"insert into marks (id) values ({mark})")
    start = time.monotonic()
    while sql(client, replica, f"select count(*) from marks where id = {mark}") != "1":
        assert time.monotonic() - start < 1.0, f"{replica} did not show the row within 1 s"
        time.sleep(0.05)


@pytest.mark.parametrize("cluster,primary,replica", CLUSTERS)
def test_replica_refuses_writes(client, cluster, primary, replica):
    result = sql(client, replica, "insert into marks (id) values (1)", check=False)
    assert result.rc != 0 and "read-only transaction" in result.stderr


RELAY = """
import socket, sys, threading
def pipe(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        a.close(); b.close()
server = socket.create_server(("127.0.0.1", int(sys.argv[1])), reuse_port=True)
while True:
    c, _ = server.accept()
    u = socket.create_connection((sys.argv[2], 5432))
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c), daemon=True).start()
"""


@pytest.mark.parametrize("cluster,primary,replica", CLUSTERS)
def test_a_relay_or_another_server_in_the_primarys_place_is_refused(client, cluster, primary, replica):
    """Clients verify the member's certificate (verify-full against the cluster's CA) and bind the
    SCRAM exchange to the TLS channel. Injected: a TCP relay on the client in front of the primary
    (it worked with the former sslmode=require), the replica answering at the primary's address,
    and a server of the other cluster there (its certificate is from another CA)."""
    port = 15432 if cluster == "main" else 15433
    client.check_output(f"cat > /root/relay.py <<'EOF'{RELAY}EOF")
    client.check_output(f"systemd-run --unit=ws-relay-{port} --collect python3 /root/relay.py {port} {ADDRESS[primary]}")
    try:
        wait_for(lambda: client.run(f"ss -Htln 'sport = :{port}' | grep -q LISTEN").rc == 0, 10, "relay listening")
        relayed = sql(client, primary, "select 1", check=False, host="127.0.0.1", port=str(port))
        assert relayed.rc != 0 and 'does not match host name "127.0.0.1"' in relayed.stderr, relayed.stderr
        # The relay itself works: what stopped it is the verification (the old setting let it through).
        assert sql(client, primary, "select 1", host="127.0.0.1", port=str(port), sslmode="require") == "1"
    finally:
        client.run(f"systemctl stop ws-relay-{port}")
    impostor = sql(client, primary, "select 1", check=False, hostaddr=ADDRESS[replica])
    assert impostor.rc != 0 and f'does not match host name "{ADDRESS[primary]}"' in impostor.stderr, impostor.stderr
    other = next(p for c, p, _r in CLUSTERS if c != cluster)
    stranger = sql(client, primary, "select 1", check=False, hostaddr=ADDRESS[other])
    assert stranger.rc != 0 and "certificate verify failed" in stranger.stderr, stranger.stderr
    # The genuine server: verified, channel-bound, and so is the replica's stream from it.
    assert sql(client, primary, "select ssl from pg_stat_ssl where pid = pg_backend_pid()") == "t"
    receiver = host_for(replica).check_output(
        "runuser -u postgres -- psql -XAtc 'select conninfo from pg_stat_wal_receiver'")
    assert "sslmode=verify-full" in receiver and "channel_binding=require" in receiver, receiver


@pytest.mark.parametrize("cluster,primary,replica", CLUSTERS)
def test_access_rules(client, cluster, primary, replica):
    # Wrong password: refused by scram-sha-256.
    bad = client.run(f"PGPASSWORD=wrong psql \"{conninfo(primary)}\" -XAtqc 'select 1'")
    assert bad.rc != 0 and "password authentication failed" in bad.stderr
    # No TLS: refused by pg_hba (hostssl only).
    plain = client.run(f"PGPASSFILE={PGPASS} psql \"{conninfo(primary, sslmode='disable')}\" -XAtqc 'select 1'")
    assert plain.rc != 0 and "no encryption" in plain.stderr
    # A cluster peer gets through the firewall (for replication) but pg_hba refuses it the app database.
    peer = host_for(replica).run(
        f"PGPASSWORD=x psql 'host={ADDRESS[primary]} dbname=app user=app sslmode=require' -XAtqc 'select 1'")
    assert peer.rc != 0 and "no pg_hba.conf entry" in peer.stderr
    # A host in no client group never reaches the port (firewall drops it).
    probe = host_for("spare1").run(
        "python3 -c \"import socket; s=socket.socket(); s.settimeout(2); "
        f"print(s.connect_ex(('{ADDRESS[primary]}', 5432)))\"")
    assert probe.stdout.strip() not in ("0", "111")  # neither open nor refused: dropped


@pytest.mark.parametrize("cluster,primary,replica", CLUSTERS)
def test_switchover_under_load_loses_nothing(client, tmp_path, cluster, primary, replica):
    inv = inventory_copy(tmp_path)
    writer = Writer(client, (primary, replica), f"sw_{cluster}")
    wait_for(lambda: writer.acked_count() > 20, 30, "writer never got going")
    deploy(inv, "switchover", "--limit", f"pg_{cluster}", "--data", "write_inventory=yes")
    group_file = inv.parent / "lab" / "group_data" / f"pg_{cluster}.yml"
    assert f"postgres__primary: {replica}" in group_file.read_text()
    before = writer.acked_count()
    wait_for(lambda: writer.acked_count() > before + 20, 30, "no writes acknowledged by the new primary")
    acked = writer.stop()
    stored = writer.stored(replica)
    assert acked - stored == set(), f"committed but lost: {sorted(acked - stored)[:10]}"
    # The old primary streams from the new one; a site run with the new inventory changes nothing.
    assert sql(client, primary, f"select count(*) from writes_sw_{cluster}") == str(len(stored))
    assert deploy(inv, "site", "--limit", f"pg_{cluster}").totals()["changed"] == "-"
    # Archiving follows the promotion: the new primary gets a fresh WAL segment into the repository.
    host_for(replica).check_output(f"runuser -u postgres -- pgbackrest --stanza={cluster} check")
    # Switch back so the lab matches the committed inventory again.
    deploy(inv, "switchover", "--limit", f"pg_{cluster}", "--data", "write_inventory=yes")
    assert f"postgres__primary: {primary}" in group_file.read_text()
    assert slots(primary) == {replica: "t"}
    assert slots(replica) == {}, "the standby kept a slot from its time as primary (it holds back WAL)"


# Failover -> fence -> rejoin -> switchover back, repeated: one run of the suite once failed at
# the switchover back (issue 16; fixed). WEBSTACK_CYCLES=N repeats it N times per release (the suite: once).
CYCLES = int(os.environ.get("WEBSTACK_CYCLES", "1"))


@pytest.mark.parametrize("cycle", range(1, CYCLES + 1))
@pytest.mark.parametrize("cluster,primary,replica", CLUSTERS)
def test_failover_fence_and_rejoin(client, tmp_path, cluster, primary, replica, cycle):
    inv = inventory_copy(tmp_path)
    mark = int(time.time() * 1000)
    sql(client, primary, f"insert into marks (id) values ({mark})")
    wait_for(lambda: sql(client, replica, f"select count(*) from marks where id = {mark}") == "1", 5, "not replicated")
    lab("poweroff", primary)
    try:
        # The committed inventory still names the dead primary: the failover deploy is one command.
        deploy(inv, "failover", "--limit", replica, "--data", "write_inventory=yes")
        sql(client, replica, f"insert into marks (id) values ({mark + 1})")
        assert f"postgres__primary: {replica}" in (inv.parent / "lab/group_data" / f"pg_{cluster}.yml").read_text()
    finally:
        lab("start", primary)
    old = host_for(primary)
    version = old.check_output("ls /etc/postgresql")
    # Fenced: the old primary refused to start as a second primary.
    wait_for(lambda: "webstack fence" in old.check_output(
        f"journalctl -u postgresql@{version}-main --no-pager | tail -20"), 30, "pg-fence did not act")
    assert not old.service(f"postgresql@{version}-main").is_running
    # A routine site run with the new inventory refuses to touch the former primary.
    stale = deploy(inv, "site", "--limit", f"pg_{cluster}", check=False)
    assert stale.returncode != 0 and f"{primary} is a former primary" in stale.output
    rejoin = deploy(inv, "rejoin", "--limit", f"pg_{cluster}")
    assert "pg_rewind against" in rejoin.output
    assert old.check_output("runuser -u postgres -- psql -XAtc 'select status from pg_stat_wal_receiver'") == "streaming"
    assert sql(client, primary, f"select count(*) from marks where id in ({mark}, {mark + 1})") == "2"
    # Back to the committed inventory's primary: promoted and reconfigured without a restart.
    started = old.check_output("runuser -u postgres -- psql -XAtc 'select pg_postmaster_start_time()'")
    deploy(inv, "switchover", "--limit", f"pg_{cluster}", "--data", f"to={primary}", "--data", "write_inventory=yes")
    assert f"postgres__primary: {primary}" in (inv.parent / "lab/group_data" / f"pg_{cluster}.yml").read_text()
    assert old.check_output("runuser -u postgres -- psql -XAtc 'select pg_postmaster_start_time()'") == started
    # Both units as systemd sees them: the new primary active, the old one streaming from it.
    for name in (primary, replica):
        assert host_for(name).service(f"postgresql@{version}-main").is_running, f"{name}: unit not active"
    assert host_for(replica).check_output(
        "runuser -u postgres -- psql -XAtc 'select status from pg_stat_wal_receiver'") == "streaming"
    assert slots(replica) == {} and slots(primary) == {replica: "t"}


MAIN = next(c for c in CLUSTERS if c[0] == "main")


def test_fence_refuses_on_a_doubtful_answer_and_starts_alone_when_no_peer_answers(client):
    """pg-fence, when the primary (no standby.signal) starts: a peer that answers but not as a standby
    (here: pg_hba rejects the question) may be a primary, so the start is refused after the wait;
    a peer that never answers (a partition) is waited for, then the server starts alone."""
    _cluster, primary, replica = MAIN
    old, peer = host_for(primary), host_for(replica)
    version = old.check_output("ls /etc/postgresql")
    unit = f"postgresql@{version}-main"
    hba = f"/etc/postgresql/{version}/main/pg_hba.conf"
    peer.check_output(f"cp -p {hba} {hba}.test && sed -i '1i hostssl all replicator {ADDRESS[primary]}/32 reject' {hba} "
                      "&& runuser -u postgres -- psql -XAtqc 'select pg_reload_conf()'")
    try:
        old.check_output(f"systemctl stop {unit}")
        started = time.monotonic()
        refused = old.run(f"systemctl start {unit}")
        assert refused.rc != 0, "the primary started although its peer's answer was an error"
        assert time.monotonic() - started >= 15, "refused without asking the peer again for the fence's wait"
        journal = old.check_output(f"journalctl -u {unit} --no-pager -n 30")
        assert "rejects connection" in journal and "it may be a primary; refusing" in journal, journal[-1500:]
    finally:
        peer.check_output(f"mv {hba}.test {hba} && runuser -u postgres -- psql -XAtqc 'select pg_reload_conf()'")
    lab("partition", primary, replica)
    try:
        started = time.monotonic()
        old.check_output(f"systemctl start {unit}")
        assert time.monotonic() - started >= 15, "started without waiting for the unreachable peer"
        assert "starting alone" in old.check_output(f"journalctl -u {unit} --no-pager -n 30")
    finally:
        lab("heal")
    wait_for(lambda: peer.check_output("runuser -u postgres -- psql -XAtc 'select status from pg_stat_wal_receiver'")
             == "streaming", 60, f"{replica} does not stream again")


def test_partitioned_primary_loses_nothing_silently(client, tmp_path):
    """Split brain, asynchronous mode: db1 is cut off from db2 and the control machine but not from
    app1, which keeps writing through the read-write connection string. The failover promotes db2
    while db1 still takes writes; once the partition heals, pg-watch stops db1, and the rejoin
    refuses to rewind away what db1 alone committed, naming the count, until told to discard it."""
    cluster, primary, replica = MAIN
    inv = inventory_copy(tmp_path)
    writer = Writer(client, (primary, replica), "split")
    old = host_for(primary)
    try:
        _split_brain(inv, cluster, primary, replica, writer, old)
    finally:
        writer.stop()


def _split_brain(inv, cluster: str, primary: str, replica: str, writer: Writer, old) -> None:
    try:
        wait_for(lambda: writer.acked_count() > 20, 30, "writer never got going")
        lab("partition", primary, replica)
        lab("partition", primary, "control")
        before = writer.acked_count()
        wait_for(lambda: writer.acked_count() > before + 20, 30, "the cut-off primary took no writes")
        deploy(inv, "failover", "--limit", replica, "--data", "write_inventory=yes")
        before = writer.acked_count()
        wait_for(lambda: writer.acked_count() > before + 10, 30, "no writes after the failover")
    finally:
        lab("heal")
    wait_for(lambda: "webstack fence:" in old.check_output("journalctl -u webstack-pg-watch --no-pager -g 'webstack fence' "
                                                           "|| true"),
             30, "pg-watch did not stop the old primary after the partition healed")
    before = writer.acked_count()
    wait_for(lambda: writer.acked_count() > before + 20, 30, "no writes reached the new primary")
    acked = writer.stop()
    lost = acked - writer.stored(replica)
    assert lost, "no write was acknowledged by the cut-off primary alone (the test proves nothing)"
    refused = deploy(inv, "rejoin", "--limit", f"pg_{cluster}", check=False)
    told = re.search(r"(\d+) committed transaction\(s\) that \S+ never received", refused.output)
    assert refused.returncode != 0 and told, refused.output[-3000:]
    assert int(told.group(1)) >= len(lost), f"rejoin reported {told.group(1)}, {len(lost)} acknowledged rows are missing"
    saved = re.search(r"Saved in (\S+) on", refused.output).group(1)
    assert old.run(f"test -s {saved}/waldump.txt").rc == 0
    rejoin = deploy(inv, "rejoin", "--limit", f"pg_{cluster}", "--data", "discard_divergent=yes")
    assert "pg_rewind discards them (discard_divergent=yes)" in rejoin.output
    assert old.check_output("runuser -u postgres -- psql -XAtc 'select status from pg_stat_wal_receiver'") == "streaming"
    deploy(inv, "switchover", "--limit", f"pg_{cluster}", "--data", f"to={primary}", "--data", "write_inventory=yes")
    assert slots(replica) == {} and slots(primary) == {replica: "t"}


def test_partitioned_synchronous_primary_acknowledges_nothing_that_is_lost(client, tmp_path):
    """The same split brain with postgres__synchronous: the cut-off primary cannot acknowledge a commit,
    so after the failover, the healing (pg-watch stops it) and the rejoin, every acknowledged row is
    on the new primary. A site run between the failover and the rejoin keeps the new primary
    asynchronous (its old peer is fenced); the one after the rejoin makes it synchronous again; a
    synchronous switchover back never waits for the stopped old primary."""
    cluster, primary, replica = MAIN
    inv = inventory_copy(tmp_path)
    group_file = inv.parent / "lab" / "group_data" / f"pg_{cluster}.yml"
    group_file.write_text(group_file.read_text() + "postgres__synchronous: true\n")

    def standbys(name: str) -> str:
        return host_for(name).check_output("runuser -u postgres -- psql -XAtc 'show synchronous_standby_names'")

    deploy(inv, "site", "--limit", f"pg_{cluster}")
    assert standbys(primary) == f"ANY 1 ({replica})"
    writer = Writer(client, (primary, replica), "syncsplit")
    old = host_for(primary)
    try:
        wait_for(lambda: writer.acked_count() > 20, 30, "writer never got going")
        try:
            lab("partition", primary, replica)
            lab("partition", primary, "control")
            time.sleep(3)
            deploy(inv, "failover", "--limit", replica, "--data", "write_inventory=yes")
            time.sleep(3)
        finally:
            lab("heal")
        wait_for(lambda: old.run(f"systemctl is-active -q postgresql@{old.check_output('ls /etc/postgresql')}-main").rc != 0,
                 30, "pg-watch did not stop the old primary")
        # Between the failover and the rejoin: the new primary stays asynchronous.
        between = deploy(inv, "site", "--limit", replica)
        assert "runs asynchronously" in between.output and standbys(replica) == ""
        before = writer.acked_count()
        wait_for(lambda: writer.acked_count() > before + 20, 30, "no writes reached the new primary")
        rejoin = deploy(inv, "rejoin", "--limit", f"pg_{cluster}", check=False)
        if rejoin.returncode != 0:  # the cut-off primary's own waiting commits: never acknowledged
            assert "discard_divergent=yes" in rejoin.output, rejoin.output[-3000:]
            deploy(inv, "rejoin", "--limit", f"pg_{cluster}", "--data", "discard_divergent=yes")
        deploy(inv, "site", "--limit", f"pg_{cluster}")
        assert standbys(replica) == f"ANY 1 ({primary})"
        before = writer.acked_count()
        wait_for(lambda: writer.acked_count() > before + 20, 30, "no synchronous writes after the rejoin")
        deploy(inv, "switchover", "--limit", f"pg_{cluster}", "--data", f"to={primary}", "--data", "write_inventory=yes")
        assert standbys(primary) == f"ANY 1 ({replica})"
        before = writer.acked_count()
        wait_for(lambda: writer.acked_count() > before + 20, 30, "no writes after the switchover back")
        acked = writer.stop()
        assert acked - writer.stored(primary) == set(), "synchronous mode lost acknowledged rows"
    finally:
        writer.stop()
    deploy(ROOT / "inventories" / "lab.py", "site", "--limit", f"pg_{cluster}")
    assert standbys(primary) == ""


def test_invalidated_slot_is_recreated_and_the_replica_catches_up_without_a_reclone(client):
    """db2 stops; db1 writes more WAL than max_slot_wal_keep_size (the lab: 128 MiB), so its slot is
    invalidated. The check names it, a site run recreates it, and db2, started again, fetches
    what it missed from the archive and streams, with every row and the same data directory."""
    cluster, primary, replica = MAIN
    db1, db2 = host_for(primary), host_for(replica)
    version = db2.check_output("ls /etc/postgresql")
    identity = db2.check_output(f"stat -c %i /var/lib/postgresql/{version}/main/PG_VERSION")
    db2.check_output(f"systemctl stop postgresql@{version}-main")
    try:
        sql(client, primary, "drop table if exists slot_marks; create table slot_marks (id int primary key)")
        for n in range(12):  # 12 segments of 16 MiB: past the slot's limit and wal_keep_size
            # (each INSERT writes WAL, so each switch starts a new segment)
            sql(client, primary, f"insert into slot_marks values ({n})")
            db1.check_output("runuser -u postgres -- psql -XAtqc 'select pg_switch_wal()'")
        assert slots(primary) == {replica: "f"}

        def invalidated() -> bool:
            # A segment is removed (and the slot invalidated) only once archived: checkpoint until then.
            db1.check_output("runuser -u postgres -- psql -XAtqc checkpoint")
            return db1.check_output(f"runuser -u postgres -- psql -XAtc \"select wal_status from pg_replication_slots "
                                    f"where slot_name = '{replica}'\"") == "lost"

        wait_for(invalidated, 60, "slot not invalidated: the test proves nothing")
        check = run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/check.py", "--limit", primary,
                    check=False)
        assert check.returncode != 0 and f"replication slot {replica} was invalidated" in check.output
        fixed = deploy(ROOT / "inventories" / "lab.py", "site", "--limit", f"pg_{cluster}")
        assert f"Recreate replication slot {replica}" in fixed.output
    finally:
        db2.check_output(f"systemctl start postgresql@{version}-main")
    wait_for(lambda: db2.check_output("runuser -u postgres -- psql -XAtc 'select status from pg_stat_wal_receiver'")
             == "streaming", 180, f"{replica} does not stream again")
    assert slots(primary) == {replica: "t"}
    wait_for(lambda: sql(client, replica, "select count(*) from slot_marks") == "12", 30, "rows missing on the replica")
    assert db2.check_output(f"stat -c %i /var/lib/postgresql/{version}/main/PG_VERSION") == identity, "re-cloned"


def test_killed_switchover_is_finished_by_a_site_run_or_rejoin(client, tmp_path):
    """The control machine dies (SIGKILL, injected) during a switchover under writes: once after the
    old primary stopped and before the promotion (no primary at all: the next site run starts it
    again), once right after the promotion (the inventory still names the old primary: the site
    run refuses, naming the promotion the new primary recorded, and one rejoin finishes the job).
    Every acknowledged row survives."""
    cluster, primary, replica = MAIN
    inv = inventory_copy(tmp_path)
    group_file = inv.parent / "lab" / "group_data" / f"pg_{cluster}.yml"
    writer = Writer(client, (primary, replica), "killed")
    wait_for(lambda: writer.acked_count() > 20, 30, "writer never got going")

    killed = deploy(inv, "switchover", "--limit", f"pg_{cluster}", check=False,
                    env={"WEBSTACK_FAULT": "switchover:old-stopped"})
    assert killed.returncode == -9 and "killed at switchover:old-stopped" in killed.output, killed.output[-2000:]
    assert sql(client, replica, "select pg_is_in_recovery()") == "t"
    assert sql(client, primary, "select 1", check=False).rc != 0, "the old primary should be stopped"
    deploy(inv, "site", "--limit", f"pg_{cluster}")
    assert sql(client, primary, "select pg_is_in_recovery()") == "f"
    before = writer.acked_count()
    wait_for(lambda: writer.acked_count() > before + 20, 30, "no writes after the site run")

    killed = deploy(inv, "switchover", "--limit", f"pg_{cluster}", check=False,
                    env={"WEBSTACK_FAULT": "switchover:promoted"})
    assert killed.returncode == -9 and "killed at switchover:promoted" in killed.output, killed.output[-2000:]
    assert f"postgres__primary: {primary}" in group_file.read_text()
    record = host_for(replica).check_output("cat /var/lib/webstack/pg-promoted")
    assert f"from={primary} to={replica}" in record and "by=switchover" in record
    before = writer.acked_count()
    wait_for(lambda: writer.acked_count() > before + 20, 30, "the promoted server takes no writes")
    stale = deploy(inv, "site", "--limit", f"pg_{cluster}", check=False)
    assert stale.returncode != 0 and f"{replica} recorded its promotion" in stale.output
    assert "--data write_inventory=yes finishes it" in stale.output
    deploy(inv, "rejoin", "--limit", f"pg_{cluster}", "--data", "write_inventory=yes")
    assert f"postgres__primary: {replica}" in group_file.read_text()
    assert host_for(primary).check_output(
        "runuser -u postgres -- psql -XAtc 'select status from pg_stat_wal_receiver'") == "streaming"
    assert deploy(inv, "site", "--limit", f"pg_{cluster}").totals()["changed"] == "-"
    acked = writer.stop()
    assert acked - writer.stored(replica) == set(), "acknowledged rows lost"
    deploy(inv, "switchover", "--limit", f"pg_{cluster}", "--data", f"to={primary}", "--data", "write_inventory=yes")
    assert slots(replica) == {} and slots(primary) == {replica: "t"}


def test_restart_only_setting_restarts_the_replica_before_the_primary(client, tmp_path):
    """shared_buffers changes only with a restart: the site run restarts the replica first, then the
    primary (validated before either restart); the committed inventory puts it back the same way."""
    cluster, primary, replica = MAIN
    inv = inventory_copy(tmp_path)
    with open(inv.parent / "lab" / "group_data" / f"pg_{cluster}.yml", "a") as f:
        f.write("postgres__shared_buffers_mb: 144\n")

    def started(name: str) -> float:
        return float(host_for(name).check_output(
            "runuser -u postgres -- psql -XAtc 'select extract(epoch from pg_postmaster_start_time())'"))

    for inventory, value in ((inv, "144MB"), (ROOT / "inventories" / "lab.py", "128MB")):
        before = time.time()
        out = deploy(inventory, "site", "--limit", f"pg_{cluster}").output
        assert "restart-postgres (owed)" in out
        first, last = started(replica), started(primary)
        assert before < first < last, f"{replica} restarted at {first}, {primary} at {last} (run began {before})"
        for name in (primary, replica):
            assert host_for(name).check_output("runuser -u postgres -- psql -XAtc 'show shared_buffers'") == value
        wait_for(lambda: host_for(replica).check_output(
            "runuser -u postgres -- psql -XAtc 'select status from pg_stat_wal_receiver'") == "streaming", 60,
            f"{replica} does not stream after the restarts")
    assert deploy(ROOT / "inventories" / "lab.py", "site", "--limit", f"pg_{cluster}").totals()["changed"] == "-"


def test_committed_inventory_matches_the_lab_again(converged):
    """After every switch, the committed inventory converges with zero changes."""
    assert run(str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploys/site.py").totals()["changed"] == "-"


@pytest.mark.parametrize("cluster,primary,replica", CLUSTERS)
def test_dry_runs_and_refusals_change_nothing(client, tmp_path, cluster, primary, replica):
    inv = inventory_copy(tmp_path)
    dry = deploy(inv, "switchover", "--limit", f"pg_{cluster}", "--dry")
    assert f"plan: switchover {primary} -> {replica}" in dry.output
    refused = deploy(inv, "failover", "--limit", replica, check=False)
    assert refused.returncode != 0 and f"{primary} is alive and primary; use deploys/switchover.py" in refused.output
    assert sql(client, primary, "select pg_is_in_recovery()") == "f"
    assert sql(client, replica, "select pg_is_in_recovery()") == "t"
    assert f"postgres__primary: {primary}" in (inv.parent / "lab/group_data" / f"pg_{cluster}.yml").read_text()


def test_reclone_replaces_even_a_streaming_replica(client):
    """`rejoin --data reclone=yes` on a replica that streams: a fresh copy of the primary (a file left
    in the old data directory is gone), streaming again on its slot, every row there."""
    cluster, primary, replica = CLUSTERS[0]
    standby = host_for(replica)
    version = standby.check_output("ls /etc/postgresql")
    marker = f"/var/lib/postgresql/{version}/main/webstack-test-old-copy"
    standby.check_output(f"runuser -u postgres -- touch {marker}")
    count = sql(client, primary, "select count(*) from marks")
    out = deploy(ROOT / "inventories" / "lab.py", "rejoin", "--limit", f"pg_{cluster}", "--data", "reclone=yes")
    assert f"Re-clone from {primary}" in out.output
    assert standby.run(f"test -e {marker}").rc != 0
    wait_for(lambda: standby.check_output(
        "runuser -u postgres -- psql -XAtc 'select status from pg_stat_wal_receiver'") == "streaming", 30, "not streaming")
    assert slots(primary) == {replica: "t"}
    assert sql(client, replica, "select count(*) from marks") == count

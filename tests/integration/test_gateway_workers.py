"""`pam gateway run --workers 2` (issue 17 point 4): the daemon keeps the grants and
their doors, and hands every connection to one of two relay worker processes.

Real daemon, real PostgreSQL, real clients. Connections land on both workers
(their log lines carry the worker's pid), every statement executed is recorded
exactly once and the chain verifies, a cancel reaches its backend whichever
worker takes the CancelRequest, revocation and expiry cut connections on every
worker with the FATAL naming why, tunnel connections are relayed by the workers
(which do their TLS, and refuse with the daemon's answer), an ephemeral
account's grant is relayed by them too, a killed worker ends only its own
connections and is restarted, and SIGTERM stops everything in order.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import APP_DATABASE, provision_gateway
from ephemeral_setup import prepared, role_exists
from harness import (
    AccessProcess,
    Gateway,
    add_target,
    connect_error,
    forward_tunnel,
    open_store,
    shared_store_pair,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from cli.forwarder import Forwarder
from gateway.credentials import pki
from gateway.credentials.secretbox import SecretBox
from gateway.testing.pgcluster import PgRole, TempCluster

pytestmark = pytest.mark.integration

WORKERS = 2
#: Bound on every wait; none of them is a timing check.
WAIT_SECONDS = 60.0
#: A grant that expires during its test, and how long before that its
#: connections are warned (the module's daemon setting).
EXPIRING_GRANT_SECONDS = 20
EXPIRY_NOTICE_SECONDS = 10


@pytest.fixture(scope="module")
def gateway(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = provision_gateway(
        tmp_path_factory.mktemp("workers"),
        pg,
        pg_roles,
        {"workers": WORKERS, "expiry_notice_seconds": [EXPIRY_NOTICE_SECONDS]},
    )
    try:
        yield gw
    finally:
        gw.close()


def worker_pids(gw: Gateway) -> set[int]:
    """The workers the daemon runs now (started, or restarted since)."""
    pids: set[int] = set()
    for event in gw.log_events():
        if event.get("event") == "relay_worker_ready":
            pids.add(int(event["pid"]))
    return {pid for pid in pids if _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}/status").exists()
        and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    )


def relaying_pids(gw: Gateway, session_prefix: str) -> list[int]:
    """The worker pid of each connection of the session started so far."""
    return [
        int(e["worker_pid"])
        for e in gw.log_events()
        if e.get("event") == "connection_started"
        and str(e.get("session_id", "")).startswith(session_prefix)
        and "worker_pid" in e
    ]


def session_id_of(gw: Gateway, access: AccessProcess) -> str:
    sessions = gw.cli_json("sessions", "list", "--active")
    return str(next(s["id"] for s in sessions if s["id"].startswith(access.session_prefix)))


def run_clients(dsn: str, clients: int, statements: int, tag: str) -> list[str]:
    """*clients* concurrent connections, each running *statements* distinct
    statements; returns every statement's SQL, as executed."""
    executed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(number: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for i in range(statements):
                    sql = f'select {number * 1000 + i} as "{tag}"'
                    assert conn.execute(sql).fetchone() == (number * 1000 + i,)
                    with lock:
                        executed.append(sql)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_SECONDS)
    assert not errors, errors
    return executed


def recorded_statements(gw: Gateway, session_id: str) -> list[str]:
    with open_store(gw) as store:
        records = store.list_audit(session_id, limit=10_000, kinds=["statement"])
        return [str(r.sql) for r in records]


def test_connections_land_on_both_workers_and_every_statement_is_recorded_once(
    gateway: Gateway,
) -> None:
    access = gateway.access().wait_ready()
    session_id = session_id_of(gateway, access)
    workers = worker_pids(gateway)
    assert len(workers) == WORKERS, gateway.log()
    executed = run_clients(access.dsn(), clients=8, statements=25, tag="workers_once")
    psql = shutil.which("psql")
    if psql is not None:
        result = subprocess.run(
            [psql, access.dsn(), "-X", "-A", "-t", "-c", "select 424242 as psql_through_worker"],
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
            check=False,
        )
        assert (result.returncode, result.stdout.strip()) == (0, "424242"), result.stderr
        executed.append("select 424242 as psql_through_worker")
    access.stop()
    access.wait()
    # Both workers relayed some of them; the daemon itself none.
    assert set(relaying_pids(gateway, access.session_prefix)) == workers
    recorded = [
        sql
        for sql in recorded_statements(gateway, session_id)
        if "workers_once" in sql or "psql_through_worker" in sql
    ]
    assert sorted(recorded) == sorted(executed)
    with open_store(gateway) as store:
        assert store.get_session(session_id).ended_at is not None
        assert store.verify_audit(session_id) == []
        connections = store.list_connections(session_id)
    assert len(connections) == 8 + (psql is not None)
    assert all(c.ended_at is not None for c in connections)


def connection_worker(gw: Gateway, conn: psycopg.Connection[Any]) -> int:
    """The pid of the worker relaying *conn* (its log line names the backend pid)."""
    backend = conn.info.backend_pid

    def found() -> int | None:
        for event in gw.log_events():
            if event.get("event") == "connection_started" and event.get("backend_pid") == backend:
                return int(event["worker_pid"])
        return None

    return int(wait_for(found, timeout=WAIT_SECONDS))


def connections_on_both_workers(gw: Gateway, dsn: str, count: int) -> list[psycopg.Connection[Any]]:
    """*count* open connections, relayed by both workers (least connections alternates)."""
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(count)]
    assert len({connection_worker(gw, c) for c in conns}) == WORKERS
    return conns


def test_a_cancel_reaches_its_backend_whichever_worker_takes_the_cancel_request(
    gateway: Gateway,
) -> None:
    access = gateway.access().wait_ready()
    conns = connections_on_both_workers(gateway, access.dsn(), WORKERS)
    # A third connection on the first worker: each CancelRequest (a new
    # connection, given to the worker relaying the fewest) lands on the second,
    # so the first query's cancel must be routed to the other worker.
    watcher = psycopg.connect(access.dsn(), autocommit=True)
    try:
        for conn in conns:
            cancelled(watcher, conn)
            assert conn.execute("select 1").fetchone() == (1,)
        routed = [e for e in gateway.log_events() if e.get("event") == "cancel_routed"]
        assert any(e["found"] for e in routed), routed
        forwarded = [e for e in gateway.log_events() if e.get("event") == "cancel_forwarded"]
        assert {int(e["worker_pid"]) for e in forwarded} == worker_pids(gateway)
    finally:
        watcher.close()
        for conn in conns:
            conn.close()
        access.stop()


def cancelled(watcher: psycopg.Connection[Any], conn: psycopg.Connection[Any]) -> None:
    """Run pg_sleep(60) on *conn*, cancel it from this thread once the server
    runs it, and check that the query was cancelled."""
    outcome: list[BaseException] = []

    def sleep() -> None:
        try:
            conn.execute("select pg_sleep(60)")
        except BaseException as exc:
            outcome.append(exc)

    sleeper = threading.Thread(target=sleep)
    sleeper.start()
    wait_for(
        lambda: watcher.execute(
            "select 1 from pg_stat_activity where pid = %s and wait_event = 'PgSleep'",
            (conn.info.backend_pid,),
        ).fetchone(),
        timeout=WAIT_SECONDS,
    )
    conn.cancel()
    sleeper.join(WAIT_SECONDS)
    assert not sleeper.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled), outcome


def revoke_and_check_the_cut(
    gw: Gateway, session_id: str, conns: list[psycopg.Connection[Any]], reason: str
) -> None:
    """Revoke the session (through the CLI, the daemon) and check that each of
    *conns* is cut with the FATAL naming who revoked it and why."""
    who = gw.cli_json("whoami")["name"]
    gw.cli("sessions", "revoke", session_id[:8], "--reason", reason)
    for conn in conns:
        with pytest.raises(psycopg.errors.AdminShutdown) as cut:
            conn.execute("select 2")
        assert f"was revoked by {who}: {reason}" in str(cut.value)


def test_revocation_cuts_connections_on_every_worker_with_the_fatal_naming_why(
    gateway: Gateway,
) -> None:
    access = gateway.access().wait_ready()
    conns = connections_on_both_workers(gateway, access.dsn(), 4)
    try:
        session_id = session_id_of(gateway, access)
        revoke_and_check_the_cut(gateway, session_id, conns, "INC-17")
    finally:
        for conn in conns:
            conn.close()
    with open_store(gateway) as store:
        ends = {c.end_reason for c in store.list_connections(session_id)}
        assert store.verify_audit(session_id) == []
    assert ends == {"session_ended"}
    access.wait()


def test_expiry_cuts_connections_on_every_worker_with_the_fatal_naming_why(
    gateway: Gateway,
) -> None:
    access = gateway.access(duration=f"{EXPIRING_GRANT_SECONDS}s").wait_ready()
    conns = connections_on_both_workers(gateway, access.dsn(), 4)
    notices: list[list[str]] = [[] for _ in conns]
    for conn, seen in zip(conns, notices, strict=True):
        conn.add_notice_handler(lambda notice, seen=seen: seen.append(str(notice.message_primary)))
    try:
        for conn in conns:
            with pytest.raises(psycopg.errors.AdminShutdown) as cut:
                wait_for(lambda c=conn: c.execute("select 1") and False, timeout=WAIT_SECONDS)
            assert "access grant for prod/scram expired at" in str(cut.value)
        # Each was warned first, whichever worker relayed it.
        for seen in notices:
            assert any("connections will be closed then" in text for text in seen), notices
    finally:
        for conn in conns:
            conn.close()
    access.wait()


def test_a_tunnel_grant_works_with_workers(gateway: Gateway) -> None:
    access = gateway.access("--tunnel").wait_ready()
    try:
        with psycopg.connect(access.dsn(), autocommit=True) as conn:
            assert conn.execute("select 40 + 2 as tunnelled").fetchone() == (42,)
            assert connection_worker(gateway, conn) in worker_pids(gateway)
        session_id = session_id_of(gateway, access)
    finally:
        access.stop()
    recorded = [sql for sql in recorded_statements(gateway, session_id) if "tunnelled" in sql]
    assert recorded == ["select 40 + 2 as tunnelled"]


def tunnel_grant(
    gw: Gateway, made: list[Forwarder], key: pki.ec.EllipticCurvePrivateKey, cert: str | None = None
) -> tuple[str, int]:
    """A grant of prod/scram for *key* (a CSR, as `pam db access --tunnel` sends)
    and a forwarder to the daemon's tunnel presenting its certificate (or *cert*);
    the grant's id and the forwarder's port."""
    with gw.api() as api:
        opened = api.open_access(
            resource="prod",
            account="scram",
            duration_seconds=600,
            port=None,
            reason="tunnel through workers",
            csr=pki.csr_for(key),
        )
    presented = (cert or str(opened["certificate"])).encode()
    ca, port = str(opened["ca_cert_pem"]).encode(), int(str(opened["tunnel_port"]))
    return str(opened["id"]), forward_tunnel(made, presented, key, ca, port)


def test_tunnel_connections_are_relayed_by_both_workers_and_end_with_their_grant(
    gateway: Gateway, pg_roles: Mapping[str, PgRole], forwarders: list[Forwarder]
) -> None:
    """The daemon only accepts a tunnel connection: a worker does its TLS
    handshake, asks the daemon which grant its certificate names, relays and
    records it, and cuts it when the grant ends elsewhere."""
    session_id, port = tunnel_grant(gateway, forwarders, pki.new_key())
    user = pg_roles["scram"].name
    dsn = f"host=127.0.0.1 port={port} user={user} dbname={APP_DATABASE} sslmode=disable"
    conns = connections_on_both_workers(gateway, dsn, 4)
    executed = []
    try:
        for number, conn in enumerate(conns):
            sql = f"select {number} as through_the_tunnel"
            assert conn.execute(sql).fetchone() == (number,)
            executed.append(sql)
        revoke_and_check_the_cut(gateway, session_id, conns, "INC-4711")
    finally:
        for conn in conns:
            conn.close()
    # A new connection with the ended grant's certificate: the worker answers
    # the startup inside the tunnel with the daemon's refusal, and records it.
    error = connect_error(port, user, APP_DATABASE)
    assert (error.severity, error.sqlstate) == ("FATAL", "28000")
    assert f"{session_id[:8]} was revoked by " in error.message and ": INC-4711" in error.message
    refused = [
        r
        for r in gateway.cli_json("audit", "refusals")
        if (r["place"], r["reason"]) == ("tunnel", "grant_ended") and session_id[:8] in r["message"]
    ]
    assert refused, gateway.cli_json("audit", "refusals")
    with open_store(gateway) as store:
        recorded = [
            str(r.sql)
            for r in store.list_audit(session_id, kinds=["statement"])
            if "through_the_tunnel" in str(r.sql)
        ]
        assert store.verify_audit(session_id) == []
        connections = store.list_connections(session_id)
    assert sorted(recorded) == sorted(executed)
    assert len(connections) == len(conns)
    assert {c.end_reason for c in connections} == {"session_ended"}
    assert all(c.client_addr.startswith("127.0.0.1") for c in connections)


def test_a_certificate_of_another_ca_is_refused_by_the_worker_that_took_it(
    gateway: Gateway, pg_roles: Mapping[str, PgRole], forwarders: list[Forwarder], tmp_path: Path
) -> None:
    """The TLS handshake is the worker's: it refuses what the gateway CA did not
    sign (the grant id it names does not matter), and the client hears 28000."""
    key = pki.new_key()
    other = pki.ensure_pki(tmp_path, SecretBox(bytes(32)), ())
    forged = other.issue_grant(
        key.public_key(), "0" * 32, dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    )
    _session_id, port = tunnel_grant(gateway, forwarders, key, forged.decode())
    error = connect_error(port, pg_roles["scram"].name, APP_DATABASE)
    assert (error.severity, error.sqlstate) == ("FATAL", "28000")
    refused = wait_for(
        lambda: [
            e
            for e in gateway.log_events()
            if e.get("event") == "tunnel_handshake_refused" and "worker_pid" in e
        ],
        timeout=WAIT_SECONDS,
    )
    assert int(refused[0]["worker_pid"]) in worker_pids(gateway)


def test_an_ephemeral_accounts_grant_is_relayed_by_the_workers(
    gateway: Gateway, pg: TempCluster
) -> None:
    """A grant's own role lives in the daemon's memory; its target goes to the
    worker with each connection, and the role still goes with the grant."""
    prepared(gateway, pg)
    access = gateway.access(account="eph").wait_ready()
    role = access.user
    conns = connections_on_both_workers(gateway, access.dsn(), WORKERS)
    try:
        for conn in conns:
            assert conn.execute("select current_user").fetchone() == (role,)
    finally:
        for conn in conns:
            conn.close()
    access.stop()
    wait_for(lambda: not role_exists(pg, role), timeout=WAIT_SECONDS)


def test_a_killed_worker_ends_only_its_connections_and_is_restarted(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    before = worker_pids(gateway)
    conns = connections_on_both_workers(gateway, access.dsn(), 4)
    try:
        victim = connection_worker(gateway, conns[0])
        os.kill(victim, signal.SIGKILL)
        for conn in conns:
            if connection_worker(gateway, conn) == victim:
                with pytest.raises(psycopg.OperationalError):
                    conn.execute("select 1")
            else:
                assert conn.execute("select 1").fetchone() == (1,)
        after = wait_for(
            lambda: (pids := worker_pids(gateway)) and len(pids) == WORKERS and pids,
            timeout=WAIT_SECONDS,
        )
        assert victim not in after and after - before
        assert any(
            e.get("event") == "relay_worker_died" and e.get("pid") == victim
            for e in gateway.log_events()
        )
        fresh = [psycopg.connect(access.dsn(), autocommit=True) for _ in range(WORKERS)]
        for conn in fresh:
            assert conn.execute("select 3").fetchone() == (3,)
            conn.close()
    finally:
        for conn in conns:
            conn.close()
        access.stop()


def test_sigterm_stops_the_workers_in_order(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path: Path
) -> None:
    gw = provision_gateway(tmp_path, pg, pg_roles)  # workers 1, as gateway.json says
    try:
        assert gw.stop() == 0
        gw.start(args=["--workers", str(WORKERS)])  # the option overrides the setting
        access = gw.access().wait_ready()
        session_id = session_id_of(gw, access)
        workers = worker_pids(gw)
        conns = connections_on_both_workers(gw, access.dsn(), 4)
        for conn in conns:
            conn.execute("select 'before shutdown' as last_words")
        assert gw.stop(signal.SIGTERM) == 0
        for conn in conns:
            with pytest.raises(psycopg.OperationalError) as cut:
                conn.execute("select 1")
            assert isinstance(cut.value, psycopg.errors.AdminShutdown)
            assert "the pam gateway is shutting down" in str(cut.value)
            conn.close()
        assert not any(_alive(pid) for pid in workers)
        events = [e.get("event") for e in gw.log_events()]
        # The grants end their connections (the workers record and flush them)
        # before the workers are told to stop.
        assert "relay_worker_stopping" in events, gw.log()[-6000:]
        assert events.index("gateway_stopping") < events.index("relay_worker_stopping")
        with open_store(gw) as store:
            session = store.get_session(session_id)
            connections = store.list_connections(session_id)
            assert store.verify_audit(session_id) == []
            recorded = store.list_audit(session_id, limit=10_000, kinds=["statement"])
        assert session.end_reason == "gateway_shutdown"
        assert {c.end_reason for c in connections} == {"gateway_shutdown"}
        assert all(c.bytes_from_client for c in connections)  # recorded by the workers
        assert [r.sql for r in recorded].count("select 'before shutdown' as last_words") == 4
    finally:
        gw.close()


def test_metrics_and_readyz_count_the_workers_connections(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    conns = connections_on_both_workers(gateway, access.dsn(), 4)
    try:
        before = scrape(gateway)
        for conn in conns:
            assert conn.execute("select 5").fetchone() == (5,)
        # Refused by a worker (the grant's database is appdb): counted all the same.
        with pytest.raises(psycopg.OperationalError, match="is not available through"):
            psycopg.connect(access.dsn(dbname="postgres"))
        # The workers' statements (written to the trail by them) and refusals.
        after = wait_for(
            lambda: (
                (now := scrape(gateway))
                and now.get(REFUSED, 0) > before.get(REFUSED, 0)
                and now.get(STATEMENTS, 0) >= before.get(STATEMENTS, 0) + len(conns)
                and now
            ),
            timeout=WAIT_SECONDS,
        )
        assert after["pam_connections_live"] >= len(conns)
        with gateway.api() as api:
            ready = api.probe("/readyz").json()
        assert ready["checks"]["workers"]["ok"] is True
        assert ready["checks"]["workers"]["detail"].startswith(f"{WORKERS} of {WORKERS} running")
    finally:
        for conn in conns:
            conn.close()
        access.stop()


REFUSED = 'pam_refusals_total{place="listener",reason="wrong_database"}'
STATEMENTS = "pam_statements_relayed_total"


def scrape(gw: Gateway) -> dict[str, float]:
    """Every sample of /metrics, by its name and labels as the text format writes them."""
    with gw.api() as api:
        text = api.probe("/metrics").text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_a_unix_socket_grant_is_relayed_by_the_workers(gateway: Gateway, tmp_path: Path) -> None:
    directory = tmp_path / "sockets"
    directory.mkdir(mode=0o700)
    directory.chmod(0o700)
    access = gateway.access("--socket", str(directory), "--port", "6544")
    wait_for(lambda: "session " in access.stdout.text() or access.proc.poll() is not None)
    wait_for(lambda: (directory / ".s.PGSQL.6544").exists(), timeout=WAIT_SECONDS)
    access.session_prefix = access.stdout.text().split("session ", 1)[1][:8]
    dsn = f"host={directory} port=6544 user=app_scram dbname=appdb"
    conns = connections_on_both_workers(gateway, dsn, WORKERS)
    try:
        for conn in conns:
            assert conn.execute("select 'through a socket' as unix_socket_grant").fetchone() == (
                "through a socket",
            )
        connections = [
            e
            for e in gateway.log_events()
            if e.get("event") == "connection_started"
            and str(e.get("session_id", "")).startswith(access.session_prefix)
        ]
        assert {e["client"] for e in connections} == {"[local]"}
    finally:
        for conn in conns:
            conn.close()
        access.stop()


def test_workers_end_their_connections_and_exit_when_the_daemon_dies(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path: Path
) -> None:
    gw = provision_gateway(tmp_path, pg, pg_roles, {"workers": WORKERS})
    try:
        access = gw.access().wait_ready()
        workers = worker_pids(gw)
        conns = connections_on_both_workers(gw, access.dsn(), WORKERS)
        assert gw.proc is not None
        gw.proc.kill()  # the daemon alone: no grant is enforced any more
        gw.proc.wait(WAIT_SECONDS)
        for conn in conns:
            with pytest.raises(psycopg.errors.AdminShutdown):
                conn.execute("select 1")
            conn.close()
        wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=WAIT_SECONDS)
        assert any(e.get("event") == "relay_worker_daemon_gone" for e in gw.log_events())
    finally:
        gw.close()


def test_workers_relay_and_audit_on_a_postgresql_store(pg: TempCluster, tmp_path: Path) -> None:
    gw, _other = shared_store_pair(pg, tmp_path, {"workers": WORKERS})
    gw.start()
    try:
        add_target(gw, pg, "prod", APP_DATABASE, "workers")
        access = gw.access().wait_ready()
        session_id = session_id_of(gw, access)
        executed = run_clients(access.dsn(), clients=4, statements=10, tag="pg_store_workers")
        assert set(relaying_pids(gw, access.session_prefix)) == worker_pids(gw)
        access.stop()
        access.wait()
        recorded = [s for s in recorded_statements(gw, session_id) if "pg_store_workers" in s]
        assert sorted(recorded) == sorted(executed)
        with open_store(gw) as store:
            assert store.verify_audit(session_id) == []
    finally:
        gw.close()


def test_the_workers_follow_a_master_key_rotation(
    gateway: Gateway, pg: TempCluster, pg_roles: Mapping[str, PgRole]
) -> None:
    """After `rotate-master-key` (stage, activate), a password stored under the
    new version is opened by the workers that relay the grant's connections."""
    gateway.cli("gateway", "rotate-master-key", "--home", str(gateway.home))
    wait_for(
        lambda: (
            gateway.cli("gateway", "rotate-master-key", "--activate", check=False).returncode == 0
        ),
        timeout=WAIT_SECONDS,
        interval=1.0,
    )
    # The daemon follows the store's active version at its next presence renewal.
    wait_for(
        lambda: any(
            e.get("event") == "master_key_version_active" and e.get("version") == 2
            for e in gateway.log_events()
        ),
        timeout=WAIT_SECONDS,
    )
    role = pg_roles["scram"]
    gateway.cli(
        "account", "add", "prod", "after-rotation", "--username", role.name,
        "--password-stdin", input=role.password + "\n",
    )  # fmt: skip
    access = gateway.access(account="after-rotation").wait_ready()
    try:
        # Held at once, so that the daemon hands them to both workers.
        conns = [psycopg.connect(access.dsn(), autocommit=True) for _ in range(4)]
        try:
            for conn in conns:
                assert conn.execute("select 'sealed under v2'").fetchone() == ("sealed under v2",)
        finally:
            for conn in conns:
                conn.close()
        assert set(relaying_pids(gateway, access.session_prefix)) <= worker_pids(gateway)
        assert len(set(relaying_pids(gateway, access.session_prefix))) == WORKERS
    finally:
        access.stop()

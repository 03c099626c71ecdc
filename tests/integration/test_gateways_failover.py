"""Three gateway processes on one PostgreSQL store: failover and fleet-wide changes.

Real daemons sharing a store, a master key and a CA (``shared_store_fleet``, as
docs/operations.md adds a gateway), a real PostgreSQL 15, a real ``pam login``
and ``pam db access --tunnel`` (the laptop's forwarder) and psycopg. A gateway
is killed with SIGKILL (its whole process group: the audit writer too).

Delays are printed (``-s``) and reported in the issue note, never asserted
against a clock: each wait is bounded only so that a broken build fails.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import APP_DATABASE
from harness import (
    CA_FILES,
    AccessProcess,
    Gateway,
    add_target,
    closed_after,
    cut_error,
    gateway_id,
    open_store,
    shared_store_fleet,
    wait_for,
)

from cli.client import AccessJson, ApiClient
from cli.forwarder import Forwarder, TunnelTarget
from gateway.credentials import pki
from gateway.store.models import AccessSession
from gateway.testing.pgcluster import TempCluster
from gateway.testing.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.integration

RESOURCE = "prod"
PASSWORD = "correct horse battery staple"
#: presence renewed every second, gone after six: a lease that lapses long
#: after the CLI's next heartbeat (every 2 s) has reached another gateway, as
#: the defaults (5 s, 15 s) are
SETTINGS: dict[str, Any] = {"presence_renew_seconds": 1.0, "presence_lease_seconds": 6.0}


def api_url(gw: Gateway) -> str:
    return str(json.loads(gw.config_path.read_text())["api_url"])


@pytest.fixture
def fleet(pg: TempCluster, tmp_path: Path) -> Iterator[list[Gateway]]:
    with closed_after(shared_store_fleet(pg, tmp_path, SETTINGS, 3)) as gateways:
        gateways[0].start(own_process_group=True)  # killed whole, audit writer too
        for gw in gateways[1:]:
            gw.start()
        add_target_for_eng(gateways[0], pg)
        yield gateways


def add_target_for_eng(gw: Gateway, pg: TempCluster) -> None:
    """Resource ``prod`` (the cluster's appdb), account ``scram``, and user
    ``eng`` (a member) whom policy ``eng-prod`` lets use it."""
    add_target(gw, pg, RESOURCE, APP_DATABASE, "failover")
    gw.cli(
        "user", "add", "eng", "--role", "member", "--project", "default", "--password-stdin",
        input=PASSWORD + "\n",
    )  # fmt: skip
    gw.cli(
        "policy", "add", "eng-prod", "--subject", "eng", "--resource", RESOURCE,
        "--account", "scram", "--max-duration", "1h",
    )  # fmt: skip


@pytest.fixture
def laptop(fleet: list[Gateway], tmp_path: Path) -> Iterator[Gateway]:
    """:func:`laptop_of` the fleet; its `pam db access` processes end with the test."""
    made = laptop_of(fleet, tmp_path)
    try:
        yield made
    finally:
        made.close()


def laptop_of(fleet: list[Gateway], tmp_path: Path) -> Gateway:
    """A CLI with a client config of its own, signed in as ``eng`` through the
    first gateway (the CA pinned from a file, as an engineer is handed it)."""
    laptop = Gateway(tmp_path / "laptop")
    laptop.root.mkdir()
    ca_file = laptop.root / "ca.pem"
    ca_file.write_text((fleet[0].home / CA_FILES[0]).read_text())
    laptop.cli(
        "login", "--gateway", api_url(fleet[0]), "--ca-cert", str(ca_file), "--user", "eng",
        "--password-stdin", input=PASSWORD + "\n",
    )  # fmt: skip
    return laptop


def open_tunnel_grant(
    client: ApiClient, key: pki.ec.EllipticCurvePrivateKey, reason: str
) -> AccessJson:
    """A ten-minute grant of prod/scram opened from "another host" (a CSR for
    *key*): what `pam db access --tunnel` asks, without a CLI holding it."""
    return client.open_access(
        resource=RESOURCE,
        account="scram",
        duration_seconds=600,
        port=None,
        reason=reason,
        csr=pki.csr_for(key),
    )


def stored(gw: Gateway, session_id: str) -> AccessSession:
    with open_store(gw) as store:
        return store.get_session(session_id)


def session_id_of(gw: Gateway, access: AccessProcess) -> str:
    with open_store(gw) as store:
        return store.get_session(access.session_prefix).id


def statements(gw: Gateway, session_id: str) -> list[str]:
    with open_store(gw) as store:
        return [r.sql for r in store.list_audit(session_id) if r.sql]


def select_one(dsn: str, sql: str) -> Any:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute(sql).fetchone()
        return None if row is None else row[0]


def test_login_learns_the_fleet_and_the_laptop_fails_over_when_its_gateway_dies(
    fleet: list[Gateway], laptop: Gateway
) -> None:
    a, b, c = fleet
    receiver = WebhookReceiver().start()
    a.cli("webhook", "add", receiver.url, "--event", "access.ended")
    profile = json.loads(laptop.config_path.read_text())
    assert profile["api_url"] == api_url(a)
    assert sorted(profile["api_urls"]) == sorted([api_url(b), api_url(c)])

    access = laptop.access("--tunnel", "--reason", "failover drill", duration="45s")
    access.wait_ready()
    session_id = session_id_of(a, access)
    # Two more grants: a local one held by A (its door is on A's host: it
    # cannot move) and one held by C, which A's death must not touch.
    local_on_a = a.access().wait_ready()
    on_c = c.access().wait_ready()
    local_id, c_id = session_id_of(a, local_on_a), session_id_of(c, on_c)
    held = psycopg.connect(access.dsn(), autocommit=True)
    try:
        assert held.execute("select 'through A'").fetchone() == ("through A",)
        before = stored(b, session_id)
        assert (before.gateway_id, before.holder_id) == (gateway_id(a), gateway_id(a))
        assert before.client_public_key is not None
        # In the store before A dies: what A's audit journal still held at a
        # kill -9 reaches the trail only when a gateway starts on A's state
        # directory again (docs/operations.md, "Failover").
        wait_for(lambda: "select 'through A'" in statements(b, session_id))

        assert a.proc is not None
        os.killpg(a.proc.pid, signal.SIGKILL)
        died = time.monotonic()
        assert a.stop() == -signal.SIGKILL

        # The connection A relayed is gone with it; the client reconnects.
        with pytest.raises(psycopg.OperationalError):
            held.execute("select 'still there?'")
    finally:
        held.close()

    def through_the_same_port() -> bool:
        try:
            return select_one(access.dsn(), "select 'through B'") == "through B"
        except psycopg.OperationalError:
            return False

    wait_for(through_the_same_port, timeout=60, interval=0.2)
    print(f"\nfailover: a new connection worked {time.monotonic() - died:.2f} s after kill -9")

    moved = stored(b, session_id)
    assert moved.ended_at is None
    assert moved.holder_id == gateway_id(b)  # the next gateway the laptop knows
    assert moved.gateway_id == gateway_id(a)  # the opener stays (sealed)
    assert moved.expires_at == before.expires_at
    assert any(
        e.get("event") == "access_taken_over" and e.get("previous_holder") == gateway_id(a)
        for e in b.log_events()
    )
    # The grant's expiry carries on at B: a connection through B is cut at it.
    conn = psycopg.connect(access.dsn(), autocommit=True)
    try:
        conn.execute("select 'after the move'")
        error = wait_for(lambda: cut_error(conn), timeout=90)
    finally:
        conn.close()
    assert isinstance(error, psycopg.errors.AdminShutdown)
    assert "expired at" in str(error)
    ended = wait_for(lambda: (s := stored(b, session_id)).ended_at is not None and s)
    assert ended.end_reason == "expired"

    # One trail across both gateways, chained and sealed: it verifies.
    with open_store(b) as store:
        assert store.verify_audit(session_id) == []
        connections = store.list_connections(session_id)
    sql = statements(b, session_id)
    assert sql.index("select 'through A'") < sql.index("select 'through B'")
    assert "select 'after the move'" in sql
    assert "grant_moved" not in {x.end_reason for x in connections}  # A died: nobody let go
    assert len(connections) >= 3

    # A's local grant ends as A's crash, once its lease lapsed; C's is untouched.
    crashed = wait_for(lambda: (s := stored(b, local_id)).ended_at is not None and s, timeout=60)
    assert crashed.end_reason == "gateway_crash"

    # ... and its webhook is told so, once, by the gateway that recovered it.
    def crash_notices() -> list[dict[str, Any]]:
        bodies = [json.loads(r.body) for r in receiver.events("access.ended")]
        return [b for b in bodies if b["data"]["session_id"] == local_id]

    try:
        wait_for(crash_notices, timeout=60)
        time.sleep(1)  # a second notice, were there one, would be here by now
        notices = crash_notices()
    finally:
        receiver.stop()
    assert [n["data"]["end_reason"] for n in notices] == ["gateway_crash"]
    assert notices[0]["gateway_id"] in (gateway_id(b), gateway_id(c))
    assert stored(b, c_id).ended_at is None
    assert select_one(on_c.dsn(), "select 'C is fine'") == "C is fine"
    assert access.wait(timeout=60) == 0  # the laptop's CLI saw the expiry and left


def test_a_live_gateway_lets_go_of_a_grant_another_took_over(
    fleet: list[Gateway], laptop: Gateway
) -> None:
    """The laptop turns to B while A is alive (A unreachable from it): B takes
    the grant over, and A cuts its connections of it saying where it went. The
    laptop here is this test (an API client and a forwarder), so that no other
    caller of A moves the grant back."""
    a, b, _c = fleet
    key = pki.new_key()
    with laptop.api() as client:
        opened = open_tunnel_grant(client, key, "take-over")
        session_id = opened["id"]
        ca = str(opened["ca_cert_pem"]).encode()
        target = TunnelTarget(
            "127.0.0.1",
            int(opened["tunnel_port"] or 0),
            pki.tunnel_client_context(str(opened["certificate"]).encode(), key, ca),
            "localhost",
        )
        forwarder = Forwarder(target)
        port = forwarder.start()
        try:
            dsn = (
                f"host=127.0.0.1 port={port} user={opened['username']}"
                f" dbname={opened['database']} sslmode=disable"
            )
            held = psycopg.connect(dsn, autocommit=True)
            try:
                assert held.execute("select 1").fetchone() == (1,)
                # What the CLI does on failover: ask another gateway for the
                # grant's certificate as its owner; that gateway takes it over.
                client.endpoints.failed(client.endpoints.current)
                offer = client.access_certificate(session_id)
                assert offer["tunnel_port"] is not None
                error = wait_for(lambda: cut_error(held), timeout=30)
            finally:
                held.close()
        finally:
            forwarder.stop()
    assert isinstance(error, psycopg.errors.AdminShutdown)
    assert f"moved to gateway {gateway_id(b)}" in str(error)
    assert stored(a, session_id).holder_id == gateway_id(b)
    with open_store(a) as store:
        [connection] = wait_for(
            lambda: [x for x in store.list_connections(session_id) if x.ended_at is not None]
        )
    assert connection.end_reason == "grant_moved"
    assert stored(b, session_id).ended_at is None


def test_a_revocation_on_the_third_gateway_cuts_the_connections_the_other_two_relay(
    fleet: list[Gateway],
) -> None:
    a, b, c = fleet
    on_a, on_b = a.access().wait_ready(), b.access().wait_ready()
    ids = [session_id_of(a, on_a), session_id_of(b, on_b)]
    clients = [psycopg.connect(x.dsn(), autocommit=True) for x in (on_a, on_b)]
    try:
        for client in clients:
            assert client.execute("select 1").fetchone() == (1,)
        revoked_at = datetime.now(UTC)
        for session_id in ids:
            c.cli("sessions", "revoke", session_id, "--reason", "INC-3")
        errors = [
            wait_for(lambda client=client: cut_error(client), timeout=30) for client in clients
        ]
    finally:
        for client in clients:
            client.close()
    for error, session_id in zip(errors, ids, strict=True):
        assert isinstance(error, psycopg.errors.AdminShutdown)
        assert f"access session {session_id[:8]} was revoked by third-admin: INC-3" in str(error)
    for gw, session_id in ((a, ids[0]), (b, ids[1])):
        applied = [
            e for e in gw.log_events()
            if e.get("event") == "access_ended_elsewhere" and e.get("session_id") == session_id
        ]  # fmt: skip
        assert applied
        delay = datetime.fromisoformat(applied[0]["timestamp"]) - revoked_at
        print(f"\nrevocation on C applied by {gw.root.name}: {delay.total_seconds():.3f} s")
        ended = stored(c, session_id)
        assert (ended.end_reason, ended.end_detail) == ("revoked", "revoked by third-admin: INC-3")


def test_a_gateway_stopping_hands_its_tunnel_grants_to_another(
    fleet: list[Gateway], laptop: Gateway
) -> None:
    """A rolling restart: SIGTERM to the gateway holding a laptop's grant. Its
    connection ends saying the session goes on; the next one works through
    another gateway, and the session is not ended. A grant with a local port
    ends as before (its door was on the stopped gateway's host)."""
    a, b, _c = fleet
    access = laptop.access("--tunnel", duration="10m").wait_ready()
    session_id = session_id_of(a, access)
    local_on_a = a.access().wait_ready()
    local_id = session_id_of(a, local_on_a)
    held = psycopg.connect(access.dsn(), autocommit=True)
    try:
        assert held.execute("select 1").fetchone() == (1,)
        assert a.stop() == 0
        error = wait_for(lambda: cut_error(held), timeout=30)
    finally:
        held.close()
    assert isinstance(error, psycopg.errors.AdminShutdown)
    # Handed over by A's shutdown, or taken over by B first: the laptop's
    # heartbeat turns to B as soon as A's API stops answering, which may be
    # before A's grants are shut down. Either way the session goes on.
    said = str(error)
    assert (
        f"access session {session_id[:8]} goes on through another gateway" in said
        or f"access session {session_id[:8]} moved to gateway {gateway_id(b)}" in said
    ), said
    assert select_one(access.dsn(), "select 'after the restart'") == "after the restart"
    now = stored(b, session_id)
    assert now.ended_at is None and now.holder_id in (gateway_id(b), gateway_id(_c))
    assert stored(b, local_id).end_reason == "gateway_shutdown"
    # The laptop lets go: the gateway now holding it ends the session.
    assert access.stop() == 0
    assert stored(b, session_id).end_reason == "client_ended"
    with open_store(b) as store:
        assert store.verify_audit(session_id) == []


def test_a_grant_handed_over_at_shutdown_is_built_and_watched_by_its_heir(
    fleet: list[Gateway], laptop: Gateway
) -> None:
    """A tunnel grant whose CLI is silent while its gateway stops (no heartbeat
    can move it first): the stopping gateway hands it to the longest-running
    other one, which builds it at once and, hearing nothing from its CLI,
    ends it after the heartbeat timeout."""
    a, b, _c = fleet
    with laptop.api() as client:
        opened = open_tunnel_grant(client, pki.new_key(), "hand-over")
    session_id = opened["id"]
    assert a.stop() == 0
    assert any(
        e.get("event") == "access_handed_over" and e.get("heir") == gateway_id(b)
        for e in a.log_events()
    )
    assert stored(b, session_id).holder_id == gateway_id(b)
    wait_for(lambda: any(e.get("event") == "grants_handed_over_here" for e in b.log_events()))
    ended = wait_for(lambda: (s := stored(b, session_id)).ended_at is not None and s, timeout=60)
    assert ended.end_reason == "client_ended"
    assert ended.end_detail is not None and "stopped responding" in ended.end_detail

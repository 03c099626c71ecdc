"""Several gateways on one PostgreSQL store, as equals (issue 17, point 1): real
daemons, a real PostgreSQL 15 holding both the store (a database of its own)
and the target, the CLI and a psycopg client.

Gateway A relays a live grant; gateway B starting on the same store leaves A's
session open and its client working. A is killed with -9: once A's presence
lease lapses, B's periodic recovery ends A's session and its connection as
``gateway_crash``, recorded at A's last lease renewal (read from the lease row,
not guessed from the wall clock). A gateway whose store is black-holed refuses
new connections after its grace and, in strict mode, ends its live ones.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import APP_DATABASE
from faultproxy import FaultProxy
from harness import (
    FAST_PRESENCE,
    Gateway,
    add_target,
    closed_after,
    connect_error,
    gateway_id,
    open_store,
    shared_store_pair,
    unique,
    wait_for,
    write_settings,
)

from gateway.config import load_settings
from gateway.credentials.schedule import presence_lease
from gateway.testing.net import free_port
from gateway.testing.pgcluster import TempCluster

pytestmark = pytest.mark.integration

RESOURCE = "prod"


def last_renewal(gw: Gateway) -> datetime | None:
    """When *gw* last renewed its presence lease, from the lease row itself."""
    with psycopg.connect(load_settings(gw.home).store_url) as conn:
        row = conn.execute(
            "select renewed_at from leases where name = %s", (presence_lease(gateway_id(gw)),)
        ).fetchone()
    return None if row is None else row[0]


@pytest.fixture
def pair(pg: TempCluster, tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    """Two daemons' state directories on one PostgreSQL store (not started)."""
    with closed_after(shared_store_pair(pg, tmp_path, FAST_PRESENCE)) as gateways:
        yield gateways


def test_a_gateway_starting_leaves_a_live_ones_sessions_and_ends_a_dead_ones_at_its_last_renewal(
    pair: tuple[Gateway, Gateway], pg: TempCluster
) -> None:
    a, b = pair
    # A process group of its own, so that -9 reaches its audit writer too.
    a.start(own_process_group=True)
    add_target(a, pg, RESOURCE, APP_DATABASE, "shared")
    access = a.access().wait_ready()
    client = psycopg.connect(access.dsn(), autocommit=True)
    try:
        assert client.execute("select 1").fetchone() == (1,)
        with open_store(a) as store:
            [session] = store.list_sessions(active=True)
        assert session.gateway_id == gateway_id(a)

        b.start()
        # B recovered at its start, then ticks (renewal and recovery) while A is
        # alive, for longer than a lease lasts.
        first = wait_for(lambda: last_renewal(b))
        lease = timedelta(seconds=FAST_PRESENCE["presence_lease_seconds"])
        wait_for(lambda: (last_renewal(b) or first) - first > lease)
        assert client.execute("select 2").fetchone() == (2,)
        with open_store(b) as store:
            assert store.get_session(session.id).ended_at is None
        assert not any(
            e.get("event") in ("closed_orphaned_sessions", "closed_sessions_of_gone_gateways")
            for e in b.log_events()
        )

        assert a.proc is not None
        os.killpg(a.proc.pid, signal.SIGKILL)
        assert a.stop() == -signal.SIGKILL
        with open_store(b) as store:
            ended = wait_for(
                lambda: (s := store.get_session(session.id)).ended_at is not None and s,
                timeout=60,
            )
            [connection] = store.list_connections(session.id)
            assert store.verify_audit(session.id) == []
        # A's lease row is as A left it: its last renewal, where its session ends.
        died = last_renewal(a)
        assert died is not None
        assert (ended.end_reason, ended.ended_at) == ("gateway_crash", died)
        assert (connection.end_reason, connection.ended_at) == ("gateway_crash", died)
        assert any(
            e.get("event") == "closed_sessions_of_gone_gateways" and e.get("count") == 1
            for e in b.log_events()
        )
    finally:
        client.close()


def test_a_gateway_that_cannot_reach_its_store_refuses_new_connections_and_strictly_ends_live_ones(
    pg: TempCluster, tmp_path: Path, fault_proxy: Callable[[str, int], FaultProxy]
) -> None:
    database = unique("pam_store")
    pg.create_database(database)
    # The store through a proxy that can black-hole it; the target stays direct.
    proxy = fault_proxy(pg.host, pg.port)
    url = pg.superuser_dsn(database).replace(f":{pg.port}/", f":{proxy.port}/", 1)
    gw = Gateway(tmp_path)
    gw.home.mkdir(parents=True, mode=0o700)
    write_settings(
        gw,
        {
            **FAST_PRESENCE,
            "store_url": url,
            "store_unreachable_grace_seconds": 2.0,
            "store_unreachable_strict": True,
        },
    )
    gw.cli("gateway", "init", "--force", "--api-port", str(free_port()))
    try:
        gw.start()
        add_target(gw, pg, RESOURCE, APP_DATABASE, "shared")
        access = gw.access().wait_ready()
        with psycopg.connect(access.dsn(), autocommit=True) as live:
            assert live.execute("select 1").fetchone() == (1,)
            proxy.stall()  # every store call now waits, as on a black-holed route
            wait_for(lambda: any(e.get("event") == "store_out_of_reach" for e in gw.log_events()))
            with pytest.raises(psycopg.OperationalError, match="cannot reach its store"):
                live.execute("select 2")
        refused = connect_error(access.port, access.user, access.database)
        assert (refused.sqlstate, refused.severity) == ("57P03", "FATAL")
        assert "cannot reach its store" in refused.message
        proxy.resume()
        wait_for(lambda: any(e.get("event") == "store_in_reach_again" for e in gw.log_events()))

        def served_again() -> bool:
            # On a loaded machine a store call can still outlast the short grace
            # right after the route is back (the gateway is right to refuse
            # then): try again until it serves.
            try:
                with psycopg.connect(access.dsn(), autocommit=True) as again:
                    return again.execute("select 3").fetchone() == (3,)
            except psycopg.OperationalError as exc:
                if "cannot reach its store" not in str(exc):
                    raise
                return False

        assert wait_for(served_again)
        with open_store(gw) as store:
            session = store.get_session(access.session_prefix)
            ended = wait_for(
                lambda: (
                    len(c := [x for x in store.list_connections(session.id) if x.ended_at]) == 2
                    and c
                )
            )
        # The one cut while the store was out of reach; the one after, closed by its client.
        by_start = sorted(ended, key=lambda c: c.started_at)
        assert [c.end_reason for c in by_start] == ["store_unavailable", "client_closed"]
    finally:
        proxy.resume()
        gw.close()

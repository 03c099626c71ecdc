"""Changes made through one gateway reach the grants another relays (issue 17,
point 2): real daemons on one PostgreSQL store, a real target, the CLI and
psycopg clients.

Gateway A relays a live grant; a revocation, an extension, a user disabled or a
password rotated through gateway B reaches A by the store's notification (the
reconcile interval is set far beyond every wait here, so it is not what
applied it), or, with A's listening off, by the reconcile alone. The waits are
bounded, not timed: the delay is measured from the two daemons' log
timestamps and printed (``-s``), for docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import APP_DATABASE
from harness import (
    FAST_PRESENCE,
    Gateway,
    add_target,
    closed_after,
    cut_error,
    gateway_id,
    open_store,
    shared_store_pair,
    wait_for,
)

from gateway.store.models import AccessSession
from gateway.testing.pgcluster import TempCluster

pytestmark = pytest.mark.integration

RESOURCE = "prod"
#: notifications only: the first reconcile tick comes long after every wait
LISTEN_ONLY: dict[str, Any] = {**FAST_PRESENCE, "changes_reconcile_seconds": 300.0}
#: no notifications: a reconcile every half second
RECONCILE_ONLY: dict[str, Any] = {
    **FAST_PRESENCE,
    "changes_listen": False,
    "changes_reconcile_seconds": 0.5,
}


@contextmanager
def started_pair(
    pg: TempCluster, tmp_path: Path, settings: dict[str, Any]
) -> Iterator[tuple[Gateway, Gateway]]:
    """Two daemons on one store, both running, A with resource ``prod`` and
    account ``scram``; both closed at the end."""
    with closed_after(shared_store_pair(pg, tmp_path, settings)) as (a, b):
        a.start()
        b.start()
        add_target(a, pg, RESOURCE, APP_DATABASE, "changes")
        yield a, b


@pytest.fixture
def pair(pg: TempCluster, tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    with started_pair(pg, tmp_path, LISTEN_ONLY) as gateways:
        yield gateways


def event_time(gw: Gateway, name: str) -> datetime:
    """When *gw* logged its first *name* event (waits for it, bounded)."""
    found = wait_for(lambda: [e for e in gw.log_events() if e.get("event") == name])
    return datetime.fromisoformat(found[0]["timestamp"])


def report_delay(what: str, made: datetime, applied: datetime) -> None:
    print(f"\n{what}: applied {(applied - made).total_seconds() * 1000:.0f} ms after it was made")


def live_client(a: Gateway, **access: str) -> tuple[psycopg.Connection[Any], str]:
    """A connection relayed by *a* on a new grant, and the grant's session id."""
    grant = a.access(**access).wait_ready()
    client = psycopg.connect(grant.dsn(), autocommit=True)
    assert client.execute("select 1").fetchone() == (1,)
    with open_store(a) as store:
        session_id = store.get_session(grant.session_prefix).id
    return client, session_id


def cut_by(client: psycopg.Connection[Any], change: Callable[[], object]) -> psycopg.Error:
    """Make *change* (through the other gateway) and wait for the FATAL it cuts
    *client* with (closed either way)."""
    try:
        change()
        error = wait_for(lambda: cut_error(client))
    finally:
        client.close()
    assert isinstance(error, psycopg.errors.AdminShutdown)
    return error


def test_a_revoke_through_another_gateway_ends_the_relayed_connection_with_its_fatal(
    pair: tuple[Gateway, Gateway],
) -> None:
    a, b = pair
    client, session_id = live_client(a)
    error = cut_by(client, lambda: b.cli("sessions", "revoke", session_id, "--reason", "INC-9"))
    assert f"access session {session_id[:8]} was revoked by second-admin: INC-9" in str(error)
    with open_store(a) as store:
        ended = store.get_session(session_id)
        assert store.verify_audit(session_id) == []
    assert (ended.end_reason, ended.end_detail) == ("revoked", "revoked by second-admin: INC-9")
    # Recorded once: by B, which wrote it; A only applied it.
    assert not any(e.get("event") == "access_ended" for e in a.log_events())
    report_delay(
        "revocation",
        event_time(b, "access_revoked_in_store"),
        event_time(a, "access_ended_elsewhere"),
    )


@pytest.mark.timeout(240)
def test_an_extension_through_another_gateway_moves_the_relaying_gateways_cut(
    pair: tuple[Gateway, Gateway],
) -> None:
    a, b = pair
    client, session_id = live_client(a, duration="30s")
    try:
        with open_store(a) as store:
            old_expiry = store.get_session(session_id).expires_at
        b.cli("grant", "extend", session_id[:8], "--by", "20s")
        new_expiry = old_expiry + timedelta(seconds=20)
        report_delay(
            "extension",
            event_time(b, "access_extended_in_store"),
            event_time(a, "access_extended_elsewhere"),
        )
        # Past the old expiry (with a margin for the clocks), the connection works.
        wait_for(
            lambda: datetime.now(old_expiry.tzinfo) > old_expiry + timedelta(seconds=2), timeout=60
        )
        assert client.execute("select 2").fetchone() == (2,)
        error = wait_for(lambda: cut_error(client), timeout=60)
    finally:
        client.close()
    assert isinstance(error, psycopg.errors.AdminShutdown)
    assert "expired at" in str(error)

    def ended_in_store() -> AccessSession | None:
        # The relaying gateway cuts the connections first and then records the end.
        with open_store(a) as store:
            session = store.get_session(session_id)
        return session if session.ended_at is not None else None

    ended = wait_for(ended_in_store)
    assert ended.expires_at == new_expiry
    assert ended.end_reason == "expired" and ended.ended_at is not None
    # Cut at the new expiry (the timer's own tolerance aside), long after the old.
    assert ended.ended_at >= new_expiry - timedelta(seconds=1)


def test_a_user_disabled_through_another_gateway_loses_the_connections_another_relays(
    pair: tuple[Gateway, Gateway],
) -> None:
    a, b = pair
    owner = str(a.cli_json("whoami")["name"])
    client, session_id = live_client(a)
    error = cut_by(client, lambda: b.cli("user", "disable", owner))
    assert f"user {owner} was disabled" in str(error)
    with open_store(a) as store:
        ended = store.get_session(session_id)
    assert (ended.end_reason, ended.end_detail) == ("revoked", f"user {owner} was disabled")


def test_a_password_rotated_through_another_gateway_is_used_and_masked_where_it_relays(
    pair: tuple[Gateway, Gateway],
) -> None:
    a, b = pair
    first, session_id = live_client(a)  # A has looked up the target and its password
    first.close()
    b.cli("account", "rotate", RESOURCE, "scram", "--now")
    with open_store(b) as store:
        rotated = store.reveal_password(RESOURCE, "scram")
    # B announces twice: the pending password stored, then promoted.
    wait_for(
        lambda: (
            sum(e.get("event") == "credentials_refreshed_from_store" for e in a.log_events()) >= 2
        )
    )
    with psycopg.connect(_dsn_of(a, session_id), autocommit=True) as again:
        assert again.execute(f"select '{rotated}' as leaked").fetchone() == (rotated,)

    def recorded() -> list[str]:
        with open_store(a) as store:
            return [r.sql for r in store.list_audit(session_id) if r.sql and "leaked" in r.sql]

    [sql] = wait_for(recorded)
    assert rotated not in sql and "***" in sql


def _dsn_of(a: Gateway, session_id: str) -> str:
    [grant] = [g for g in a.accesses if session_id.startswith(g.session_prefix)]
    return grant.dsn()


@pytest.fixture
def reconcile_only_pair(pg: TempCluster, tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    with started_pair(pg, tmp_path, RECONCILE_ONLY) as gateways:
        yield gateways


def test_with_no_notifications_the_reconcile_still_applies_a_revocation(
    reconcile_only_pair: tuple[Gateway, Gateway],
) -> None:
    a, b = reconcile_only_pair
    client, session_id = live_client(a)
    error = cut_by(client, lambda: b.cli("sessions", "revoke", session_id, "--reason", "INC-10"))
    assert f"access session {session_id[:8]} was revoked by second-admin: INC-10" in str(error)
    assert not any(e.get("event") == "change_feed_listening" for e in a.log_events())
    report_delay(
        "revocation, reconcile only",
        event_time(b, "access_revoked_in_store"),
        event_time(a, "access_ended_elsewhere"),
    )


def test_a_listener_whose_connection_is_killed_listens_again_and_hears_the_next_revocation(
    pair: tuple[Gateway, Gateway], pg: TempCluster
) -> None:
    a, b = pair
    client, session_id = live_client(a)
    listening: Callable[[], int] = lambda: sum(  # noqa: E731
        e.get("event") == "change_feed_listening" for e in a.log_events()
    )
    with client:  # closed however the checks before the cut end
        assert wait_for(listening) == 1
        with open_store(a) as store:
            conninfo = store.listen_conninfo()
        assert conninfo is not None
        with psycopg.connect(conninfo, autocommit=True) as admin:
            [(killed,)] = admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity"
                " where application_name = %s",
                (f"pam-changes-{gateway_id(a)}",),
            ).fetchall()
        assert killed is True
        wait_for(lambda: listening() == 2)
        assert any(e.get("event") == "change_feed_lost" for e in a.log_events())
        error = cut_by(
            client, lambda: b.cli("sessions", "revoke", session_id, "--reason", "INC-11")
        )
    assert "was revoked by second-admin: INC-11" in str(error)

"""Seals on session and connection rows (gateway.store.sealing): `pam audit verify`
names an edit of who asked, from where, under which policy, and how it ended.

The rows are edited with plain SQL on the same database, as someone with write
access to it would, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from store_support import FakeClock, pg_admin_url

from gateway.access.ports import ConnectionEnd, ConnectionStart
from gateway.audit.records import AuditEvent
from gateway.credentials.secretbox import SecretBox
from gateway.errors import InvalidRequest
from gateway.store import Store
from gateway.store.schema import sessions
from gateway.store.sealing import SESSION_START, seal


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, SecretBox(secrets.token_bytes(32)), clock=clock) as opened:
        yield opened


@pytest.fixture
def raw(store_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_admin_url(store_url) if "postgresql" in store_url else store_url)
    yield engine
    engine.dispose()


def _edit(raw: Engine, statement: str, **params: Any) -> None:
    with raw.begin() as conn:
        conn.execute(text(statement), params)


def _session_with_connection(store: Store, *, end: bool = True) -> tuple[str, str]:
    store.add_resource("db1", "db.example.com", 5432, "app")
    store.add_account("db1", "ro", "app_reader", "pw-" + secrets.token_hex(8))
    session = store.create_session(
        requester="alice",
        resource="db1",
        account="ro",
        listen_host="127.0.0.1",
        expires_at=datetime(2100, 1, 1, tzinfo=UTC),
        request={
            "principal_id": "p" * 32,
            "token_id": "t" * 32,
            "project": "default",
            "policy_name": "dba-prod",
            "reason": "INC-42",
            "api_client_addr": "10.0.0.7",
            "reported_host": "laptop-7",
        },
    )
    (started,) = store.record_connections([ConnectionStart(session.id, "10.0.0.7:51234", "psql")])
    assert not isinstance(started, Exception) and started is not None
    if end:
        store.record_connections([ConnectionEnd(started.id, "client_closed", 10, 20)])
        store.end_session(session.id, reason="client_ended")
    return session.id, started.id


def _details(store: Store, session_id: str) -> list[str]:
    problems = store.verify_audit(session_id)
    assert all(p.problem == "changed" and p.seq is None for p in problems)
    return [p.detail for p in problems]


def test_intact_rows_verify(store: Store) -> None:
    session_id, _ = _session_with_connection(store)
    assert store.verify_audit(session_id) == []


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("requester", "mallory"),
        ("policy_name", "everything"),
        ("reason", "nothing to see"),
        ("api_client_addr", "127.0.0.1"),
        ("principal_id", "m" * 32),
        ("project", "analytics"),
    ],
)
def test_an_edit_of_who_asked_is_named(store: Store, raw: Engine, column: str, value: str) -> None:
    session_id, _ = _session_with_connection(store)
    _edit(raw, f"UPDATE sessions SET {column} = :v WHERE id = :id", v=value, id=session_id)
    assert _details(store, session_id) == [
        f"the session record {session_id[:8]} was edited: {column} no longer matches what"
        " was sealed"
    ]


def test_an_edit_of_how_a_session_ended_is_named(store: Store, raw: Engine) -> None:
    session_id, _ = _session_with_connection(store)
    _edit(
        raw,
        "UPDATE sessions SET end_reason = 'expired', end_detail = 'x' WHERE id = :id",
        id=session_id,
    )
    assert _details(store, session_id) == [
        f"the session record {session_id[:8]} was edited: end_reason, end_detail no longer"
        " match what was sealed"
    ]


def test_an_edit_of_a_connection_is_named(store: Store, raw: Engine) -> None:
    session_id, connection_id = _session_with_connection(store)
    _edit(
        raw,
        "UPDATE connections SET client_addr = '127.0.0.1:1', bytes_from_server = 0 WHERE id = :id",
        id=connection_id,
    )
    assert _details(store, session_id) == [
        f"the connection record {connection_id[:8]} was edited: client_addr no longer matches"
        " what was sealed",
        f"the connection record {connection_id[:8]} was edited: bytes_from_server no longer"
        " matches what was sealed",
    ]


def test_a_rewritten_seal_is_reported_as_such(store: Store, raw: Engine) -> None:
    session_id, _ = _session_with_connection(store)
    # Both the column and its sealed copy changed: the MAC no longer fits.
    _edit(
        raw,
        "UPDATE sessions SET requester = 'mallory',"
        " start_seal = replace(start_seal, '\"alice\"', '\"mallory\"') WHERE id = :id",
        id=session_id,
    )
    assert _details(store, session_id) == [
        f"the session record {session_id[:8]} was edited: its seal was edited"
    ]


def test_connections_and_sessions_closed_as_orphans_are_sealed(store: Store, raw: Engine) -> None:
    session_id, connection_id = _session_with_connection(store, end=False)
    assert store.close_orphans("gw-restarting") == 1
    assert store.verify_audit(session_id) == []
    _edit(
        raw, "UPDATE connections SET end_reason = 'client_closed' WHERE id = :id", id=connection_id
    )
    assert _details(store, session_id) == [
        f"the connection record {connection_id[:8]} was edited: end_reason no longer matches"
        " what was sealed"
    ]


def test_a_deleted_connection_row_is_named_by_its_start_in_the_trail(
    store: Store, raw: Engine
) -> None:
    session_id, connection_id = _session_with_connection(store, end=False)
    # As the relay records it: the connection's start is a record of the trail.
    store.append_audit(
        [AuditEvent(session_id, connection_id, "connection_start", datetime.now(UTC))]
    )
    store.end_session(session_id, reason="client_ended")
    assert store.verify_audit(session_id) == []
    _edit(raw, "DELETE FROM connections WHERE id = :id", id=connection_id)
    (problem,) = store.verify_audit(session_id)
    assert (problem.seq, problem.problem, problem.detail) == (
        1,
        "removed",
        f"connection records were deleted: {connection_id[:8]} (started at seq 1)",
    )


def test_a_removed_seal_beside_sealed_rows_is_reported(store: Store, raw: Engine) -> None:
    session_id, connection_id = _session_with_connection(store)
    _edit(
        raw,
        "UPDATE sessions SET start_seal = NULL, end_seal = NULL, requester = 'x' WHERE id = :id",
        id=session_id,
    )
    _edit(raw, "UPDATE connections SET end_seal = NULL WHERE id = :id", id=connection_id)
    assert _details(store, session_id) == [
        f"the session record {session_id[:8]} was edited: its start seal was removed",
        f"the session record {session_id[:8]} was edited: its end seal was removed",
        f"the connection record {connection_id[:8]} was edited: its end seal was removed",
    ]


def test_rows_from_before_the_seals_are_not_checked(store: Store, raw: Engine) -> None:
    session_id, _ = _session_with_connection(store)
    # What revision 0006 left: no seal on the session or its connections.
    _edit(
        raw,
        "UPDATE sessions SET start_seal = NULL, end_seal = NULL, requester = 'x' WHERE id = :id",
        id=session_id,
    )
    _edit(
        raw,
        "UPDATE connections SET start_seal = NULL, end_seal = NULL WHERE session_id = :id",
        id=session_id,
    )
    assert store.verify_audit(session_id) == []


def _gateway_session(store: Store, gateway_id: str) -> str:
    store.add_resource("db2", "db.example.com", 5432, "app")
    store.add_account("db2", "ro", "app_reader", "pw-" + secrets.token_hex(8))
    return store.create_session(
        requester="alice",
        resource="db2",
        account="ro",
        listen_host="127.0.0.1",
        expires_at=datetime(2100, 1, 1, tzinfo=UTC),
        gateway_id=gateway_id,
    ).id


def test_an_edit_of_the_gateway_relaying_a_session_is_named(store: Store, raw: Engine) -> None:
    # Moving a session to a live gateway by hand would hide it from crash recovery.
    session_id = _gateway_session(store, "gw-a")
    _edit(raw, "UPDATE sessions SET gateway_id = 'gw-b' WHERE id = :id", id=session_id)
    assert _details(store, session_id) == [
        f"the session record {session_id[:8]} was edited: gateway_id no longer matches what"
        " was sealed"
    ]


def test_a_start_seal_from_before_the_gateway_was_recorded_still_verifies(
    store: Store, raw: Engine
) -> None:
    session_id = _gateway_session(store, "gw-a")
    # What revision 0016 sealed: the same fields but the gateway.
    with raw.connect() as conn:
        row = dict(
            conn.execute(sessions.select().where(sessions.c.id == session_id)).one()._mapping
        )
    names = tuple(name for name in SESSION_START if name != "gateway_id")
    old = seal(store._chain, "sessions", "start", session_id, row, names)
    _edit(
        raw,
        "UPDATE sessions SET start_seal = :s, gateway_id = NULL WHERE id = :id",
        s=old,
        id=session_id,
    )
    store.end_session(session_id, reason="client_ended")
    assert store.verify_audit(session_id) == []


# --- an extension re-seals the expiry --------------------------------------------------


def test_an_extension_reseals_the_expiry_and_a_hand_edit_of_it_still_shows(
    store: Store, raw: Engine
) -> None:
    session_id, _ = _session_with_connection(store, end=False)
    later = datetime(2100, 1, 1, 0, 30, tzinfo=UTC)

    extended = store.extend_session(session_id, expires_at=later)

    assert extended.expires_at == later
    assert store.get_session(session_id).expires_at == later
    assert store.verify_audit(session_id) == []
    store.end_session(session_id, reason="client_ended")
    assert store.verify_audit(session_id) == []
    # Back to the expiry first granted, by hand: the extension's seal shows it.
    with raw.begin() as conn:
        conn.execute(
            sessions.update()
            .where(sessions.c.id == session_id)
            .values(expires_at=datetime(2100, 1, 1, tzinfo=UTC))
        )
    assert _details(store, session_id) == [
        f"the session record {session_id[:8]} was edited: expires_at no longer matches what"
        " was sealed"
    ]


def test_only_a_live_session_moves_and_only_later(store: Store) -> None:
    session_id, _ = _session_with_connection(store, end=False)
    with pytest.raises(InvalidRequest, match="must move expires_at later"):
        store.extend_session(session_id, expires_at=datetime(2099, 12, 31, tzinfo=UTC))
    store.end_session(session_id, reason="expired")
    with pytest.raises(InvalidRequest, match=r"is not live \(it ended: expired\)"):
        store.extend_session(session_id, expires_at=datetime(2100, 1, 2, tzinfo=UTC))
    assert store.get_session(session_id).expires_at == datetime(2100, 1, 1, tzinfo=UTC)

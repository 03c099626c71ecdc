"""Changes announced to the other gateways on a store (``gateway.store.changes``),
on a SQLite file and a real PostgreSQL: what a notification says, that the
transaction making a change announces it (on PostgreSQL, once, when it commits),
and what a gateway reads back to reconcile."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, TypeAlias

import psycopg
import pytest
from store_support import FakeClock, open_session, store_with_db1

from gateway.errors import InvalidRequest
from gateway.identity.principals import PrincipalKind, Role
from gateway.store import Store
from gateway.store.changes import (
    CHANNEL,
    Change,
    ChangeFeed,
    ChangeTopic,
    StoredGrant,
    parse_change,
    payload_of,
)

KEY = secrets.token_bytes(32)
Listener: TypeAlias = "psycopg.Connection[Any] | None"


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with store_with_db1(store_url, KEY, clock) as opened:
        yield opened


@pytest.fixture
def listener(store: Store) -> Iterator[Listener]:
    """A connection listening on the store's channel (None on SQLite)."""
    conninfo = store.listen_conninfo()
    if conninfo is None:
        yield None
        return
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        yield conn


def _heard(conn: Listener) -> list[Change | None]:
    if conn is None:
        return []
    return [parse_change(n.payload) for n in conn.notifies(timeout=0.5)]


def test_a_notification_names_a_topic_and_an_id_and_nothing_else() -> None:
    payload = payload_of(ChangeTopic.SESSION, "s1")
    assert payload == '{"kind":"session","id":"s1"}'
    assert parse_change(payload) == Change(ChangeTopic.SESSION, "s1")


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "[]",
        '{"kind":"session"}',
        '{"kind":"weather","id":"x"}',
        '{"kind":"session","id":"' + "x" * 2000 + '"}',
    ],
)
def test_a_payload_it_does_not_know_is_ignored(payload: str) -> None:
    assert parse_change(payload) is None


def test_the_feed_never_shows_its_conninfo_and_the_password_in_it() -> None:
    async def nothing(*_args: object) -> None:
        return None

    password = secrets.token_hex(8)
    feed = ChangeFeed(f"postgresql://pam:{password}@db.example/pam", nothing, nothing)
    assert password not in repr(feed)
    assert "db.example" not in repr(feed)


def test_only_a_postgresql_store_has_somewhere_to_listen(store: Store, store_url: str) -> None:
    conninfo = store.listen_conninfo()
    if store_url.startswith("sqlite"):
        assert conninfo is None
    else:
        assert conninfo is not None and conninfo.startswith("postgresql://")


def test_ending_a_session_announces_it_once(store: Store, listener: Listener) -> None:
    session = open_session(store, "gw-a")
    _heard(listener)

    store.end_session(session.id, reason="revoked", detail="revoked by bob")
    store.end_session(session.id, reason="client_ended")  # the first end stands

    expected = [] if listener is None else [Change(ChangeTopic.SESSION, session.id)]
    assert _heard(listener) == expected
    assert store.get_session(session.id).end_detail == "revoked by bob"


def test_an_extension_and_a_disabled_user_are_announced(store: Store, listener: Listener) -> None:
    session = open_session(store, "gw-a")
    bob = store.add_principal("bob", kind=PrincipalKind.USER, roles={"default": Role.MEMBER})

    store.extend_session(session.id, expires_at=session.expires_at + timedelta(minutes=5))
    store.disable_principal("bob")
    store.disable_principal("bob")  # already disabled: nothing changes, nothing said

    expected = (
        []
        if listener is None
        else [Change(ChangeTopic.SESSION, session.id), Change(ChangeTopic.PRINCIPAL, bob.id)]
    )
    assert _heard(listener) == expected


def test_grant_states_say_ended_moved_and_disabled(store: Store) -> None:
    bob = store.add_principal("bob", kind=PrincipalKind.USER, roles={"default": Role.MEMBER})
    kept, ended, disabled = (
        store.create_session(
            requester="bob",
            resource="db1",
            account="ro",
            listen_host="127.0.0.1",
            expires_at=open_session(store, None).expires_at,
            request={"principal_id": bob.id} if name == "disabled" else None,
        )
        for name in ("kept", "ended", "disabled")
    )
    store.end_session(ended.id, reason="revoked")
    later = kept.expires_at + timedelta(minutes=5)
    store.extend_session(kept.id, expires_at=later)
    store.disable_principal("bob")

    states = store.grant_states([kept.id, ended.id, disabled.id, "no-such-session"])

    assert states[kept.id] == StoredGrant(expires_at=later, ended_at=None, disabled_principal=None)
    assert states[ended.id].ended_at is not None
    assert states[disabled.id].disabled_principal == "bob"
    assert "no-such-session" not in states
    assert store.grant_states([]) == {}


def test_the_credentials_fingerprint_moves_with_a_password_and_only_then(store: Store) -> None:
    before = store.credentials_fingerprint()
    assert store.credentials_fingerprint() == before
    open_session(store, "gw-a")
    assert store.credentials_fingerprint() == before

    store.rotate_password("db1", "ro", "pw-" + secrets.token_hex(8))
    rotated = store.credentials_fingerprint()
    assert rotated != before

    store.add_account("db1", "rw", "app_writer", "pw-" + secrets.token_hex(8))
    assert store.credentials_fingerprint() != rotated


def test_an_announcement_outside_a_change_reaches_listeners(
    store: Store, listener: Listener
) -> None:
    store.announce_change(ChangeTopic.CREDENTIALS, "gw-b")
    expected = [] if listener is None else [Change(ChangeTopic.CREDENTIALS, "gw-b")]
    assert _heard(listener) == expected


def test_an_extension_made_from_a_stale_expiry_does_not_overwrite_another(store: Store) -> None:
    session = open_session(store, "gw-a")
    first = session.expires_at + timedelta(minutes=5)
    store.extend_session(session.id, expires_at=first, previous=session.expires_at)

    with pytest.raises(InvalidRequest, match="was extended meanwhile"):
        store.extend_session(
            session.id,
            expires_at=session.expires_at + timedelta(minutes=10),
            previous=session.expires_at,
        )
    assert store.get_session(session.id).expires_at == first

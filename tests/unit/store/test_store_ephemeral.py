"""Ephemeral accounts and grant roles in the store, on SQLite and a real
PostgreSQL: an account with no password, the session named after its own role,
a role due for the janitor only once its grant has ended, retries and ends."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, create_engine, text
from store_support import FakeClock, pg_admin_url

from gateway.credentials.secretbox import SecretBox
from gateway.errors import AlreadyExists, InvalidRequest, NotFound
from gateway.reasons import SessionEndReason
from gateway.store import Store


@pytest.fixture
def raw(store_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_admin_url(store_url) if "postgresql" in store_url else store_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, SecretBox(secrets.token_bytes(32)), clock=clock) as opened:
        opened.add_resource("db1", "db.example.com", 5432, "app")
        yield opened


def open_session(store: Store, clock: FakeClock, requester: str = "Alice@Example.com") -> str:
    session = store.create_session(
        requester=requester,
        resource="db1",
        account="eph",
        listen_host="127.0.0.1",
        expires_at=clock.now + timedelta(hours=1),
    )
    return session.id


def test_an_ephemeral_account_has_a_template_and_no_password(store: Store) -> None:
    added = store.add_ephemeral_account("db1", "eph", "app_reader", 86400)
    assert (added.template_role, added.cleanup_after_seconds, added.username) == (
        "app_reader",
        86400,
        "app_reader",
    )
    [listed] = store.list_accounts("db1")
    assert (listed.template_role, listed.cleanup_after_seconds) == ("app_reader", 86400)
    with pytest.raises(InvalidRequest, match="is ephemeral: it has no password"):
        store.reveal_password("db1", "eph")
    with pytest.raises(AlreadyExists):
        store.add_ephemeral_account("db1", "eph", "app_reader", None)
    with pytest.raises(InvalidRequest, match="plain role name"):
        store.add_ephemeral_account("db1", "bad", 'x"; DROP ROLE y', None)
    with pytest.raises(InvalidRequest, match="between"):
        store.add_ephemeral_account("db1", "bad", "app_reader", 0)
    with pytest.raises(NotFound):
        store.add_ephemeral_account("nope", "eph", "app_reader", None)
    # The other accounts' passwords are still read as before.
    store.add_account("db1", "ro", "app_ro", "pw-" + secrets.token_hex(4))
    assert store.get_account("db1", "ro").template_role is None


def test_a_session_of_an_ephemeral_account_is_named_after_its_own_role(
    store: Store, raw: Engine, clock: FakeClock
) -> None:
    store.add_ephemeral_account("db1", "eph", "app_reader", None)
    session_id = open_session(store, clock)
    session = store.get_session(session_id)
    assert session.username == f"pam_alice_example_com_{session_id[:8]}"
    # The name is sealed with the other start fields: an edit of it shows.
    assert store.verify_audit(session_id) == []
    with raw.begin() as conn:
        conn.execute(
            text("UPDATE sessions SET username = 'app_owner' WHERE id = :id"), {"id": session_id}
        )
    [problem] = store.verify_audit(session_id)
    assert "username no longer matches what was sealed" in problem.detail


def test_a_grant_role_is_due_only_once_its_grant_ended(store: Store, clock: FakeClock) -> None:
    store.add_ephemeral_account("db1", "eph", "app_reader", 3600)
    session_id = open_session(store, clock)
    recorded = store.record_ephemeral_role(
        "pam_alice_x",
        resource="db1",
        account="eph",
        session_id=session_id,
        cleanup_after_seconds=3600,
    )
    assert store.ephemeral_roles_due(clock.now) == []
    [live] = store.unfinished_ephemeral_roles("db1")
    assert (live.id, live.session_ended_at) == (recorded.id, None)

    ended = store.end_session(session_id, reason=SessionEndReason.EXPIRED)
    [due] = store.ephemeral_roles_due(clock.now)
    assert due.session_ended_at == ended.ended_at
    assert due.due_at() == ended.ended_at + timedelta(hours=1)

    # Disabled now, looked at again when the drop is due.
    drop_after = clock.now + timedelta(hours=1)
    store.ephemeral_role_disabled(due.id, at=clock.now, drop_after=drop_after)
    assert store.ephemeral_roles_due(clock.now) == []
    [waiting] = store.ephemeral_roles_due(drop_after)
    assert (waiting.disabled_at, waiting.drop_after) == (clock.now, drop_after)

    # A failure waits for its retry, counting.
    store.ephemeral_role_failed(due.id, error="boom\x00", retry_at=drop_after + timedelta(1))
    assert store.ephemeral_roles_due(drop_after) == []
    [retried] = store.ephemeral_roles_due(drop_after + timedelta(2))
    assert (retried.attempts, retried.last_error) == (1, "boom\ufffd")

    store.ephemeral_role_finished(due.id, outcome="dropped", at=clock.now)
    assert store.unfinished_ephemeral_roles() == []
    assert store.ephemeral_roles_due(drop_after + timedelta(2)) == []
    with pytest.raises(NotFound):
        store.ephemeral_role_finished(due.id, outcome="gone", at=clock.now)
    with pytest.raises(NotFound):
        store.ephemeral_role_failed(due.id, error="late", retry_at=clock.now)


def test_a_grant_role_whose_session_is_unknown_is_due_now(store: Store, clock: FakeClock) -> None:
    store.record_ephemeral_role(
        "pam_ghost_1",
        resource="db1",
        account="eph",
        session_id="f" * 32,
        cleanup_after_seconds=None,
    )
    [due] = store.ephemeral_roles_due(clock.now)
    assert (due.role, due.session_ended_at, due.due_at()) == ("pam_ghost_1", clock.now, clock.now)


def test_the_reassign_owner_is_a_plain_role_name_or_none(store: Store) -> None:
    assert store.reassign_owner("db1") is None
    assert store.set_reassign_owner("db1", "app_owner").reassign_to == "app_owner"
    assert store.reassign_owner("db1") == "app_owner"
    assert store.get_resource("db1").reassign_to == "app_owner"
    with pytest.raises(InvalidRequest):
        store.set_reassign_owner("db1", "App Owner")
    assert store.set_reassign_owner("db1", None).reassign_to is None

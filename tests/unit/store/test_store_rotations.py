"""Rotation's state in the store, on a SQLite file and a real PostgreSQL: the
rotation role, a rotation in flight (one at a time, promoted or dropped with its
record in one transaction), typed passwords, managed accounts, and the
append-only record that never holds a password."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, select, text, update
from sqlalchemy.exc import DBAPIError
from store_support import T0, FakeClock, pg_admin_url

from gateway.credentials.secretbox import SecretBox, SecretDecryptError
from gateway.errors import InvalidRequest, NotFound
from gateway.store import Store
from gateway.store.schema import accounts, resources, rotations

PASSWORD = "pw-typed-" + secrets.token_hex(8)
NEW = "pw-new-" + secrets.token_hex(8)


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, SecretBox(secrets.token_bytes(32)), clock=clock) as opened:
        opened.add_resource("db1", "db.example.com", 5432, "app")
        opened.add_account("db1", "ro", "app_reader", PASSWORD)
        yield opened


@pytest.fixture
def raw(store_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_admin_url(store_url) if "postgresql" in store_url else store_url)
    yield engine
    engine.dispose()


def begin(store: Store, rotation_id: str = "r" * 32, password: str = NEW) -> None:
    store.begin_rotation(
        "db1", "ro", password, rotation_id=rotation_id, via="self", started_by="alice"
    )


def every_value(raw: Engine) -> bytes:
    """Every column of every row of the tables rotation writes, as bytes."""
    found = b""
    with raw.connect() as conn:
        for table in (accounts, resources, rotations):
            for row in conn.execute(select(table)):
                found += b"|".join(
                    v if isinstance(v, bytes) else str(v).encode() for v in row if v is not None
                )
    return found


def test_a_rotation_role_is_stored_sealed_and_cleared(store: Store, raw: Engine) -> None:
    assert store.reveal_rotation_credential("db1") is None
    rotator_password = "pw-rotator-" + secrets.token_hex(8)
    shown = store.set_rotation_credential("db1", "pam_rotator", rotator_password)
    assert shown.rotation_username == "pam_rotator"
    assert store.get_resource("db1").rotation_username == "pam_rotator"
    assert store.reveal_rotation_credential("db1") == ("pam_rotator", rotator_password)
    assert rotator_password.encode() not in every_value(raw)
    assert store.clear_rotation_credential("db1").rotation_username is None
    assert store.reveal_rotation_credential("db1") is None
    with pytest.raises(NotFound):
        store.set_rotation_credential("nope", "u", "p")


def test_a_rotation_promoted_makes_the_pending_password_the_stored_one(
    store: Store, raw: Engine, clock: FakeClock
) -> None:
    begin(store)
    assert store.get_account("db1", "ro").rotation_pending is True
    assert store.reveal_password("db1", "ro") == PASSWORD
    assert store.reveal_pending_password("db1", "ro") == NEW
    [pending] = store.pending_rotations()
    assert (pending.resource, pending.account, pending.via, pending.started_by) == (
        "db1",
        "ro",
        "self",
        "alice",
    )
    assert NEW.encode() not in every_value(raw)

    clock.advance(5)
    entry = store.finish_rotation("db1", "ro", "r" * 32, promote=True, outcome="rotated")
    assert (entry.outcome, entry.method, entry.via, entry.started_at, entry.ended_at) == (
        "rotated",
        "generated",
        "self",
        T0,
        clock.now,
    )
    assert store.reveal_password("db1", "ro") == NEW
    assert store.reveal_pending_password("db1", "ro") is None
    assert store.pending_rotations() == []
    account = store.get_account("db1", "ro")
    assert (account.password_updated_at, account.rotation_pending) == (clock.now, False)
    assert (account.last_rotation_at, account.last_rotation_outcome) == (clock.now, "rotated")
    assert [e.outcome for e in store.rotations("db1", "ro")] == ["rotated"]
    assert NEW.encode() not in every_value(raw)


def test_a_rotation_dropped_keeps_the_stored_password(store: Store) -> None:
    begin(store)
    entry = store.finish_rotation(
        "db1", "ro", "r" * 32, promote=False, outcome="rolled_back", detail="no login"
    )
    assert (entry.outcome, entry.detail, entry.ok) == ("rolled_back", "no login", False)
    assert store.reveal_password("db1", "ro") == PASSWORD
    assert store.reveal_pending_password("db1", "ro") is None
    assert store.list_accounts()[0].last_rotation_outcome == "rolled_back"


def test_one_rotation_in_flight_at_a_time_and_only_its_own_id_ends_it(store: Store) -> None:
    begin(store)
    with pytest.raises(InvalidRequest, match="unfinished"):
        begin(store, rotation_id="s" * 32)
    with pytest.raises(InvalidRequest, match="not in flight"):
        store.finish_rotation("db1", "ro", "s" * 32, promote=True, outcome="rotated")
    assert store.reveal_pending_password("db1", "ro") == NEW


def test_a_pending_password_is_bound_to_its_account_and_purpose(store: Store, raw: Engine) -> None:
    store.add_account("db1", "rw", "app_writer", PASSWORD)
    begin(store)
    with raw.begin() as conn:
        ids = dict(conn.execute(select(accounts.c.name, accounts.c.id)).all())
        pending = conn.execute(
            select(accounts.c.pending_ciphertext).where(accounts.c.id == ids["ro"])
        ).scalar_one()
        # Copied over the current password of its own account, or onto another's.
        conn.execute(
            update(accounts).where(accounts.c.id == ids["ro"]).values(password_ciphertext=pending)
        )
        conn.execute(
            update(accounts).where(accounts.c.id == ids["rw"]).values(pending_ciphertext=pending)
        )
    with pytest.raises(SecretDecryptError):
        store.reveal_password("db1", "ro")
    with pytest.raises(SecretDecryptError):
        store.reveal_pending_password("db1", "rw")


def test_a_failure_that_changed_nothing_is_recorded(store: Store) -> None:
    entry = store.record_rotation(
        "db1",
        "ro",
        rotation_id="f" * 32,
        method="generated",
        via="rotator",
        started_by="scheduler",
        started_at=T0,
        outcome="failed",
        detail="the rotation role could not sign in\x00",
    )
    assert entry.detail == "the rotation role could not sign in\ufffd"
    assert store.reveal_password("db1", "ro") == PASSWORD
    [listed] = store.rotations()
    assert (listed.started_by, listed.via, listed.outcome) == ("scheduler", "rotator", "failed")
    with pytest.raises(InvalidRequest, match="outcome"):
        store.record_rotation(
            "db1",
            "ro",
            rotation_id="f" * 32,
            method="generated",
            via=None,
            started_by="x",
            started_at=T0,
            outcome="exploded",  # type: ignore[arg-type]
        )


def test_a_typed_password_is_stored_and_recorded_but_not_for_a_managed_account(
    store: Store,
) -> None:
    typed = store.store_typed_password(
        "db1", "ro", "pw-other", rotation_id="t" * 32, started_by="alice"
    )
    assert (typed.last_rotation_outcome, typed.managed) == ("stored", False)
    assert store.reveal_password("db1", "ro") == "pw-other"
    [entry] = store.rotations("db1", "ro")
    assert (entry.method, entry.via, entry.outcome) == ("typed", None, "stored")

    managed = store.add_account("db1", "svc", "svc_user", PASSWORD, managed=True)
    assert managed.managed is True and store.get_account("db1", "svc").managed is True
    with pytest.raises(InvalidRequest, match="managed"):
        store.store_typed_password(
            "db1", "svc", "pw-known", rotation_id="t" * 32, started_by="alice"
        )


def test_a_typed_password_replaces_a_rotation_left_in_flight(store: Store) -> None:
    begin(store)
    store.store_typed_password("db1", "ro", "pw-x", rotation_id="u" * 32, started_by="bob")
    assert (store.reveal_password("db1", "ro"), store.reveal_pending_password("db1", "ro")) == (
        "pw-x",
        None,
    )
    typed, ended = store.rotations("db1", "ro")
    assert (typed.outcome, typed.rotation_id) == ("stored", "u" * 32)
    assert (ended.outcome, ended.rotation_id, ended.started_by, ended.via) == (
        "failed",
        "r" * 32,
        "alice",
        "self",
    )
    assert ended.detail == "a password typed by bob replaced it before it was settled"
    assert store.pending_rotations() == []


def test_the_record_outlives_its_account_and_is_append_only(store: Store, raw: Engine) -> None:
    begin(store)
    store.finish_rotation("db1", "ro", "r" * 32, promote=True, outcome="rotated")
    store.remove_account("db1", "ro")
    assert [(e.resource, e.account, e.username) for e in store.rotations()] == [
        ("db1", "ro", "app_reader")
    ]
    with pytest.raises(DBAPIError, match="append-only"), raw.begin() as conn:
        conn.execute(text("UPDATE rotations SET outcome = 'failed'"))
    with pytest.raises(DBAPIError, match="append-only"), raw.begin() as conn:
        conn.execute(text("DELETE FROM rotations"))


def test_last_rotations_are_per_account(store: Store, clock: FakeClock) -> None:
    store.add_account("db1", "rw", "app_writer", PASSWORD)
    begin(store)
    store.finish_rotation("db1", "ro", "r" * 32, promote=False, outcome="failed")
    clock.advance(60)
    begin(store, rotation_id="s" * 32)
    store.finish_rotation("db1", "ro", "s" * 32, promote=True, outcome="rotated")
    listed = {a.name: a for a in store.list_accounts("db1")}
    assert (listed["ro"].last_rotation_outcome, listed["ro"].last_rotation_at) == (
        "rotated",
        clock.now,
    )
    assert (listed["rw"].last_rotation_outcome, listed["rw"].last_rotation_at) == (None, None)
    assert [e.outcome for e in store.rotations("db1", "ro", limit=1)] == ["rotated"]

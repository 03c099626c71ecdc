"""Tests of gateway.store.Store against a real SQLite file and a real PostgreSQL.

Every backend-neutral test runs on both. The PostgreSQL is a throwaway cluster
started for the test session, or the one ``PAM_TEST_PG_STORE_URL`` names (e.g.
``postgresql+psycopg://postgres@127.0.0.1/pam``). Each test gets its own freshly
created schema in it (via ``search_path``) and drops it afterwards, so the
database may be shared but must allow ``CREATE SCHEMA``.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import Engine, create_engine, select, text, update
from store_support import T0, FakeClock, newest_revision, pg_admin_url

import gateway.store.sessions as sessions_module
from gateway.credentials.secretbox import SecretBox, SecretDecryptError
from gateway.errors import AlreadyExists, ConfigError, InvalidRequest, NotFound
from gateway.reasons import CONNECTION_REASON_AT_SESSION_END
from gateway.store import (
    CONNECTION_END_REASONS,
    SESSION_END_REASONS,
    AccessSession,
    Account,
    ConnectionEnd,
    ConnectionRecord,
    ConnectionStart,
    Store,
    StoreError,
)
from gateway.store.schema import VERSION_TABLE, accounts, metadata

PASSWORD = "pw-canary-" + secrets.token_hex(8)


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(secrets.token_bytes(32))


@pytest.fixture
def store(store_url: str, box: SecretBox, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, box, clock=clock) as opened:
        yield opened


@pytest.fixture
def raw(store_url: str) -> Iterator[Engine]:
    """A plain engine on the same database, to look at and tamper with rows."""
    engine = create_engine(pg_admin_url(store_url) if "postgresql" in store_url else store_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_only(store_url: str) -> None:
    if not store_url.startswith("sqlite"):
        pytest.skip("inspects the SQLite file")


def _add_db(store: Store, name: str = "db1") -> None:
    store.add_resource(name, "db.example.com", 5432, "app")
    store.add_account(name, "ro", "app_reader", PASSWORD)


def _session(store: Store, **overrides: object) -> AccessSession:
    arguments: dict[str, object] = {
        "requester": "alice",
        "resource": "db1",
        "account": "ro",
        "listen_host": "127.0.0.1",
        "expires_at": T0 + timedelta(hours=1),
    }
    arguments.update(overrides)
    return store.create_session(**arguments)  # type: ignore[arg-type]


def _self_signed_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(T0)
        .not_valid_after(T0 + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# -- resources ------------------------------------------------------------------------


def test_resources_round_trip(store: Store) -> None:
    added = store.add_resource("db-b", "db.example.com", 6432, "app", ssl_mode="require")
    store.add_resource("db.a", "10.0.0.1", 5432, "postgres")
    fetched = store.get_resource("db-b")
    assert fetched == added
    assert (fetched.host, fetched.port, fetched.database) == ("db.example.com", 6432, "app")
    assert fetched.ssl_mode == "require"
    assert fetched.ca_cert is None
    assert fetched.created_at == T0
    assert fetched.created_at.tzinfo is UTC
    assert len(fetched.id) == 32
    int(fetched.id, 16)
    assert [r.name for r in store.list_resources()] == ["db-b", "db.a"]
    assert store.get_resource("db.a").ssl_mode == "verify-full"


def test_resources_are_listed_by_name_bytewise(store: Store) -> None:
    for name in ["b", "a_x", "a-x", "a.x", "a0", "ax"]:
        store.add_resource(name, "h", 5432, "d")
    assert [r.name for r in store.list_resources()] == ["a-x", "a.x", "a0", "a_x", "ax", "b"]


def test_a_resource_keeps_its_ca_certificate(store: Store) -> None:
    pem = _self_signed_pem()
    store.add_resource("db1", "h", 5432, "d", ssl_mode="verify-ca", ca_cert=pem)
    assert store.get_resource("db1").ca_cert == pem


def test_a_resource_refuses_a_ca_cert_that_is_not_pem(store: Store) -> None:
    with pytest.raises(InvalidRequest, match="ca_cert is not a PEM-encoded"):
        store.add_resource("db1", "h", 5432, "d", ca_cert="-----BEGIN CERTIFICATE-----\nxx\n")
    with pytest.raises(NotFound):
        store.get_resource("db1")


def test_adding_a_resource_twice_is_already_exists(store: Store) -> None:
    store.add_resource("db1", "h", 5432, "d")
    with pytest.raises(AlreadyExists, match="resource 'db1' already exists"):
        store.add_resource("db1", "other", 5433, "e")
    assert store.get_resource("db1").host == "h"


def test_a_missing_resource_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="resource 'nope' not found"):
        store.get_resource("nope")
    with pytest.raises(NotFound, match="resource 'nope' not found"):
        store.remove_resource("nope")
    with pytest.raises(NotFound, match="resource 'nope' not found"):
        store.list_accounts("nope")


@pytest.mark.parametrize("name", ["a", "0", "db-1.prod_x", "a" * 63])
def test_valid_names_are_accepted(store: Store, name: str) -> None:
    store.add_resource(name, "h", 5432, "d")
    store.add_account(name, name, "u", PASSWORD)
    assert store.get_account(name, name).name == name


@pytest.mark.parametrize(
    "name", ["", "A", "Db", "-x", "_x", ".x", "a" * 64, "a b", "a/b", "ä", "a\n", " a"]
)
def test_invalid_names_are_refused(store: Store, name: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid resource name"):
        store.add_resource(name, "h", 5432, "d")
    store.add_resource("ok", "h", 5432, "d")
    with pytest.raises(InvalidRequest, match="invalid account name"):
        store.add_account("ok", name, "u", PASSWORD)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"port": 0}, "port must be an integer from 1 to 65535"),
        ({"port": 65536}, "port must be an integer from 1 to 65535"),
        ({"port": True}, "port must be an integer"),
        ({"ssl_mode": "allow"}, "invalid ssl_mode 'allow'"),
        ({"host": ""}, "host must not be empty"),
        ({"host": "  "}, "host must not be empty"),
        ({"database": ""}, "database must not be empty"),
        ({"database": "a\x00b"}, "database must not contain a NUL"),
    ],
)
def test_invalid_resource_fields_are_refused(
    store: Store, arguments: dict[str, object], message: str
) -> None:
    fields: dict[str, object] = {"name": "db1", "host": "h", "port": 5432, "database": "d"}
    fields.update(arguments)
    with pytest.raises(InvalidRequest, match=message):
        store.add_resource(**fields)  # type: ignore[arg-type]
    assert store.list_resources() == []


def test_remove_resource_deletes_its_accounts(store: Store) -> None:
    _add_db(store)
    store.add_account("db1", "rw", "app_writer", PASSWORD)
    _add_db(store, "db2")
    store.remove_resource("db1")
    with pytest.raises(NotFound):
        store.get_resource("db1")
    assert [(a.resource_name, a.name) for a in store.list_accounts()] == [("db2", "ro")]
    # The name is free again, and so are its account names.
    _add_db(store)
    assert store.reveal_password("db1", "ro") == PASSWORD


def test_remove_resource_is_refused_while_a_session_is_active(store: Store) -> None:
    _add_db(store)
    session = _session(store)
    with pytest.raises(InvalidRequest, match="resource 'db1' has 1 active session"):
        store.remove_resource("db1")
    with pytest.raises(InvalidRequest, match="account 'ro' on resource 'db1' has 1 active"):
        store.remove_account("db1", "ro")
    assert store.get_account("db1", "ro").username == "app_reader"
    store.end_session(session.id, reason="client_ended")
    store.remove_resource("db1")
    assert store.list_accounts() == []
    # The ended session stays in the audit trail.
    assert store.get_session(session.id).resource_name == "db1"


# -- accounts ---------------------------------------------------------------------------


def test_accounts_round_trip_without_their_password(store: Store, clock: FakeClock) -> None:
    store.add_resource("db2", "h", 5432, "d")
    store.add_resource("db1", "h", 5432, "d")
    clock.advance(5)
    added = store.add_account("db1", "rw", "app_writer", PASSWORD)
    store.add_account("db1", "ro", "app_reader", PASSWORD)
    store.add_account("db2", "ro", "other_reader", PASSWORD)
    fetched = store.get_account("db1", "rw")
    assert fetched == added
    assert fetched.resource_id == store.get_resource("db1").id
    assert (fetched.resource_name, fetched.name, fetched.username) == ("db1", "rw", "app_writer")
    assert fetched.created_at == fetched.password_updated_at == T0 + timedelta(seconds=5)
    assert "password" not in Account.model_fields
    assert PASSWORD not in fetched.model_dump_json()
    assert PASSWORD not in repr(fetched)
    assert [(a.resource_name, a.name) for a in store.list_accounts()] == [
        ("db1", "ro"),
        ("db1", "rw"),
        ("db2", "ro"),
    ]
    assert [a.username for a in store.list_accounts("db2")] == ["other_reader"]


def test_reveal_password_decrypts_what_was_stored(store: Store) -> None:
    store.add_resource("db1", "h", 5432, "d")
    store.add_account("db1", "ro", "u", "pässwörd with spaces ✓")
    assert store.reveal_password("db1", "ro") == "pässwörd with spaces ✓"


def test_adding_an_account_twice_is_already_exists(store: Store) -> None:
    _add_db(store)
    store.add_resource("db2", "h", 5432, "d")
    with pytest.raises(AlreadyExists, match="account 'ro' already exists on resource 'db1'"):
        store.add_account("db1", "ro", "someone", "other")
    store.add_account("db2", "ro", "someone", "other")
    assert store.reveal_password("db1", "ro") == PASSWORD


def test_a_missing_account_or_resource_is_named_in_not_found(store: Store) -> None:
    store.add_resource("db1", "h", 5432, "d")
    with pytest.raises(NotFound, match="account 'x' not found on resource 'db1'"):
        store.get_account("db1", "x")
    with pytest.raises(NotFound, match="resource 'db9' not found"):
        store.get_account("db9", "x")
    with pytest.raises(NotFound, match="resource 'db9' not found"):
        store.add_account("db9", "ro", "u", PASSWORD)
    with pytest.raises(NotFound):
        store.reveal_password("db1", "x")
    with pytest.raises(NotFound):
        store.rotate_password("db1", "x", PASSWORD)
    with pytest.raises(NotFound):
        store.remove_account("db1", "x")


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [
        # Fixed ids: the password is random per process, and pytest-xdist needs
        # every worker to collect the same test names.
        pytest.param("", PASSWORD, "username must not be empty", id="empty-username"),
        pytest.param("u", "", "password must be a non-empty string", id="empty-password"),
        pytest.param("u", "a\x00" + PASSWORD, "password must not contain a NUL", id="nul-password"),
    ],
)
def test_invalid_account_fields_are_refused_without_echoing_the_password(
    store: Store, username: str, password: str, message: str
) -> None:
    store.add_resource("db1", "h", 5432, "d")
    with pytest.raises(InvalidRequest, match=message) as info:
        store.add_account("db1", "ro", username, password)
    assert PASSWORD not in str(info.value)
    assert store.list_accounts() == []


def test_errors_about_an_account_never_contain_its_password(store: Store) -> None:
    _add_db(store)
    with pytest.raises(AlreadyExists) as info:
        store.add_account("db1", "ro", "u", PASSWORD)
    assert PASSWORD not in str(info.value)
    with pytest.raises(InvalidRequest) as bad_name:
        store.add_account("db1", "Bad Name", "u", PASSWORD)
    assert PASSWORD not in str(bad_name.value)


def test_rotate_password_replaces_the_ciphertext(
    store: Store, clock: FakeClock, raw: Engine
) -> None:
    _add_db(store)
    before = store.get_account("db1", "ro")
    with raw.connect() as conn:
        old_blob = conn.execute(select(accounts.c.password_ciphertext)).scalar_one()
    clock.advance(60)
    rotated = store.rotate_password("db1", "ro", "new-" + PASSWORD)
    assert rotated.password_updated_at == T0 + timedelta(seconds=60)
    assert rotated.created_at == before.created_at
    assert rotated == store.get_account("db1", "ro")
    assert store.reveal_password("db1", "ro") == "new-" + PASSWORD
    with raw.connect() as conn:
        new_blob = conn.execute(select(accounts.c.password_ciphertext)).scalar_one()
    assert new_blob != old_blob
    with pytest.raises(InvalidRequest):
        store.rotate_password("db1", "ro", "")


def test_remove_account_deletes_only_that_account(store: Store) -> None:
    _add_db(store)
    store.add_account("db1", "rw", "w", PASSWORD)
    store.remove_account("db1", "ro")
    assert [a.name for a in store.list_accounts("db1")] == ["rw"]
    with pytest.raises(NotFound):
        store.get_account("db1", "ro")


@pytest.mark.usefixtures("sqlite_only")
def test_the_sqlite_files_never_contain_a_password(store: Store, store_url: str) -> None:
    store.add_resource("db1", "h", 5432, "d")
    store.add_account("db1", "ro", "canary_user", PASSWORD)
    rotated = "rotated-" + secrets.token_hex(8)
    store.rotate_password("db1", "ro", rotated)
    assert store.reveal_password("db1", "ro") == rotated
    path = Path(store_url.removeprefix("sqlite:///"))
    files = [path, path.with_name(path.name + "-wal")]
    assert files[1].exists(), "expected WAL mode"
    contents = b"".join(f.read_bytes() for f in files)
    # The files do hold the account (so the search below looks in the right place).
    assert b"canary_user" in contents
    for secret in (PASSWORD, rotated):
        assert secret.encode() not in contents
        assert secret.encode("utf-16-le") not in contents


def test_a_ciphertext_copied_to_another_account_does_not_decrypt(store: Store, raw: Engine) -> None:
    _add_db(store)
    store.add_account("db1", "rw", "w", "other-" + PASSWORD)
    ro = store.get_account("db1", "ro")
    rw = store.get_account("db1", "rw")
    with raw.begin() as conn:
        blob = conn.execute(
            select(accounts.c.password_ciphertext).where(accounts.c.id == ro.id)
        ).scalar_one()
        conn.execute(
            update(accounts).where(accounts.c.id == rw.id).values(password_ciphertext=blob)
        )
    with pytest.raises(SecretDecryptError, match="account 'rw' on resource 'db1'") as info:
        store.reveal_password("db1", "rw")
    assert PASSWORD not in str(info.value)
    assert store.reveal_password("db1", "ro") == PASSWORD


def test_a_tampered_ciphertext_does_not_decrypt(store: Store, raw: Engine) -> None:
    _add_db(store)
    with raw.begin() as conn:
        blob = bytearray(conn.execute(select(accounts.c.password_ciphertext)).scalar_one())
        blob[-1] ^= 0x80
        conn.execute(update(accounts).values(password_ciphertext=bytes(blob)))
    with pytest.raises(SecretDecryptError):
        store.reveal_password("db1", "ro")


def test_another_master_key_cannot_reveal_passwords(store: Store, store_url: str) -> None:
    _add_db(store)
    with Store.open(store_url, SecretBox(secrets.token_bytes(32))) as other:
        assert other.get_account("db1", "ro").username == "app_reader"
        with pytest.raises(SecretDecryptError, match="master key"):
            other.reveal_password("db1", "ro")


# -- sessions ---------------------------------------------------------------------------


def test_create_session_copies_database_and_username(store: Store) -> None:
    _add_db(store)
    session = _session(store)
    assert session.requester == "alice"
    assert (session.resource_name, session.account_name) == ("db1", "ro")
    assert (session.database, session.username) == ("app", "app_reader")
    assert session.listen_host == "127.0.0.1"
    assert session.listen_port is None
    assert session.started_at == T0
    assert session.expires_at == T0 + timedelta(hours=1)
    assert session.ended_at is None
    assert session.end_reason is None
    assert session.duration_seconds is None
    assert session.is_active
    assert store.get_session(session.id) == session


def test_create_session_needs_an_existing_resource_and_account(store: Store) -> None:
    _add_db(store)
    with pytest.raises(NotFound, match="resource 'db9' not found"):
        _session(store, resource="db9")
    with pytest.raises(NotFound, match="account 'rw' not found on resource 'db1'"):
        _session(store, account="rw")
    assert store.list_sessions() == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"requester": ""}, "requester must not be empty"),
        ({"listen_host": ""}, "listen_host must not be empty"),
        ({"expires_at": datetime(2024, 5, 1, 13, 0)}, "expires_at must be a timezone-aware"),
        ({"started_at": datetime(2024, 5, 1, 12, 0)}, "started_at must be a timezone-aware"),
        ({"expires_at": T0}, "expires_at must be later than started_at"),
    ],
)
def test_invalid_session_fields_are_refused(
    store: Store, overrides: dict[str, object], message: str
) -> None:
    _add_db(store)
    with pytest.raises(InvalidRequest, match=message):
        _session(store, **overrides)


def test_session_timestamps_round_trip_exactly_in_utc(store: Store) -> None:
    _add_db(store)
    india = timezone(timedelta(hours=5, minutes=30))
    started = datetime(2024, 5, 1, 17, 30, 0, 1, tzinfo=india)
    session = _session(
        store, started_at=started, expires_at=started + timedelta(minutes=30, microseconds=7)
    )
    fetched = store.get_session(session.id)
    assert fetched.started_at == started
    assert fetched.started_at.tzinfo is UTC
    assert fetched.started_at.utcoffset() == timedelta(0)
    assert fetched.started_at.microsecond == 1
    assert fetched.expires_at - fetched.started_at == timedelta(minutes=30, microseconds=7)


def test_sessions_are_listed_newest_first_by_instant(store: Store) -> None:
    _add_db(store)
    plus_five = timezone(timedelta(hours=5))
    # 10:00+05:00 is 05:00 UTC: older than 06:00 UTC, although "10" > "06".
    older = _session(store, started_at=datetime(2024, 5, 1, 10, 0, tzinfo=plus_five))
    newer = _session(store, started_at=datetime(2024, 5, 1, 6, 0, tzinfo=UTC))
    newest = _session(store, started_at=datetime(2024, 5, 1, 6, 0, 0, 1, tzinfo=UTC))
    store.end_session(newest.id, reason="expired")
    assert [s.id for s in store.list_sessions()] == [newest.id, newer.id, older.id]
    assert [s.id for s in store.list_sessions(limit=2)] == [newest.id, newer.id]
    assert [s.id for s in store.list_sessions(active=True)] == [newer.id, older.id]
    assert [s.id for s in store.list_sessions(active=False)] == [newest.id]
    with pytest.raises(InvalidRequest, match="limit"):
        store.list_sessions(limit=0)


def test_set_session_port_is_recorded(store: Store) -> None:
    _add_db(store)
    session = _session(store)
    store.set_session_port(session.id, 54321)
    assert store.get_session(session.id).listen_port == 54321
    with pytest.raises(InvalidRequest, match="port"):
        store.set_session_port(session.id, 0)
    with pytest.raises(NotFound):
        store.set_session_port("0" * 32, 5432)


def test_end_session_is_idempotent(store: Store, clock: FakeClock) -> None:
    _add_db(store)
    session = _session(store)
    clock.advance(90.5)
    ended = store.end_session(session.id, reason="client_ended", detail="pam session end")
    assert ended.ended_at == T0 + timedelta(seconds=90.5)
    assert ended.end_reason == "client_ended"
    assert ended.end_detail == "pam session end"
    assert ended.duration_seconds == 90.5
    assert not ended.is_active
    clock.advance(10)
    again = store.end_session(session.id, reason="expired")
    assert again == ended
    assert store.get_session(session.id) == ended


@pytest.mark.parametrize(
    ("session_reason", "connection_reason"),
    [
        ("client_ended", "session_ended"),
        ("expired", "expired"),
        ("gateway_shutdown", "gateway_shutdown"),
        ("error", "error"),
        ("gateway_crash", "gateway_crash"),
    ],
)
def test_end_session_ends_the_connections_still_open_with_it(
    store: Store, clock: FakeClock, session_reason: str, connection_reason: str
) -> None:
    _add_db(store)
    session = _session(store)
    other = _session(store)
    left_open = store.create_connection(session.id, client_addr="127.0.0.1:1")
    closed = store.end_connection(
        store.create_connection(session.id, client_addr="127.0.0.1:2").id,
        reason="client_closed",
        bytes_from_client=10,
        bytes_from_server=20,
    )
    elsewhere = store.create_connection(other.id, client_addr="127.0.0.1:3")
    clock.advance(42)
    ended = store.end_session(session.id, reason=session_reason)
    by_id = {c.id: c for c in store.list_connections(session.id)}
    assert by_id[closed.id] == closed
    forced = by_id[left_open.id]
    assert (forced.end_reason, forced.ended_at) == (connection_reason, ended.ended_at)
    assert (forced.bytes_from_client, forced.bytes_from_server) == (0, 0)
    assert forced.error_sqlstate is None and forced.error_message is None
    # The other session's connection is not touched.
    assert store.list_connections(other.id) == [elsewhere]
    # A late end from the connection's handler changes nothing.
    clock.advance(1)
    late = store.end_connection(
        left_open.id, reason="client_closed", bytes_from_client=5, bytes_from_server=6
    )
    assert late == forced


def test_every_session_end_reason_has_a_connection_end_reason() -> None:
    mapping = CONNECTION_REASON_AT_SESSION_END
    assert set(mapping) == SESSION_END_REASONS
    assert set(mapping.values()) <= CONNECTION_END_REASONS


def test_end_session_with_an_explicit_time(store: Store) -> None:
    _add_db(store)
    session = _session(store)
    ended = store.end_session(
        session.id, reason="expired", ended_at=session.expires_at.astimezone(timezone.min)
    )
    assert ended.ended_at == session.expires_at
    assert ended.duration_seconds == 3600.0


def test_end_session_refuses_unknown_reasons_and_sessions(store: Store) -> None:
    _add_db(store)
    session = _session(store)
    with pytest.raises(InvalidRequest, match="invalid session end reason 'bored'"):
        store.end_session(session.id, reason="bored")
    with pytest.raises(InvalidRequest, match="invalid session end reason 'client_closed'"):
        store.end_session(session.id, reason="client_closed")
    with pytest.raises(NotFound, match=f"session '{'f' * 32}' not found"):
        store.end_session("f" * 32, reason="expired")
    assert store.get_session(session.id).is_active


def test_get_session_accepts_a_unique_prefix(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _add_db(store)
    one, two = ("abcdef" + "0" * 25 + c for c in "12")
    three = "123456" + "0" * 26
    ids = iter([one, two, three])
    monkeypatch.setattr(sessions_module, "new_id", lambda: next(ids))
    first = _session(store)
    second = _session(store)
    third = _session(store)
    assert store.get_session("123456") == third
    assert store.get_session("1234560") == third
    assert store.get_session(two.upper()) == second
    assert store.get_session(f" {one} ") == first
    with pytest.raises(InvalidRequest, match="matches more than one session"):
        store.get_session("abcdef")
    with pytest.raises(InvalidRequest, match="at least 6 characters"):
        store.get_session("12345")
    with pytest.raises(NotFound):
        store.get_session("654321")
    with pytest.raises(NotFound):
        store.get_session("12345%")
    with pytest.raises(NotFound):
        store.get_session("")


def test_close_orphans_ends_sessions_of_no_gateway_now_with_their_connections(
    store: Store, clock: FakeClock
) -> None:
    _add_db(store)
    open_a = _session(store)
    open_b = _session(store)
    done = _session(store)
    conn_a = store.create_connection(open_a.id, client_addr="127.0.0.1:1", application_name="x")
    conn_done = store.create_connection(open_a.id, client_addr="127.0.0.1:2")
    store.end_connection(
        conn_done.id, reason="client_closed", bytes_from_client=10, bytes_from_server=20
    )
    done_ended = store.end_session(done.id, reason="client_ended")
    clock.advance(30)
    assert store.close_orphans("gw-restarting") == 2
    for session_id in (open_a.id, open_b.id):
        session = store.get_session(session_id)
        assert session.end_reason == "gateway_crash"
        assert session.ended_at == T0 + timedelta(seconds=30)
    assert store.get_session(done.id) == done_ended
    by_id = {c.id: c for c in store.list_connections(open_a.id)}
    assert by_id[conn_a.id].end_reason == "gateway_crash"
    assert by_id[conn_a.id].ended_at == T0 + timedelta(seconds=30)
    assert by_id[conn_done.id].end_reason == "client_closed"
    assert by_id[conn_done.id].bytes_from_server == 20
    assert store.close_orphans("gw-restarting") == 0
    with pytest.raises(InvalidRequest):
        store.close_orphans("")


# -- connections --------------------------------------------------------------------------


def test_connections_round_trip(store: Store, clock: FakeClock) -> None:
    _add_db(store)
    session = _session(store)
    first = store.create_connection(
        session.id, client_addr="127.0.0.1:50000", application_name="psql", backend_pid=4242
    )
    clock.advance(1)
    second = store.create_connection(session.id, client_addr="[::1]:50001", application_name=None)
    assert first.started_at == T0
    assert first.backend_pid == 4242 and second.backend_pid is None
    assert first.bytes_from_client == first.bytes_from_server == 0
    assert first.ended_at is None and first.duration_seconds is None
    clock.advance(2.25)
    ended = store.end_connection(
        first.id,
        reason="error",
        bytes_from_client=123,
        bytes_from_server=2**40,
        error_sqlstate="57P01",
        error_message="terminating connection due to administrator command",
    )
    assert ended.backend_pid == 4242
    assert ended.ended_at == T0 + timedelta(seconds=3.25)
    assert ended.duration_seconds == 3.25
    assert (ended.bytes_from_client, ended.bytes_from_server) == (123, 2**40)
    assert (ended.end_reason, ended.error_sqlstate) == ("error", "57P01")
    assert ended.error_message == "terminating connection due to administrator command"
    assert store.list_connections(session.id) == [ended, second]


def test_end_connection_is_idempotent(store: Store, clock: FakeClock) -> None:
    _add_db(store)
    session = _session(store)
    record = store.create_connection(session.id, client_addr="127.0.0.1:1")
    ended = store.end_connection(
        record.id, reason="client_closed", bytes_from_client=1, bytes_from_server=2
    )
    clock.advance(5)
    again = store.end_connection(
        record.id, reason="session_ended", bytes_from_client=100, bytes_from_server=200
    )
    assert again == ended


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"reason": "client_ended"}, "invalid connection end reason"),
        ({"bytes_from_client": -1}, "bytes_from_client must be a non-negative integer"),
        ({"error_sqlstate": "5701"}, "error_sqlstate must be a 5-character SQLSTATE"),
    ],
)
def test_end_connection_refuses_invalid_fields(
    store: Store, arguments: dict[str, object], message: str
) -> None:
    _add_db(store)
    record = store.create_connection(_session(store).id, client_addr="127.0.0.1:1")
    fields: dict[str, object] = {
        "reason": "client_closed",
        "bytes_from_client": 0,
        "bytes_from_server": 0,
    }
    fields.update(arguments)
    with pytest.raises(InvalidRequest, match=message):
        store.end_connection(record.id, **fields)  # type: ignore[arg-type]


def test_connections_need_an_active_session(store: Store) -> None:
    _add_db(store)
    session = _session(store)
    with pytest.raises(NotFound):
        store.create_connection("0" * 32, client_addr="127.0.0.1:1")
    with pytest.raises(NotFound):
        store.list_connections("0" * 32)
    with pytest.raises(NotFound):
        store.end_connection("0" * 32, reason="error", bytes_from_client=0, bytes_from_server=0)
    store.end_session(session.id, reason="expired")
    with pytest.raises(InvalidRequest, match="has ended"):
        store.create_connection(session.id, client_addr="127.0.0.1:1")


def test_a_group_of_connection_changes_commits_together_and_refuses_only_the_bad_ones(
    store: Store, clock: FakeClock
) -> None:
    _add_db(store)
    session, ended = _session(store), _session(store)
    store.end_session(ended.id, reason="expired")
    first = store.create_connection(session.id, client_addr="127.0.0.1:1")
    results = store.record_connections(
        [
            ConnectionStart(session.id, "127.0.0.1:2", "psql", 42),
            ConnectionEnd(first.id, "client_closed", 10, 20),
            ConnectionStart(ended.id, "127.0.0.1:3"),
            ConnectionEnd("0" * 32, "client_closed", 0, 0),
            ConnectionStart(session.id, "", None),
            ConnectionEnd(first.id, "error", 99, 99),
        ]
    )
    started, ended_first, on_ended, unknown, blank, again = results
    assert isinstance(started, ConnectionRecord) and started.backend_pid == 42
    assert ended_first is None and again is None
    assert isinstance(on_ended, InvalidRequest) and "has ended" in on_ended.message
    assert isinstance(unknown, NotFound)
    assert isinstance(blank, InvalidRequest) and "client_addr" in blank.message
    by_id = {c.id: c for c in store.list_connections(session.id)}
    assert set(by_id) == {first.id, started.id}
    # The first end wins; the later one in the same group changes nothing.
    closed = by_id[first.id]
    assert (closed.end_reason, closed.bytes_from_client, closed.ended_at) == (
        "client_closed",
        10,
        clock.now,
    )
    assert by_id[started.id].ended_at is None
    assert store.list_connections(ended.id) == []


def test_a_connection_record_refuses_a_bad_backend_pid_and_keeps_a_given_start(
    store: Store,
) -> None:
    _add_db(store)
    session = _session(store)
    for bad in (-1, True, "42"):
        with pytest.raises(InvalidRequest, match="backend_pid"):
            store.create_connection(session.id, client_addr="127.0.0.1:1", backend_pid=bad)  # type: ignore[arg-type]
    assert store.list_connections(session.id) == []
    started = T0 - timedelta(milliseconds=3)
    record = store.create_connection(
        session.id, client_addr="127.0.0.1:1", backend_pid=0, started_at=started
    )
    assert (record.backend_pid, record.started_at) == (0, started)
    assert store.list_connections(session.id) == [record]


def test_concurrent_calls_from_worker_threads(store: Store) -> None:
    _add_db(store)
    session = _session(store)

    def connect_and_close(n: int) -> None:
        record = store.create_connection(session.id, client_addr=f"127.0.0.1:{n}", backend_pid=n)
        store.end_connection(
            record.id, reason="client_closed", bytes_from_client=n, bytes_from_server=n
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(connect_and_close, range(1, 65)))
    records = store.list_connections(session.id)
    assert sorted(r.backend_pid or 0 for r in records) == list(range(1, 65))
    assert all(r.end_reason == "client_closed" for r in records)


@pytest.mark.usefixtures("sqlite_only")
def test_two_stores_on_one_sqlite_file_wait_for_each_other(
    store: Store, store_url: str, box: SecretBox
) -> None:
    errors: list[BaseException] = []

    def add_many(target: Store, prefix: str) -> None:
        try:
            for n in range(25):
                target.add_resource(f"{prefix}{n}", "h", 5432, "d")
                target.list_resources()
        except BaseException as exc:
            errors.append(exc)

    with Store.open(store_url, box) as other:
        threads = [
            threading.Thread(target=add_many, args=(store, "a")),
            threading.Thread(target=add_many, args=(other, "b")),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert len(store.list_resources()) == 50


# -- opening, schema, lifecycle ----------------------------------------------------------


def test_reopening_an_existing_store_is_idempotent(
    store_url: str, box: SecretBox, clock: FakeClock, raw: Engine
) -> None:
    with Store.open(store_url, box, clock=clock) as first:
        _add_db(first)
        session = _session(first)
    for _ in range(2):
        with Store.open(store_url, box, clock=clock) as again:
            assert again.reveal_password("db1", "ro") == PASSWORD
            assert again.get_session(session.id) == session
    with raw.connect() as conn:
        revisions = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
    assert [r[0] for r in revisions] == [newest_revision()]


def test_the_migrated_schema_matches_the_table_definitions(store: Store, raw: Engine) -> None:
    with raw.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        assert context.get_current_revision() == newest_revision()
        assert compare_metadata(context, metadata) == []


@pytest.mark.usefixtures("sqlite_only")
def test_sqlite_runs_in_wal_mode_with_foreign_keys(store: Store, raw: Engine) -> None:
    with raw.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
    with store._engine.connect() as conn:
        assert conn.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar_one() > 0


def test_an_in_memory_sqlite_store_is_shared_across_threads(box: SecretBox) -> None:
    with Store.open("sqlite://", box) as store:
        _add_db(store)
        with ThreadPoolExecutor(max_workers=4) as pool:
            names = list(pool.map(lambda _: store.get_resource("db1").name, range(8)))
    assert names == ["db1"] * 8


def test_a_closed_store_refuses_to_work(store_url: str, box: SecretBox) -> None:
    store = Store.open(store_url, box)
    store.close()
    with pytest.raises(ConfigError, match="closed"):
        store.list_resources()


def test_unsupported_urls_are_refused_without_echoing_a_password(box: SecretBox) -> None:
    with pytest.raises(ConfigError, match="unsupported state store URL") as info:
        Store.open("mysql://user:hunter2secret@db/pam", box)
    assert "hunter2secret" not in str(info.value)
    with pytest.raises(ConfigError, match="invalid state store URL") as bad:
        Store.open("::not a url hunter2secret::", box)
    assert "hunter2secret" not in str(bad.value)


def test_an_unopenable_sqlite_path_is_a_config_error(tmp_path: Path, box: SecretBox) -> None:
    with pytest.raises(ConfigError, match="cannot open the state store"):
        Store.open(f"sqlite:///{tmp_path / 'missing' / 'state.db'}", box)


def test_a_database_from_a_newer_pam_is_refused(
    store: Store, store_url: str, box: SecretBox, raw: Engine
) -> None:
    with raw.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(ConfigError, match="cannot migrate the state store"):
        Store.open(store_url, box)


def test_records_round_trip_through_json(store: Store) -> None:
    _add_db(store)
    session = store.end_session(_session(store).id, reason="expired")
    assert '"duration_seconds":0.0' in session.model_dump_json()
    assert AccessSession.model_validate_json(session.model_dump_json()) == session


@pytest.mark.parametrize(("setting", "pragma"), [("normal", 1), ("full", 2)])
def test_the_sqlite_synchronous_setting_reaches_every_connection(
    tmp_path: Path, box: SecretBox, setting: str, pragma: int
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    with (
        Store.open(url, box, sqlite_synchronous=setting) as store,  # type: ignore[arg-type]
        store._engine.connect() as conn,
    ):
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar_one() == pragma


def test_a_sqlite_store_binds_none_through_a_registered_adapter_as_null(
    tmp_path: Path, box: SecretBox
) -> None:
    # The adapter spares sqlite3 its per-NULL adapter search (see
    # _bind_none_directly); None must still be stored as NULL, not as a value.
    with Store.open(f"sqlite:///{tmp_path / 'state.db'}", box) as store:
        assert (type(None), sqlite3.PrepareProtocol) in sqlite3.adapters
        with store._engine.connect() as conn:
            row = conn.exec_driver_sql("SELECT ? IS NULL, typeof(?)", (None, None)).one()
    assert tuple(row) == (1, "null")


def test_an_unknown_sqlite_synchronous_setting_is_refused(tmp_path: Path, box: SecretBox) -> None:
    with pytest.raises(ConfigError, match="sqlite_synchronous"):
        Store.open(f"sqlite:///{tmp_path / 'state.db'}", box, sqlite_synchronous="off")  # type: ignore[arg-type]
    assert not (tmp_path / "state.db").exists()


def test_a_constraint_the_database_enforces_on_its_own_is_a_store_error(
    store: Store, raw: Engine, sqlite_only: None
) -> None:
    # A trigger (or a constraint added by hand) refusing a write is the store
    # failing, whichever method hit it, not an error the caller could have avoided.
    _add_db(store)
    session = _session(store)
    with raw.begin() as conn:
        for table in ("connections", "sessions"):
            conn.execute(
                text(
                    f"CREATE TRIGGER test_block_{table} BEFORE "
                    f"{'INSERT' if table == 'connections' else 'UPDATE'} ON {table}"
                    " BEGIN SELECT RAISE(ABORT, 'blocked by the test'); END"
                )
            )
    with pytest.raises(StoreError, match="blocked by the test"):
        store.create_connection(session.id, client_addr="127.0.0.1:1")
    with pytest.raises(StoreError, match="blocked by the test"):
        store.end_session(session.id, reason="expired")
    # A duplicate name is still the caller's conflict.
    with pytest.raises(AlreadyExists):
        _add_db(store)

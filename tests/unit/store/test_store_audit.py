"""Tests of the audit trail in gateway.store.Store, on a real SQLite file and PostgreSQL.

Set ``PAM_TEST_PG_STORE_URL`` to run them against PostgreSQL too (see
tests/unit/test_store.py: each test gets its own schema there). Tampering tests
edit the database by hand with raw SQL, the way an intruder with write access
would, after dropping the append-only triggers.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from store_support import T0, FakeClock, newest_revision, pg_admin_url
from trail_support import append_version_2, drop_triggers, edit_record

import gateway.store.audit as audit_module
import gateway.store.engine as engine_module
from gateway.audit.chain import (
    GENESIS_HASH,
    AuditChain,
    canonical_json,
    derive_audit_key,
    event_fields,
)
from gateway.audit.records import AuditEvent, Parameter, event_rows
from gateway.audit.verify import SessionVerifier
from gateway.credentials.secretbox import SecretBox
from gateway.errors import InvalidRequest, NotFound
from gateway.store import AccessSession, AuditRecord, SessionCounts, Store, StoreError
from gateway.store.connections import ConnectionStart
from gateway.store.schema import VERSION_TABLE

CONN_A = "a" * 32
CONN_B = "b" * 32


@pytest.fixture
def master_key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def box(master_key: bytes) -> SecretBox:
    return SecretBox(master_key)


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


def _add_db(store: Store, name: str = "db1", account: str = "ro") -> None:
    store.add_resource(name, "db.example.com", 5432, "app")
    store.add_account(name, account, "app_reader", "pw-" + secrets.token_hex(8))


def _session(
    store: Store, resource: str = "db1", account: str = "ro", requester: str = "alice"
) -> AccessSession:
    return store.create_session(
        requester=requester,
        resource=resource,
        account=account,
        listen_host="127.0.0.1",
        expires_at=datetime(2100, 1, 1, tzinfo=UTC),
    )


def _stmt(
    session_id: str, sql: str, *, connection_id: str = CONN_A, at: datetime = T0, **extra: Any
) -> AuditEvent:
    fields: dict[str, Any] = {"protocol": "simple", "status": "ok", **extra}
    return AuditEvent(
        session_id=session_id,
        connection_id=connection_id,
        kind="statement",
        occurred_at=at,
        sql=sql,
        **fields,
    )


def _fill(store: Store, session_id: str, count: int = 5) -> None:
    store.append_audit([_stmt(session_id, f"SELECT {n}") for n in range(1, count + 1)])


def _fill_v2(raw: Engine, master_key: bytes, session_id: str, count: int = 5) -> None:
    """A trail of *count* records as chain version 2 wrote them (one row each):
    the tampering tests here check that such trails keep verifying; those of
    version 3 (sealed batches) are in test_store_batches.py."""
    chain = AuditChain(derive_audit_key(master_key))
    append_version_2(raw, chain, [_stmt(session_id, f"SELECT {n}") for n in range(1, count + 1)])


def _tamper(raw: Engine, *statements: str, **params: Any) -> None:
    with raw.begin() as conn:
        drop_triggers(conn)
        for statement in statements:
            conn.execute(text(statement), params)


def _found(problems: list[Any]) -> list[tuple[int | None, str]]:
    return [(p.seq, p.problem) for p in problems]


# -- append and read back ----------------------------------------------------------------


def test_append_and_list_round_trip_every_field(store: Store, clock: FakeClock) -> None:
    _add_db(store)
    session = _session(store)
    clock.now = T0 + timedelta(seconds=5)
    parameters = (
        Parameter(1, 25, "text", "hello"),
        Parameter(2, 17, "binary", "3q2+7w=="),
        Parameter(3, 23, "null", None),
        Parameter(10, 25, "text", "x" * 64, True),
    )
    start = AuditEvent(
        session_id=session.id,
        connection_id=CONN_A,
        kind="connection_start",
        occurred_at=T0,
        detail={"client_addr": "127.0.0.1:5555", "application_name": "psql", "backend_pid": 42},
    )
    statement = AuditEvent(
        session_id=session.id,
        connection_id=CONN_A,
        kind="statement",
        occurred_at=T0 + timedelta(microseconds=1),
        protocol="extended",
        sql="INSERT INTO t VALUES ($1, $2, $3, $10)",
        statement_name="s1",
        portal_name="",
        parameters=parameters,
        command_tag="INSERT 0 1",
        rows=1,
        status="ok",
        duration_ms=1.25,
    )
    failed = AuditEvent(
        session_id=session.id,
        connection_id=CONN_A,
        kind="statement",
        occurred_at=T0 + timedelta(seconds=1),
        protocol="simple",
        sql="COPY t FROM STDIN",
        parameters=(),
        command_tag=None,
        status="error",
        sqlstate="22P02",
        error_message="invalid input syntax",
        duration_ms=3,
        copy_direction="in",
        copy_bytes=2**40,
        rows=None,
        detail={"ratio": 0.5, "note": None},
    )
    assert store.append_audit([start, statement, failed]) == 3

    records = store.list_audit(session.id)
    assert [r.seq for r in records] == [1, 2, 3]
    first, second, third = records
    assert first.kind == "connection_start"
    assert first.detail == {
        "client_addr": "127.0.0.1:5555",
        "application_name": "psql",
        "backend_pid": 42,
    }
    assert first.parameters is None
    assert second.parameters is not None
    assert [(p.index, p.type_oid, p.format, p.value, p.truncated) for p in second.parameters] == [
        (1, 25, "text", "hello", False),
        (2, 17, "binary", "3q2+7w==", False),
        (3, 23, "null", None, False),
        (10, 25, "text", "x" * 64, True),
    ]
    assert (second.sql, second.statement_name, second.portal_name) == (statement.sql, "s1", "")
    assert (second.command_tag, second.rows, second.status) == ("INSERT 0 1", 1, "ok")
    assert second.occurred_at == T0 + timedelta(microseconds=1)
    assert second.duration_ms == 1.25
    assert third.parameters == ()
    assert (third.sqlstate, third.error_message) == ("22P02", "invalid input syntax")
    assert (third.copy_direction, third.copy_bytes, third.duration_ms) == ("in", 2**40, 3.0)
    assert third.detail == {"ratio": 0.5, "note": None}
    for record in records:
        assert record.recorded_at == T0 + timedelta(seconds=5)
        assert (record.resource_name, record.account_name, record.requester) == (
            "db1",
            "ro",
            "alice",
        )
        assert record.session_id == session.id
        assert record.connection_id == CONN_A
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.hash
    assert third.prev_hash == second.hash
    assert AuditRecord.model_validate_json(second.model_dump_json()) == second


def test_numbered_gives_each_written_row_its_seq_in_its_sessions_trail(store: Store) -> None:
    _add_db(store)
    a, b = _session(store).id, _session(store).id
    _fill(store, a, 2)
    rows = event_rows(
        [
            _stmt(a, "A3"),
            _stmt(b, "B1"),
            _stmt(a, "A4"),
            _stmt("no-such-session", "X"),
            _stmt(b, "B2"),
        ]
    )
    numbered: list[tuple[int, int]] = []
    assert store.append_audit_rows(rows, substitute_invalid=True, numbered=numbered) == 4
    assert sorted(numbered) == [(0, 3), (1, 1), (2, 4), (4, 2)]
    stored = {r.sql: r.seq for r in store.list_audit(a) + store.list_audit(b)}
    assert stored == {"SELECT 1": 1, "SELECT 2": 2, "A3": 3, "A4": 4, "B1": 1, "B2": 2}


def test_stored_hashes_are_the_chain_under_the_master_key_derived_key(
    store: Store, master_key: bytes, raw: Engine
) -> None:
    _add_db(store)
    session = _session(store)
    event = _stmt(session.id, "SELECT 'é', $1", parameters=(Parameter(1, 23, "text", "1"),), rows=1)
    append_version_2(raw, AuditChain(derive_audit_key(master_key)), [event])
    (record,) = store.list_audit(session.id)
    # Chain version 2, spelled out byte for byte: the JSON array of version, seq,
    # prev_hash and the stored columns, parameters as the JSON text they are stored as.
    message = (
        f'[2,1,"{GENESIS_HASH}","{session.id}","{CONN_A}","statement",'
        '"2024-05-01T12:00:00.123456+00:00","simple","SELECT \'é\', $1",null,null,'
        '"[{\\"format\\":\\"text\\",\\"index\\":1,\\"truncated\\":false,'
        '\\"type_oid\\":23,\\"value\\":\\"1\\"}]",'
        'null,1,"ok",null,null,null,null,null,null]'
    ).encode()
    key = derive_audit_key(master_key)
    assert record.hash == hmac.new(key, message, hashlib.sha256).hexdigest()
    with raw.connect() as conn:
        version = conn.execute(text("SELECT chain_version FROM audit_events")).scalar_one()
    assert version == 2


def _insert_version_1(raw: Engine, key: bytes, event: AuditEvent, seq: int, prev: str) -> str:
    """Write *event* as the store did before chain version 2 (revision 0002)."""
    fields = event_fields(event)
    digest = AuditChain(key).record_hash(prev, seq, fields)
    with raw.begin() as conn:
        postgres = conn.dialect.name == "postgresql"
        conn.execute(
            text(
                "INSERT INTO audit_events (session_id, connection_id, seq, kind, occurred_at,"
                " recorded_at, protocol, sql, parameters, status, prev_hash, hash)"
                " VALUES (:sid, :cid, :seq, 'statement', :at, :at, 'simple', :sql, :params,"
                " 'ok', :prev, :hash)"
            ),
            {
                "sid": event.session_id,
                "cid": event.connection_id,
                "seq": seq,
                "at": event.occurred_at if postgres else fields["occurred_at"],
                "sql": event.sql,
                "params": canonical_json(fields["parameters"]),
                "prev": prev,
                "hash": digest,
            },
        )
    return digest


def test_a_trail_begun_under_chain_versions_1_and_2_verifies_and_chains_on_in_batches(
    store: Store, master_key: bytes, raw: Engine
) -> None:
    _add_db(store)
    session = _session(store)
    key = derive_audit_key(master_key)
    head = GENESIS_HASH
    for seq in (1, 2):
        old = _stmt(session.id, f"SELECT {seq}", parameters=(Parameter(1, 23, "text", "7"),))
        head = _insert_version_1(raw, key, old, seq, head)
    events = [_stmt(session.id, f"SELECT {seq}") for seq in (3, 4)]
    _, head = append_version_2(raw, AuditChain(key), events, seq=2, prev=head)
    _fill(store, session.id, 2)
    records = store.list_audit(session.id)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[4].prev_hash == head
    assert store.list_audit(session.id, after_seq=3, limit=2)[1].seq == 5
    assert store.count_audit(session.id) == 6
    assert store.verify_audit(session.id) == []
    # Each version's records are checked under their own encoding.
    _tamper(
        raw,
        "UPDATE audit_events SET sql = 'SELECT 99' WHERE session_id = :sid AND seq IN (2, 4)",
        sid=session.id,
    )
    edit_record(raw, session.id, 6, sql="SELECT 99")
    assert _found(store.verify_audit(session.id)) == [
        (2, "changed"),
        (4, "changed"),
        (6, "changed"),
    ]


def test_a_record_whose_chain_version_was_changed_does_not_verify(
    store: Store, raw: Engine, master_key: bytes
) -> None:
    _add_db(store)
    session = _session(store)
    _fill_v2(raw, master_key, session.id, 3)
    update = "UPDATE audit_events SET chain_version = :v WHERE session_id = :sid AND seq = 2"
    _tamper(raw, update, v=1, sid=session.id)
    assert _found(store.verify_audit(session.id)) == [(2, "changed")]
    with raw.begin() as conn:  # the triggers are gone already
        conn.execute(text(update), {"v": 7, "sid": session.id})
    assert _found(store.verify_audit(session.id)) == [(2, "changed")]


def _migrate(store_url: str, revision: str, *, down: bool) -> None:
    config = Config()
    config.set_main_option("script_location", str(engine_module._MIGRATIONS_DIR))
    engine = create_engine(pg_admin_url(store_url) if "postgresql" in store_url else store_url)
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(config, revision)
    finally:
        engine.dispose()


def test_revision_0003_downgrades_only_while_no_version_2_record_exists(
    store_url: str, box: SecretBox, raw: Engine
) -> None:
    with Store.open(store_url, box) as store:
        _add_db(store)
        session = _session(store)
    _migrate(store_url, "0002", down=True)
    _migrate(store_url, "head", down=False)
    with Store.open(store_url, box) as store:
        append_version_2(raw, store._chain, [_stmt(session.id, "SELECT 1")])
        assert store.verify_audit(session.id) == []
    with pytest.raises(RuntimeError, match="chain version 2"):
        _migrate(store_url, "0002", down=True)
    # Still append-only: the column came and went without a table rebuild.
    with pytest.raises(DBAPIError, match="append-only"), raw.begin() as conn:
        conn.execute(text("DELETE FROM audit_events"))


def test_seq_numbers_interleaved_connections_of_one_session(store_url: str, box: SecretBox) -> None:
    with Store.open(store_url, box) as first, Store.open(store_url, box) as second:
        _add_db(first)
        session = _session(first)
        other = _session(first)
        # One batch mixing two connections and two sessions, then batches from a
        # second store (another process) interleaved with the first's.
        first.append_audit(
            [
                _stmt(session.id, "a1", connection_id=CONN_A),
                _stmt(session.id, "b1", connection_id=CONN_B),
                _stmt(other.id, "o1"),
                _stmt(session.id, "a2", connection_id=CONN_A),
            ]
        )
        second.append_audit([_stmt(session.id, "b2", connection_id=CONN_B)])
        first.append_audit([_stmt(session.id, "a3", connection_id=CONN_A)])
        second.append_audit([_stmt(session.id, "b3", connection_id=CONN_B), _stmt(other.id, "o2")])
        records = first.list_audit(session.id)
        assert [(r.seq, r.sql, r.connection_id) for r in records] == [
            (1, "a1", CONN_A),
            (2, "b1", CONN_B),
            (3, "a2", CONN_A),
            (4, "b2", CONN_B),
            (5, "a3", CONN_A),
            (6, "b3", CONN_B),
        ]
        assert [(r.seq, r.sql) for r in second.list_audit(other.id)] == [(1, "o1"), (2, "o2")]
        assert first.verify_audit() == []
        assert second.verify_audit(session.id) == []


def test_concurrent_appends_from_threads_keep_one_chain(store: Store) -> None:
    from concurrent.futures import ThreadPoolExecutor

    _add_db(store)
    session = _session(store)

    def append(worker: int) -> None:
        for n in range(10):
            store.append_audit([_stmt(session.id, f"w{worker} n{n}")] * 3)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(append, range(4)))
    assert store.count_audit(session.id) == 120
    assert [r.seq for r in store.list_audit(session.id)] == list(range(1, 121))
    assert store.verify_audit(session.id) == []


def test_list_audit_pages_and_filters_by_kind(store: Store) -> None:
    _add_db(store)
    session = _session(store)
    start = AuditEvent(session.id, CONN_A, "connection_start", T0)
    end = AuditEvent(session.id, CONN_A, "connection_end", T0, detail={"end_reason": "client"})
    store.append_audit([start, *[_stmt(session.id, f"SELECT {n}") for n in range(5)], end])
    page = store.list_audit(session.id, limit=3)
    assert [r.seq for r in page] == [1, 2, 3]
    page = store.list_audit(session.id, after_seq=page[-1].seq, limit=3)
    assert [r.seq for r in page] == [4, 5, 6]
    assert [r.seq for r in store.list_audit(session.id, after_seq=6)] == [7]
    statements = store.list_audit(session.id, kinds=["statement"])
    assert [r.seq for r in statements] == [2, 3, 4, 5, 6]
    assert [r.kind for r in store.list_audit(session.id, kinds=["connection_end"])] == [
        "connection_end"
    ]
    assert store.count_audit(session.id) == 7
    assert store.count_audit(session.id, kind="statement") == 5
    assert store.count_audit(session.id[:8], kind="connection_start") == 1
    assert [r.seq for r in store.list_audit(session.id[:8], limit=1)] == [1]


def test_audit_reads_refuse_bad_arguments(store: Store) -> None:
    _add_db(store)
    session = _session(store)
    with pytest.raises(InvalidRequest, match="kinds"):
        store.list_audit(session.id, kinds=["query"])
    with pytest.raises(InvalidRequest, match="limit"):
        store.list_audit(session.id, limit=0)
    with pytest.raises(InvalidRequest, match="after_seq"):
        store.list_audit(session.id, after_seq=-1)
    with pytest.raises(InvalidRequest, match="kind"):
        store.count_audit(session.id, kind="query")
    with pytest.raises(NotFound):
        store.list_audit("f" * 32)
    with pytest.raises(NotFound):
        store.count_audit("f" * 32)
    with pytest.raises(NotFound):
        store.verify_audit("f" * 32)


def test_an_unknown_session_refuses_the_whole_batch(store: Store) -> None:
    _add_db(store)
    session = _session(store)
    unknown = "f" * 32
    with pytest.raises(NotFound, match=f"session '{unknown}' not found"):
        store.append_audit([_stmt(session.id, "SELECT 1"), _stmt(unknown, "SELECT 2")])
    assert store.count_audit(session.id) == 0
    assert store.append_audit([_stmt(session.id, "SELECT 3")]) == 1
    assert [(r.seq, r.sql) for r in store.list_audit(session.id)] == [(1, "SELECT 3")]


def _bad_events(session_id: str, secret: str) -> list[tuple[AuditEvent, str]]:
    """Events the store must refuse, each with the start of the message it refuses with."""
    return [
        (_stmt(session_id, secret + "\x00"), "audit event 1 sql"),
        (_stmt(session_id, secret, rows=-1), "audit event 1 rows"),
        (_stmt(session_id, secret, duration_ms=float("nan")), "audit event 1 duration_ms"),
        (_stmt(session_id, secret, sqlstate="bad"), "audit event 1 sqlstate"),
        (_stmt(session_id, secret, at=datetime(2024, 1, 1)), "audit event 1 occurred_at"),
        (
            _stmt(session_id, secret, parameters=(Parameter(0, 25, "text", secret),)),
            "audit event 1 parameter 1 index",
        ),
        (
            _stmt(session_id, "x", parameters=(Parameter(1, 25, "text", secret + "\x00"),)),
            "audit event 1 parameter 1 value",
        ),
        (_stmt(session_id, secret, detail={"k": True}), "audit event 1 detail"),
        (_stmt(session_id, "\ud800" + secret), "audit event 1 holds text that is not valid"),
        (
            AuditEvent(session_id, CONN_A, "query", T0),  # type: ignore[arg-type]
            "audit event 1 kind",
        ),
        (AuditEvent(session_id, "c" * 33, "statement", T0), "audit event 1 connection_id"),
    ]


def test_an_invalid_event_refuses_the_batch_without_echoing_values(store: Store) -> None:
    _add_db(store)
    session = _session(store)
    secret = "canary-" + secrets.token_hex(4)
    for event, message in _bad_events(session.id, secret):
        with pytest.raises(InvalidRequest, match=message) as info:
            store.append_audit([_stmt(session.id, "SELECT 1"), event])
        assert secret not in str(info.value)
    assert store.count_audit(session.id) == 0
    assert store.append_audit([]) == 0


def test_the_writers_mode_records_a_stand_in_for_each_event_it_cannot_take(
    store: Store,
) -> None:
    # A batch the store refuses is refused again on every retry while the
    # sessions wait for room: the audit writer's mode never refuses one.
    _add_db(store)
    session = _session(store)
    secret = "canary-" + secrets.token_hex(4)
    rows = []
    refused_fields = []
    for event, message in _bad_events(session.id, secret):
        if event.occurred_at.tzinfo is None:
            continue  # no EventRow has a naive time: event_rows refuses it first
        rows += event_rows([_stmt(session.id, "SELECT 1"), event])
        field = message.removeprefix("audit event 1 ")
        if not field.startswith("connection_id"):  # that one can't be attributed
            refused_fields.append(field)
    rows += event_rows([_stmt("f" * 32, "SELECT 2")])  # a session the store lacks
    written = store.append_audit_rows(rows, substitute_invalid=True)
    records = store.list_audit(session.id)
    good = [r for r in records if r.status == "ok"]
    stand_ins = [r for r in records if r.status != "ok"]
    assert written == len(records) == len(good) + len(refused_fields)
    assert [r.sql for r in good] == ["SELECT 1"] * 10
    assert len(stand_ins) == len(refused_fields)
    for record, field in zip(stand_ins, refused_fields, strict=True):
        assert record.error_message is not None
        assert record.error_message.startswith(
            f"pam could not record this event as it was: {field}"
        )
        assert (record.kind, record.status, record.sql, record.parameters) == (
            "statement",
            "incomplete",
            None,
            None,
        )
        assert record.occurred_at == T0 and record.connection_id == CONN_A
        assert secret not in record.error_message
    assert store.verify_audit() == []


def test_a_database_failure_is_a_store_error(store: Store, raw: Engine) -> None:
    _add_db(store)
    session = _session(store)
    with raw.begin() as conn:
        conn.execute(text("ALTER TABLE audit_events RENAME TO audit_events_gone"))
    with pytest.raises(StoreError, match="state store error"):
        store.append_audit([_stmt(session.id, "SELECT 1")])


# -- append-only -----------------------------------------------------------------------


def test_triggers_refuse_update_and_delete(store: Store, raw: Engine, master_key: bytes) -> None:
    _add_db(store)
    session = _session(store)
    _fill_v2(raw, master_key, session.id, 2)
    for statement in (
        "UPDATE audit_events SET sql = 'SELECT 0' WHERE seq = 1",
        "DELETE FROM audit_events WHERE seq = 2",
    ):
        with pytest.raises(DBAPIError, match="append-only"), raw.begin() as conn:
            conn.execute(text(statement))
    if raw.dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"), raw.begin() as conn:
            conn.execute(text("TRUNCATE audit_events"))
    assert [r.sql for r in store.list_audit(session.id)] == ["SELECT 1", "SELECT 2"]
    assert store.verify_audit() == []


# -- verification --------------------------------------------------------------------


def test_verify_reports_an_intact_trail_as_empty(store: Store) -> None:
    _add_db(store)
    session = _session(store)
    idle = _session(store)
    _fill(store, session.id, 10)
    assert store.verify_audit(session.id) == []
    assert store.verify_audit(session.id[:10]) == []
    store.end_session(session.id, reason="client_ended")
    store.end_session(idle.id, reason="expired")
    assert store.verify_audit() == []


def test_appends_are_not_held_up_by_a_running_verify(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _add_db(store)
    verified, busy = _session(store), _session(store)
    _fill(store, verified.id, 3)
    appended: list[int] = []

    class AppendingVerifier(SessionVerifier):
        def feed_batch(self, *args: Any, **kwargs: Any) -> None:
            if not appended:
                worker = threading.Thread(
                    target=lambda: appended.append(store.append_audit([_stmt(busy.id, "x")]))
                )
                worker.start()
                worker.join(timeout=30)
                assert appended == [1], "append waited for verify"
            super().feed_batch(*args, **kwargs)

    monkeypatch.setattr(audit_module, "SessionVerifier", AppendingVerifier)
    assert store.verify_audit(verified.id) == []
    assert store.count_audit(busy.id) == 1


def test_an_edited_record_is_reported_as_changed_with_its_seq(
    store: Store, raw: Engine, master_key: bytes
) -> None:
    _add_db(store)
    session = _session(store)
    _fill_v2(raw, master_key, session.id)
    _tamper(
        raw,
        "UPDATE audit_events SET sql = 'SELECT 1 /* harmless */' "
        "WHERE session_id = :sid AND seq = 3",
        sid=session.id,
    )
    problems = store.verify_audit(session.id)
    assert _found(problems) == [(3, "changed")]
    assert problems[0].session_id == session.id
    assert problems[0].detail.startswith("seq 3 (statement 'SELECT 1 /* harmless */')")


def test_an_edited_parameter_or_time_is_changed(
    store: Store, raw: Engine, master_key: bytes
) -> None:
    _add_db(store)
    session = _session(store)
    append_version_2(
        raw,
        AuditChain(derive_audit_key(master_key)),
        [
            _stmt(session.id, "SELECT $1", parameters=(Parameter(1, 23, "text", "1"),)),
            _stmt(session.id, "SELECT 2"),
        ],
    )
    _tamper(
        raw,
        "UPDATE audit_events SET parameters = :p WHERE session_id = :sid AND seq = 1",
        p='[{"format":"text","index":1,"truncated":false,"type_oid":23,"value":"2"}]',
        sid=session.id,
    )
    assert _found(store.verify_audit(session.id)) == [(1, "changed")]
    _tamper_occurred_at(raw, session.id, 2)
    assert _found(store.verify_audit(session.id)) == [(1, "changed"), (2, "changed")]


def _tamper_occurred_at(raw: Engine, session_id: str, seq: int) -> None:
    later = (T0 + timedelta(hours=1)).isoformat(timespec="microseconds")
    with raw.begin() as conn:
        conn.execute(
            text("UPDATE audit_events SET occurred_at = :t WHERE session_id = :sid AND seq = :seq"),
            {
                "t": T0 + timedelta(hours=1) if conn.dialect.name == "postgresql" else later,
                "sid": session_id,
                "seq": seq,
            },
        )


def test_a_deleted_middle_record_is_reported_as_removed(
    store: Store, raw: Engine, master_key: bytes
) -> None:
    _add_db(store)
    session = _session(store)
    _fill_v2(raw, master_key, session.id)
    _tamper(raw, "DELETE FROM audit_events WHERE session_id = :sid AND seq = 3", sid=session.id)
    problems = store.verify_audit()
    assert _found(problems) == [(3, "removed")]
    assert problems[0].detail == "seq 3 missing before seq 4 (statement 'SELECT 4')"


def test_swapped_seqs_are_reported_as_reordered_and_changed(
    store: Store, raw: Engine, master_key: bytes
) -> None:
    _add_db(store)
    session = _session(store)
    _fill_v2(raw, master_key, session.id)
    _tamper(
        raw,
        "UPDATE audit_events SET seq = -1 WHERE session_id = :sid AND seq = 2",
        "UPDATE audit_events SET seq = 2 WHERE session_id = :sid AND seq = 4",
        "UPDATE audit_events SET seq = 4 WHERE session_id = :sid AND seq = -1",
        sid=session.id,
    )
    problems = store.verify_audit(session.id)
    assert _found(problems) == [(2, "changed"), (2, "reordered"), (4, "changed"), (4, "reordered")]
    assert problems[1].detail.startswith("seq 2 (statement 'SELECT 4') was stored out of seq")


def test_a_deleted_last_record_of_an_ended_session_is_truncated(
    store: Store, raw: Engine, master_key: bytes
) -> None:
    _add_db(store)
    session = _session(store)
    _fill_v2(raw, master_key, session.id)
    store.end_session(session.id, reason="client_ended")
    assert store.verify_audit(session.id) == []
    _tamper(raw, "DELETE FROM audit_events WHERE session_id = :sid AND seq = 5", sid=session.id)
    problems = store.verify_audit(session.id)
    assert _found(problems) == [(5, "truncated")]
    assert "seq 5 missing at the end" in problems[0].detail


def test_editing_the_seal_columns_is_a_seal_problem(
    store: Store, raw: Engine, master_key: bytes
) -> None:
    _add_db(store)
    session = _session(store)
    _fill_v2(raw, master_key, session.id)
    store.end_session(session.id, reason="client_ended")
    _tamper(raw, "DELETE FROM audit_events WHERE session_id = :sid AND seq = 5", sid=session.id)
    with raw.begin() as conn:
        conn.execute(
            text("UPDATE sessions SET audit_count = 4 WHERE id = :sid"), {"sid": session.id}
        )
    assert _found(store.verify_audit(session.id)) == [(None, "seal")]
    with raw.begin() as conn:
        conn.execute(
            text("UPDATE sessions SET audit_count = NULL, audit_head = NULL, audit_seal = NULL")
        )
    assert _found(store.verify_audit(session.id)) == [(None, "seal")]


def test_records_removed_while_active_are_caught_by_the_next_append(
    store: Store, raw: Engine
) -> None:
    _add_db(store)
    session = _session(store)
    _fill(store, session.id, 3)
    store.append_audit([_stmt(session.id, "SELECT 4"), _stmt(session.id, "SELECT 5")])
    _tamper(
        raw, "DELETE FROM audit_batches WHERE session_id = :sid AND first_seq = 4", sid=session.id
    )
    store.append_audit([_stmt(session.id, "SELECT 6")])
    assert [r.seq for r in store.list_audit(session.id)] == [1, 2, 3, 6]
    assert _found(store.verify_audit(session.id)) == [(4, "removed")]


def test_another_audit_key_cannot_verify_the_trail(
    store: Store, store_url: str, box: SecretBox
) -> None:
    _add_db(store)
    session = _session(store)
    _fill(store, session.id, 2)
    store.end_session(session.id, reason="client_ended")
    with Store.open(store_url, box, audit_key=secrets.token_bytes(32)) as other:
        assert _found(other.verify_audit(session.id)) == [
            (1, "changed"),
            (2, "changed"),
            (None, "seal"),
            # The session row's start and end seals (gateway.store.sealing).
            (None, "changed"),
            (None, "changed"),
        ]


# -- sealing ---------------------------------------------------------------------------


def test_ending_a_session_stores_its_seal(store: Store, raw: Engine, master_key: bytes) -> None:
    _add_db(store)
    session = _session(store)
    _fill(store, session.id, 3)
    head = store.list_audit(session.id)[-1].hash
    store.end_session(session.id, reason="client_ended")
    store.end_session(session.id, reason="expired")
    with raw.connect() as conn:
        row = conn.execute(
            text("SELECT audit_count, audit_head, audit_seal FROM sessions WHERE id = :sid"),
            {"sid": session.id},
        ).one()
    chain = AuditChain(derive_audit_key(master_key))
    assert (row.audit_count, row.audit_head) == (3, head)
    assert row.audit_seal == chain.seal(session.id, 3, head)


def test_an_empty_session_is_sealed_at_genesis(store: Store, raw: Engine) -> None:
    _add_db(store)
    session = _session(store)
    store.end_session(session.id, reason="expired")
    with raw.connect() as conn:
        row = conn.execute(
            text("SELECT audit_count, audit_head FROM sessions WHERE id = :sid"),
            {"sid": session.id},
        ).one()
    assert (row.audit_count, row.audit_head) == (0, GENESIS_HASH)
    assert store.verify_audit(session.id) == []


def test_late_events_after_the_end_re_seal_the_trail(store: Store) -> None:
    _add_db(store)
    session = _session(store)
    _fill(store, session.id, 2)
    store.end_session(session.id, reason="client_ended")
    store.append_audit([AuditEvent(session.id, CONN_A, "connection_end", T0)])
    assert store.count_audit(session.id) == 3
    assert store.verify_audit(session.id) == []


def test_close_orphans_seals_every_trail(store: Store) -> None:
    _add_db(store)
    first = _session(store)
    _session(store)
    _fill(store, first.id, 4)
    assert store.close_orphans("gw-restarting") == 2
    assert store.get_session(first.id).end_reason == "gateway_crash"
    assert store.verify_audit() == []


# -- search and session filters --------------------------------------------------------


def test_search_is_case_insensitive_and_treats_wildcards_literally(store: Store) -> None:
    _add_db(store)
    session = _session(store)
    store.append_audit(
        [
            _stmt(session.id, "DROP TABLE users", at=T0),
            _stmt(session.id, "drop table orders", at=T0 + timedelta(seconds=1)),
            _stmt(session.id, "SELECT 100% done", at=T0 + timedelta(seconds=2)),
            _stmt(session.id, "SELECT 100 done", at=T0 + timedelta(seconds=3)),
            _stmt(session.id, "SELECT a_b FROM t", at=T0 + timedelta(seconds=4)),
            _stmt(session.id, "SELECT axb FROM t", at=T0 + timedelta(seconds=5)),
            _stmt(session.id, "SELECT 'a/b'", at=T0 + timedelta(seconds=6)),
            _stmt(session.id, "SELECT 'ab'", at=T0 + timedelta(seconds=7)),
            AuditEvent(session.id, CONN_A, "connection_end", T0 + timedelta(seconds=8)),
        ]
    )
    assert [r.sql for r in store.search_audit("Drop Table")] == [
        "drop table orders",
        "DROP TABLE users",
    ]
    assert [r.sql for r in store.search_audit("100%")] == ["SELECT 100% done"]
    assert [r.sql for r in store.search_audit("a_b")] == ["SELECT a_b FROM t"]
    assert [r.sql for r in store.search_audit("a/b")] == ["SELECT 'a/b'"]
    assert [r.seq for r in store.search_audit(None, limit=2)] == [9, 8]
    assert len(store.search_audit(None)) == 9
    assert store.search_audit("nothing like this") == []


def test_search_filters_by_time_session_and_grant(store: Store) -> None:
    _add_db(store, "db1")
    _add_db(store, "db2", account="rw")
    alice = _session(store, "db1", "ro", "alice")
    bob = _session(store, "db2", "rw", "bob")
    store.append_audit(
        [
            _stmt(alice.id, "DELETE FROM a", at=T0),
            _stmt(bob.id, "DELETE FROM b", at=T0 + timedelta(hours=1), status="error"),
            _stmt(alice.id, "DELETE FROM c", at=T0 + timedelta(hours=2)),
        ]
    )

    def sqls(**filters: Any) -> list[str | None]:
        return [r.sql for r in store.search_audit("delete", **filters)]

    assert sqls() == ["DELETE FROM c", "DELETE FROM b", "DELETE FROM a"]
    assert sqls(since=T0 + timedelta(hours=1)) == ["DELETE FROM c", "DELETE FROM b"]
    assert sqls(until=T0 + timedelta(hours=1)) == ["DELETE FROM a"]
    assert sqls(resource="db2") == ["DELETE FROM b"]
    assert sqls(account="ro") == ["DELETE FROM c", "DELETE FROM a"]
    assert sqls(requester="bob") == ["DELETE FROM b"]
    assert sqls(status="error") == ["DELETE FROM b"]
    assert sqls(session_id=alice.id[:8]) == ["DELETE FROM c", "DELETE FROM a"]
    assert sqls(resource="db1", requester="bob") == []
    (found,) = store.search_audit("FROM b")
    assert (found.resource_name, found.account_name, found.requester) == ("db2", "rw", "bob")
    with pytest.raises(InvalidRequest, match="status"):
        store.search_audit("x", status="fine")
    with pytest.raises(InvalidRequest, match="since"):
        store.search_audit("x", since=datetime(2024, 1, 1))


def test_list_sessions_filters_by_grant_and_start(store: Store, clock: FakeClock) -> None:
    _add_db(store, "db1")
    _add_db(store, "db2", account="rw")
    first = _session(store, "db1", "ro", "alice")
    clock.now = T0 + timedelta(hours=1)
    second = _session(store, "db2", "rw", "bob")
    clock.now = T0 + timedelta(hours=2)
    third = _session(store, "db1", "ro", "bob")

    def ids(**filters: Any) -> list[str]:
        return [s.id for s in store.list_sessions(**filters)]

    assert ids() == [third.id, second.id, first.id]
    assert ids(resource="db1") == [third.id, first.id]
    assert ids(account="rw") == [second.id]
    assert ids(requester="bob") == [third.id, second.id]
    assert ids(since=T0 + timedelta(hours=1)) == [third.id, second.id]
    assert ids(until=T0 + timedelta(hours=1)) == [first.id]
    assert ids(requester="bob", resource="db1", active=True) == [third.id]
    assert ids(requester="bob", limit=1) == [third.id]


def test_list_sessions_filters_by_project_end_errors_and_pages_by_keyed_cursor(
    store: Store, clock: FakeClock
) -> None:
    _add_db(store, "db1")
    quiet = _session(store)
    failed = _session(store)
    clock.now = T0 + timedelta(hours=1)
    nil_state = _session(store)
    ended = _session(store)
    store.append_audit(
        [
            _stmt(
                quiet.id,
                "SELECT 'error'",
                parameters=[Parameter(index=1, type_oid=25, format="text", value="error")],
            ),
            _stmt(failed.id, "SELECT 1"),
            _stmt(failed.id, "SELEC 2", status="error", sqlstate="42601", error_message="x"),
            _stmt(nil_state.id, "SELECT 3", status="error", error_message="no sqlstate"),
        ]
    )
    store.end_session(ended.id, reason="revoked")

    def ids(**filters: Any) -> set[str]:
        return {s.id for s in store.list_sessions(**filters)}

    assert ids(has_errors=True) == {failed.id, nil_state.id}
    assert ids(has_errors=False) == {quiet.id, ended.id}
    assert ids(end_reason="revoked") == {ended.id}
    assert ids(project="default") == {quiet.id, failed.id, nil_state.id, ended.id}
    assert ids(project="other") == set()
    with pytest.raises(InvalidRequest, match="end reason"):
        store.list_sessions(end_reason="bored")
    # Two pages of two by the keyed cursor: every session once, in order.
    first = store.list_sessions(limit=2)
    rest = store.list_sessions(limit=2, before=(first[-1].started_at, first[-1].id))
    walked = [s.id for s in first + rest]
    assert walked == [s.id for s in store.list_sessions()]
    assert len(set(walked)) == 4
    assert store.list_sessions(before=(rest[-1].started_at, rest[-1].id)) == []

    (started,) = store.record_connections([ConnectionStart(failed.id, "127.0.0.1:1", "psql")])
    assert not isinstance(started, Exception)
    counts = store.session_counts([quiet.id, failed.id, nil_state.id, ended.id])
    assert counts[failed.id] == SessionCounts(connections=1, statements=2, errors=1)
    assert counts[quiet.id] == SessionCounts(connections=0, statements=1, errors=0)
    assert counts[nil_state.id].errors == 1
    assert counts[ended.id] == SessionCounts(connections=0, statements=0, errors=0)
    assert store.session_counts([]) == {}


# -- migration -------------------------------------------------------------------------


def test_a_database_at_revision_0001_upgrades_with_its_sessions(
    store_url: str, box: SecretBox, raw: Engine
) -> None:
    _migrate(store_url, "0001", down=False)
    with raw.begin() as conn:
        stamp = T0.isoformat() if conn.dialect.name != "postgresql" else T0
        conn.execute(
            text(
                "INSERT INTO sessions (id, requester, resource_name, account_name, database,"
                " username, listen_host, started_at, expires_at, ended_at, end_reason)"
                " VALUES ('0123456789abcdef0123456789abcdef', 'alice', 'db1', 'ro', 'app',"
                " 'app_reader', '127.0.0.1', :t, :t, :t, 'expired')"
            ),
            {"t": stamp},
        )
    with Store.open(store_url, box) as store:
        legacy = store.get_session("0123456789abcdef0123456789abcdef")
        assert legacy.end_reason == "expired"
        assert store.count_audit(legacy.id) == 0
        assert store.verify_audit() == []
        _add_db(store)
        session = _session(store)
        _fill(store, session.id, 2)
        assert store.verify_audit() == []
    with raw.connect() as conn:
        assert (
            conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one()
            == newest_revision()
        )


# -- volume ----------------------------------------------------------------------------


def test_one_batch_larger_than_an_insert_statement_is_written_whole_and_in_order(
    store: Store,
) -> None:
    # 1,234 events take three INSERT statements (500 rows each at most); they
    # must land as one transaction with seq 1..1234 in submission order, across
    # two sessions interleaved.
    _add_db(store)
    first, second = _session(store), _session(store, requester="bob")
    events = [
        _stmt(
            first.id if n % 3 else second.id,
            f"SELECT {n}",
            at=T0 + timedelta(microseconds=n),
            parameters=(Parameter(1, 23, "text", str(n)),),
        )
        for n in range(1234)
    ]
    assert store.append_audit(events) == 1234
    for session in (first, second):
        mine = [e for e in events if e.session_id == session.id]
        records = store.list_audit(session.id, limit=2000)
        assert [r.seq for r in records] == list(range(1, len(mine) + 1))
        assert [r.sql for r in records] == [e.sql for e in mine]
        assert [r.occurred_at for r in records] == [e.occurred_at for e in mine]
        assert [[(p.index, p.value) for p in r.parameters or ()] for r in records] == [
            [(1, e.sql.removeprefix("SELECT "))] for e in mine if e.sql
        ]
    assert store.verify_audit() == []


def test_a_hundred_thousand_events_in_batches_stay_chained(
    store: Store, raw: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    _add_db(store)
    session = _session(store)
    total, batch = 100_000, 500
    started = time.perf_counter()
    for offset in range(0, total, batch):
        events = [
            _stmt(
                session.id,
                f"UPDATE t SET v = $1 WHERE id = {n}",
                connection_id=CONN_A if n % 2 else CONN_B,
                at=T0 + timedelta(microseconds=n),
                parameters=(Parameter(1, 23, "text", str(n)),),
                command_tag="UPDATE 1",
                rows=1,
                duration_ms=0.25,
            )
            for n in range(offset, offset + batch)
        ]
        assert store.append_audit(events) == batch
    appended = time.perf_counter()
    store.end_session(session.id, reason="client_ended")
    assert store.count_audit(session.id) == total
    with raw.connect() as conn:
        stats = conn.execute(
            text(
                "SELECT sum(last_seq - first_seq + 1), min(first_seq), max(last_seq), count(*)"
                " FROM audit_batches WHERE session_id = :sid"
            ),
            {"sid": session.id},
        ).one()
    assert tuple(stats) == (total, 1, total, total // batch)
    verify_started = time.perf_counter()
    assert store.verify_audit() == []
    verified = time.perf_counter()
    tail = store.list_audit(session.id, after_seq=total - 2)
    assert [(r.seq, r.sql) for r in tail] == [
        (total - 1, f"UPDATE t SET v = $1 WHERE id = {total - 2}"),
        (total, f"UPDATE t SET v = $1 WHERE id = {total - 1}"),
    ]
    with capsys.disabled():
        print(
            f"\n[{raw.dialect.name}] {total} audit events: append "
            f"{appended - started:.1f}s ({total / (appended - started):.0f}/s), "
            f"verify {verified - verify_started:.1f}s"
        )

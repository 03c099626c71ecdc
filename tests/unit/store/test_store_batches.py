"""Tests of chain version 3, the trail in sealed batches, on SQLite and PostgreSQL.

The tampering tests edit the batches by hand (tests/unit/trail_support.py) the
way an intruder with write access to the database would, without the audit key,
and check that verify names the record (or the batch) concerned; they are the
counterparts of the row tampering tests in test_store_audit.py.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from store_support import T0, FakeClock, pg_admin_url
from trail_support import (
    delete_record,
    drop_triggers,
    edit_record,
    set_batch_column,
    swap_records,
)

from gateway.audit.chain import GENESIS_HASH, derive_audit_key
from gateway.audit.records import AuditEvent, Parameter
from gateway.credentials.secretbox import SecretBox
from gateway.store import AccessSession, Store

CONN_A = "a" * 32


@pytest.fixture
def master_key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def store(store_url: str, master_key: bytes, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, SecretBox(master_key), clock=clock) as opened:
        yield opened


@pytest.fixture
def raw(store_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_admin_url(store_url) if "postgresql" in store_url else store_url)
    yield engine
    engine.dispose()


def _session(store: Store, requester: str = "alice") -> AccessSession:
    if not store.list_resources():
        store.add_resource("db1", "db.example.com", 5432, "app")
        store.add_account("db1", "ro", "app_reader", "pw-" + secrets.token_hex(8))
    return store.create_session(
        requester=requester,
        resource="db1",
        account="ro",
        listen_host="127.0.0.1",
        expires_at=datetime(2100, 1, 1, tzinfo=UTC),
    )


def _stmt(session_id: str, sql: str, *, at: datetime = T0, **extra: Any) -> AuditEvent:
    fields: dict[str, Any] = {"protocol": "simple", "status": "ok", **extra}
    return AuditEvent(session_id, CONN_A, "statement", at, sql=sql, **fields)


def _fill(store: Store, session_id: str, count: int = 5) -> None:
    store.append_audit([_stmt(session_id, f"SELECT {n}") for n in range(1, count + 1)])


def _found(problems: list[Any]) -> list[tuple[int | None, str]]:
    return [(p.seq, p.problem) for p in problems]


# -- the format ------------------------------------------------------------------------


def test_a_batch_is_the_records_their_keyed_digests_and_one_mac(
    store: Store, master_key: bytes, raw: Engine
) -> None:
    session = _session(store)
    event = _stmt(session.id, "SELECT 'é', $1", parameters=(Parameter(1, 23, "text", "1"),), rows=1)
    store.append_audit([event])
    micros = (T0 - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    # Spelled out: [seq, kind, occurred_at, connection_id, *the statement's body].
    head = [1, "statement", micros, CONN_A, "simple", "SELECT 'é', $1", None, None]
    tail = [[[1, 23, "text", "1", False]], None, 1, "ok", None, None, None, None, None, None]
    record = msgspec.msgpack.encode([*head, *tail])
    key = derive_audit_key(master_key)
    digest = hashlib.blake2b(
        session.id.encode() + b"\x00" + record, key=key, digest_size=16, person=b"pam audit rec v3"
    ).digest()
    header = f"{session.id}|1|{GENESIS_HASH}|".encode()
    mac = hmac.new(key, b"pam audit batch v3\x00" + header + digest, hashlib.sha256).hexdigest()
    with raw.connect() as conn:
        row = conn.execute(text("SELECT * FROM audit_batches")).one()
    assert bytes(row.records) == msgspec.msgpack.encode([msgspec.Raw(record)])
    assert bytes(row.digests) == digest
    assert (row.hash, row.prev_hash, row.chain_version) == (mac, GENESIS_HASH, 3)
    assert (row.first_seq, row.last_seq, row.min_at, row.max_at) == (1, 1, micros, micros)
    assert (row.kinds, row.statement_count) == (2, 1)
    (read,) = store.list_audit(session.id)
    assert (read.prev_hash, read.hash) == (GENESIS_HASH, mac)


def test_records_link_one_to_the_next_within_and_across_batches(store: Store) -> None:
    session = _session(store)
    _fill(store, session.id, 3)
    _fill(store, session.id, 2)
    records = store.list_audit(session.id)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash
    assert store.verify_audit() == []


def test_a_large_append_is_split_into_batches_of_at_most_a_thousand(
    store: Store, raw: Engine
) -> None:
    session = _session(store)
    store.append_audit([_stmt(session.id, f"SELECT {n}") for n in range(2500)])
    with raw.connect() as conn:
        spans = conn.execute(
            text("SELECT first_seq, last_seq FROM audit_batches ORDER BY first_seq")
        ).all()
    assert [tuple(s) for s in spans] == [(1, 1000), (1001, 2000), (2001, 2500)]
    page = store.list_audit(session.id, after_seq=990, limit=20)
    assert [r.seq for r in page] == list(range(991, 1011))
    assert store.count_audit(session.id, "statement") == 2500
    assert store.verify_audit() == []


def test_triggers_refuse_update_and_delete_of_a_batch(store: Store, raw: Engine) -> None:
    session = _session(store)
    _fill(store, session.id, 2)
    for statement in (
        "UPDATE audit_batches SET records = records",
        "DELETE FROM audit_batches",
    ):
        with pytest.raises(DBAPIError, match="append-only"), raw.begin() as conn:
            conn.execute(text(statement))
    if raw.dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"), raw.begin() as conn:
            conn.execute(text("TRUNCATE audit_batches"))
    assert store.count_audit(session.id) == 2


# -- reading ---------------------------------------------------------------------------


def test_list_and_count_by_kind_skip_batches_without_it(store: Store) -> None:
    session = _session(store)
    start = AuditEvent(session.id, CONN_A, "connection_start", T0, detail={"backend_pid": 7})
    end = AuditEvent(session.id, CONN_A, "connection_end", T0, detail={"end_reason": "x"})
    store.append_audit([start, _stmt(session.id, "SELECT 1")])
    _fill(store, session.id, 3)
    store.append_audit([_stmt(session.id, "SELECT 9"), end])
    ends = store.list_audit(session.id, kinds=["connection_start", "connection_end"])
    assert [(r.seq, r.kind, r.detail) for r in ends] == [
        (1, "connection_start", {"backend_pid": 7}),
        (7, "connection_end", {"end_reason": "x"}),
    ]
    assert store.count_audit(session.id) == 7
    assert store.count_audit(session.id, "statement") == 5
    assert store.count_audit(session.id, "connection_end") == 1


def test_search_returns_the_newest_matches_across_interleaved_batches(store: Store) -> None:
    first, second = _session(store), _session(store, requester="bob")
    # Ten batches of each session, their times interleaved.
    for batch in range(10):
        for n, session in enumerate((first, second)):
            store.append_audit(
                [
                    _stmt(
                        session.id,
                        f"SELECT {batch}_{n}_{i}",
                        at=T0 + timedelta(seconds=batch * 10 + i * 2 + n),
                        parameters=(Parameter(1, 25, "text", "needle"),),
                    )
                    for i in range(5)
                ]
            )
    newest = store.search_audit(None, limit=3)
    assert [r.sql for r in newest] == ["SELECT 9_1_4", "SELECT 9_0_4", "SELECT 9_1_3"]
    hits = store.search_audit("select 3_0", limit=100)
    assert [r.sql for r in hits] == [f"SELECT 3_0_{i}" for i in (4, 3, 2, 1, 0)]
    # In the parameters only: the bytes match, the SQL does not.
    assert store.search_audit("needle") == []
    window = store.search_audit(
        "SELECT", since=T0 + timedelta(seconds=20), until=T0 + timedelta(seconds=22)
    )
    assert [r.sql for r in window] == ["SELECT 2_1_0", "SELECT 2_0_0"]
    assert [r.requester for r in store.search_audit(None, requester="bob", limit=2)] == ["bob"] * 2
    mine = store.search_audit(None, session_id=first.id[:12], limit=1000)
    assert len(mine) == 50 and {r.session_id for r in mine} == {first.id}


def test_search_folds_ascii_case_and_matches_other_text_exactly(store: Store) -> None:
    session = _session(store)
    store.append_audit(
        [
            _stmt(session.id, "SELECT 'Éa' FROM Users"),
            _stmt(session.id, "select 100% off", status="error"),
        ]
    )
    assert [r.sql for r in store.search_audit("from users")] == ["SELECT 'Éa' FROM Users"]
    assert [r.sql for r in store.search_audit("'Éa'")] == ["SELECT 'Éa' FROM Users"]
    assert [r.sql for r in store.search_audit("100%")] == ["select 100% off"]
    assert [r.sql for r in store.search_audit(None, status="error")] == ["select 100% off"]


def test_a_database_with_batches_refuses_to_downgrade_below_them(
    store_url: str, store: Store
) -> None:
    from alembic import command
    from alembic.config import Config

    import gateway.store.engine as engine_module

    _fill(store, _session(store).id, 1)
    config = Config()
    config.set_main_option("script_location", str(engine_module._MIGRATIONS_DIR))
    engine = create_engine(pg_admin_url(store_url) if "postgresql" in store_url else store_url)
    try:
        with pytest.raises(RuntimeError, match="audit_batches holds records"), engine.begin() as c:
            config.attributes["connection"] = c
            command.downgrade(config, "0003")
    finally:
        engine.dispose()


# -- tampering -------------------------------------------------------------------------


def test_an_edited_record_is_changed_with_its_seq(store: Store, raw: Engine) -> None:
    session = _session(store)
    _fill(store, session.id)
    edit_record(raw, session.id, 3, sql="SELECT 1 /* harmless */")
    problems = store.verify_audit(session.id)
    assert _found(problems) == [(3, "changed")]
    assert problems[0].detail.startswith("seq 3 (statement 'SELECT 1 /* harmless */')")


def test_an_edited_parameter_or_time_is_changed(store: Store, raw: Engine) -> None:
    session = _session(store)
    store.append_audit(
        [
            _stmt(session.id, "SELECT $1", parameters=(Parameter(1, 23, "text", "1"),)),
            _stmt(session.id, "SELECT 2"),
        ]
    )
    edit_record(raw, session.id, 1, parameters=[[1, 23, "text", "2", False]])
    assert _found(store.verify_audit(session.id)) == [(1, "changed")]
    edit_record(raw, session.id, 2, occurred_at=0)
    assert _found(store.verify_audit(session.id)) == [(1, "changed"), (2, "changed")]


@pytest.mark.parametrize("digest_too", [True, False])
def test_a_deleted_middle_record_is_removed(store: Store, raw: Engine, digest_too: bool) -> None:
    session = _session(store)
    _fill(store, session.id)
    delete_record(raw, session.id, 3, digest_too=digest_too)
    problems = store.verify_audit()
    assert _found(problems) == [(3, "removed")]
    assert problems[0].detail == "seq 3 missing before seq 4 (statement 'SELECT 4')"


def test_swapped_records_are_reordered(store: Store, raw: Engine) -> None:
    session = _session(store)
    _fill(store, session.id)
    swap_records(raw, session.id, 2, 4)
    problems = store.verify_audit(session.id)
    assert _found(problems) == [(2, "reordered"), (4, "reordered")]
    assert problems[0].detail.startswith("seq 2 (statement 'SELECT 2') was stored out of seq")


def test_a_record_with_an_edited_seq_is_changed(store: Store, raw: Engine) -> None:
    session = _session(store)
    _fill(store, session.id)
    edit_record(raw, session.id, 2, seq=4)
    found = _found(store.verify_audit(session.id))
    # The record now claiming seq 4 fails its digest, and seq 2 is gone.
    assert (4, "changed") in found and (2, "removed") in found


def test_a_deleted_last_record_of_an_ended_session_is_truncated(store: Store, raw: Engine) -> None:
    session = _session(store)
    _fill(store, session.id)
    store.end_session(session.id, reason="client_ended")
    assert store.verify_audit(session.id) == []
    delete_record(raw, session.id, 5)
    problems = store.verify_audit(session.id)
    assert _found(problems) == [(5, "truncated")]
    assert "seq 5 missing at the end" in problems[0].detail


def test_a_whole_last_batch_deleted_is_truncated(store: Store, raw: Engine) -> None:
    session = _session(store)
    _fill(store, session.id, 3)
    _fill(store, session.id, 2)
    store.end_session(session.id, reason="client_ended")
    with raw.begin() as conn:
        drop_triggers(conn)
        conn.execute(text("DELETE FROM audit_batches WHERE first_seq = 4"))
    assert _found(store.verify_audit(session.id)) == [(4, "truncated")]


@pytest.mark.parametrize(
    ("column", "value", "found", "says"),
    [
        ("hash", "0" * 64, (1, "changed"), "the batch of seqs 1-3 does not match its MAC"),
        ("prev_hash", "1" * 64, (1, "removed"), "seq 1 (statement 'SELECT 1') is not chained"),
        ("first_seq", 0, (0, "changed"), "the batch of seqs 0-3 does not match its MAC"),
    ],
)
def test_an_edited_mac_or_link_is_named_once(
    store: Store, raw: Engine, column: str, value: Any, found: tuple[int, str], says: str
) -> None:
    session = _session(store)
    _fill(store, session.id, 3)
    _fill(store, session.id, 2)
    set_batch_column(raw, session.id, 1, column, value)
    problems = store.verify_audit(session.id)
    # One problem: the next batch, chained to the edited hash, is not blamed too.
    assert _found(problems) == [found]
    assert problems[0].detail.startswith(says)


def test_edited_digests_name_the_record(store: Store, raw: Engine) -> None:
    session = _session(store)
    _fill(store, session.id, 3)
    with raw.connect() as conn:
        digests = bytes(conn.execute(text("SELECT digests FROM audit_batches")).scalar_one())
    forged = digests[:16] + bytes(16) + digests[32:]
    set_batch_column(raw, session.id, 1, "digests", forged)
    assert _found(store.verify_audit(session.id)) == [(2, "changed")]


@pytest.mark.parametrize(
    ("column", "value"), [("max_at", 0), ("kinds", 1), ("last_seq", 1), ("chain_version", 2)]
)
def test_edited_index_columns_or_version_are_changed(
    store: Store, raw: Engine, column: str, value: Any
) -> None:
    session = _session(store)
    _fill(store, session.id, 3)
    set_batch_column(raw, session.id, 1, column, value)
    assert _found(store.verify_audit(session.id)) == [(1, "changed")]


def test_a_record_copied_from_another_session_does_not_verify(store: Store, raw: Engine) -> None:
    mine, other = _session(store), _session(store)
    _fill(store, mine.id, 3)
    _fill(store, other.id, 3)
    with raw.begin() as conn:
        drop_triggers(conn)
        source = conn.execute(
            text("SELECT records, digests FROM audit_batches WHERE session_id = :s"),
            {"s": other.id},
        ).one()
        conn.execute(
            text("UPDATE audit_batches SET records = :r, digests = :d WHERE session_id = :s"),
            {"r": source.records, "d": source.digests, "s": mine.id},
        )
    found = _found(store.verify_audit(mine.id))
    assert found[:3] == [(1, "changed"), (2, "changed"), (3, "changed")]

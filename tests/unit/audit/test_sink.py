"""Tests of gateway.audit.sink's codec and child process protocol.

The child is run for real (``python -m gateway.app.audit_process``) on a real state
directory; tests/integration/test_audit.py covers it inside the daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from gateway.audit.chain import EVENT_FIELDS
from gateway.audit.records import (
    AuditEvent,
    EventRow,
    Parameter,
    event_rows,
    iso_from_micros,
    row_event,
)
from gateway.audit.sink import AuditSink, SinkError, decode_rows, encode_rows
from gateway.config import MASTER_KEY_FILE, GatewaySettings, save_settings, store_url
from gateway.credentials.secretbox import SecretBox, generate_master_key, load_master_key
from gateway.errors import ConfigError, InvalidRequest, NotFound
from gateway.store import Store

EVENTS = [
    AuditEvent(
        session_id="s" * 32,
        connection_id="c" * 32,
        kind="connection_start",
        occurred_at=datetime(2026, 11, 23, 9, 0, 0, 123456, tzinfo=UTC),
        detail={"client_addr": "127.0.0.1:5555", "backend_pid": 42, "ratio": 0.5, "x": None},
    ),
    AuditEvent(
        session_id="s" * 32,
        connection_id="c" * 32,
        kind="statement",
        occurred_at=datetime(2026, 11, 23, 10, 0, 0, 1, tzinfo=timezone(timedelta(hours=1))),
        protocol="extended",
        sql="select $1, $2, $3, $10 -- é ✓",
        statement_name="s1",
        portal_name="",
        parameters=(
            Parameter(1, 25, "text", "hello"),
            Parameter(2, 17, "binary", "3q2+7w=="),
            Parameter(3, None, "null", None),
            Parameter(10, 23, "text", "1" * 10, True),
        ),
        command_tag="SELECT 1",
        rows=1,
        status="error",
        sqlstate="22012",
        error_message="division by zero",
        duration_ms=1.25,
        copy_direction="out",
        copy_bytes=2**40,
    ),
]


def test_events_survive_the_pipe_encoding_unchanged() -> None:
    rows = decode_rows(encode_rows(event_rows(EVENTS)))
    assert all(type(row) is tuple for row in rows)
    assert rows[1][3] == 1_795_424_400_000_001  # 2026-11-23 09:00:00.000001 UTC, in µs
    decoded = [row_event(row) for row in rows]
    assert decoded == EVENTS
    # The same instant, in UTC: all the store keeps of a time.
    assert decoded[1].occurred_at.tzinfo == UTC
    assert decoded[1].occurred_at == datetime(2026, 11, 23, 9, 0, 0, 1, tzinfo=UTC)


def test_iso_text_from_microseconds_is_what_datetime_spells() -> None:
    for moment in (
        datetime(2026, 11, 23, 9, 0, 0, 1, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ):
        micros = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        assert iso_from_micros(micros) == moment.isoformat(timespec="microseconds")
        assert iso_from_micros(micros) == moment.isoformat(timespec="microseconds")  # cached
    with pytest.raises(OverflowError):
        iso_from_micros(10**20)


def test_an_event_without_a_time_zone_is_refused_before_it_is_sent() -> None:
    naive = AuditEvent(
        session_id="s" * 32,
        connection_id="c" * 32,
        kind="statement",
        occurred_at=datetime(2026, 1, 1),
    )
    with pytest.raises(InvalidRequest, match="audit event 1 occurred_at"):
        event_rows([EVENTS[0], naive])


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    generate_master_key(home / MASTER_KEY_FILE)
    save_settings(home, GatewaySettings(api_token_sha256="0" * 64))
    return home


def _session(home: Path) -> tuple[Store, str]:
    settings = GatewaySettings(api_token_sha256="0" * 64)
    store = Store.open(
        store_url(home, settings), SecretBox(load_master_key(home / MASTER_KEY_FILE))
    )
    store.add_resource("db1", "db.example.com", 5432, "app")
    store.add_account("db1", "ro", "reader", "pw-" + secrets.token_hex(8))
    session = store.create_session(
        requester="alice",
        resource="db1",
        account="ro",
        listen_host="127.0.0.1",
        expires_at=datetime(2100, 1, 1, tzinfo=UTC),
    )
    return store, session.id


def _statements(session_id: str, first: int, count: int) -> list[EventRow]:
    return event_rows(
        [
            AuditEvent(
                session_id=session_id,
                connection_id="c" * 32,
                kind="statement",
                occurred_at=datetime(2026, 11, 23, tzinfo=UTC) + timedelta(microseconds=n),
                protocol="simple",
                sql=f"select {n}",
                status="ok",
            )
            for n in range(first, first + count)
        ]
    )


@pytest.mark.asyncio
async def test_the_child_writes_batches_stands_in_for_bad_events_and_is_restarted_after_a_crash(
    home: Path,
) -> None:
    store, session_id = _session(home)
    sink = AuditSink(home, log_format="json", log_level="warning")
    await sink.start()
    try:
        assert await sink.append(_statements(session_id, 0, 3)) == 3
        # An event the store cannot take does not wedge the writer (a refused batch
        # would be refused on every retry): a stand-in record says what was wrong.
        bad = list(_statements(session_id, 99, 1)[0])
        bad[EVENT_FIELDS.index("duration_ms")] = -1.0
        assert await sink.append([tuple(bad)]) == 1
        # Events of a session the store does not hold cannot be attributed: left out.
        assert await sink.append(_statements("0" * 32, 0, 1)) == 0
        first_pid = sink.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(SinkError, match="exited"):
            await sink.append(_statements(session_id, 3, 2))
        # The next append starts a new child; the failed batch is the writer's to retry.
        assert await sink.append(_statements(session_id, 3, 2)) == 2
        assert sink.pid not in (None, first_pid) and sink.starts == 2
        # Signals meant for the daemon's process group do not stop the child.
        os.kill(sink.pid, signal.SIGINT)  # type: ignore[arg-type]
        os.kill(sink.pid, signal.SIGTERM)  # type: ignore[arg-type]
        assert await sink.append(_statements(session_id, 5, 1)) == 1
    finally:
        await sink.close()
    records = store.list_audit(session_id)
    assert [r.sql for r in records] == [f"select {n}" for n in range(3)] + [None] + [
        f"select {n}" for n in range(3, 6)
    ]
    stand_in = records[3]
    assert (stand_in.kind, stand_in.status, stand_in.error_message) == (
        "statement",
        "incomplete",
        "pam could not record this event as it was: duration_ms must be a finite,"
        " non-negative number",
    )
    assert store.verify_audit() == []
    store.close()


@pytest.mark.asyncio
async def test_a_child_that_cannot_open_the_store_says_why(home: Path) -> None:
    path = home / "gateway.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "store_url": "mysql://x/y"}))
    sink = AuditSink(home, log_format="json", log_level="warning")
    with pytest.raises(ConfigError, match="state store URL"):
        await asyncio.wait_for(sink.start(), 60)
    assert sink.pid is None


def test_an_unexpected_error_in_the_child_crosses_by_type_only() -> None:
    from gateway.audit.sink import error_reply as _error_reply

    reply = _error_reply(UnicodeEncodeError("utf-8", "pw-hunter2\ud800", 10, 11, "surrogate"))
    assert reply == {
        "error": "StoreError",
        "message": "unexpected UnicodeEncodeError in the audit writer process",
    }
    assert _error_reply(NotFound("session 'x' not found")) == {
        "error": "NotFound",
        "message": "session 'x' not found",
    }

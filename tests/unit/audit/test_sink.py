"""Tests of gateway.audit.sink's codec and child process (the journal's reader).

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

from gateway.audit.journal import JOURNAL_DIR, Journal
from gateway.audit.records import (
    AuditEvent,
    EventRow,
    Parameter,
    datetime_micros,
    event_rows,
    micros_datetime,
    row_event,
)
from gateway.audit.sink import AuditSink
from gateway.audit.tap import ConnectionAudit
from gateway.audit.writer import AuditWriter
from gateway.config import MASTER_KEY_FILE, GatewaySettings, save_settings, store_url
from gateway.credentials.secretbox import SecretBox, generate_master_key, load_master_key
from gateway.errors import ConfigError, InvalidRequest, NotFound
from gateway.protocol.framing import TappedMessage
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


def test_events_survive_their_row_form_unchanged() -> None:
    rows = event_rows(EVENTS)
    assert all(type(row) is tuple for row in rows)
    assert rows[1][3] == 1_795_424_400_000_001  # 2026-11-23 09:00:00.000001 UTC, in µs
    decoded = [row_event(row) for row in rows]
    assert decoded == EVENTS
    # The same instant, in UTC: all the store keeps of a time.
    assert decoded[1].occurred_at.tzinfo == UTC
    assert decoded[1].occurred_at == datetime(2026, 11, 23, 9, 0, 0, 1, tzinfo=UTC)


def test_microseconds_and_datetimes_convert_both_ways_exactly() -> None:
    for moment in (
        datetime(2026, 11, 23, 9, 0, 0, 1, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ):
        micros = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        assert datetime_micros(moment) == micros
        assert micros_datetime(micros) == moment
    with pytest.raises(OverflowError):
        micros_datetime(10**20)


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


def _journal_statements(writer: AuditWriter, session_id: str, first: int, count: int) -> None:
    """One connection per call running ``select N``, as a relay journals it."""
    audit = ConnectionAudit(writer, session_id, "c" * 32)
    audit.connection_event("connection_start", {"user": "u"}, now_ns=1)
    for n in range(first, first + count):
        assert audit.on_client([TappedMessage(ord("Q"), f"select {n}\x00".encode())], 2) is None
        server = [TappedMessage(ord("C"), b"SELECT 1\x00"), TappedMessage(ord("Z"), b"I")]
        assert audit.on_server(server, 3) is None
    audit.connection_event("connection_end", {"end_reason": "client_closed"}, now_ns=4)


@pytest.mark.asyncio
async def test_the_child_writes_the_journal_and_a_new_one_goes_on_after_a_crash(
    home: Path,
) -> None:
    store, session_id = _session(home)
    sink = AuditSink(home, log_format="json", log_level="warning")
    writer = AuditWriter(Journal(home / JOURNAL_DIR), sink)
    await writer.start()
    try:
        _journal_statements(writer, session_id, 0, 3)
        assert await writer.drain(timeout=60)
        # Events of a session the store does not hold cannot be attributed: left out.
        _journal_statements(writer, "0" * 32, 0, 1)
        assert await writer.drain(timeout=60)
        first_pid = sink.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        _journal_statements(writer, session_id, 3, 2)
        # A new child starts by itself and goes on from the last one's checkpoint.
        assert await writer.drain(timeout=60)
        assert sink.pid not in (None, first_pid) and sink.starts == 2
        # Signals meant for the daemon's process group do not stop the child.
        os.kill(sink.pid, signal.SIGINT)  # type: ignore[arg-type]
        os.kill(sink.pid, signal.SIGTERM)  # type: ignore[arg-type]
        _journal_statements(writer, session_id, 5, 1)
        assert await writer.drain(timeout=60)
    finally:
        await writer.close()
    records = store.list_audit(session_id)
    assert [r.sql for r in records if r.kind == "statement"] == [f"select {n}" for n in range(6)]
    assert store.verify_audit() == []
    # Every connection ended and is in the store: the journal is gone.
    assert list((home / JOURNAL_DIR).iterdir()) == []
    store.close()


@pytest.mark.asyncio
async def test_a_child_that_cannot_open_the_store_says_why(home: Path) -> None:
    path = home / "gateway.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "store_url": "mysql://x/y"}))
    sink = AuditSink(home, log_format="json", log_level="warning")
    writer = AuditWriter(Journal(home / JOURNAL_DIR), sink)
    with pytest.raises(ConfigError, match="state store URL"):
        await asyncio.wait_for(writer.start(), 60)
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

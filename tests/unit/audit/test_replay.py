"""Tests of the audit journal (gateway.audit.journal) and its reader (gateway.audit.replay).

The journal's records are read back byte-exact; a torn tail is left unread; the
reader turns a connection's records into exactly the rows the tracker gives when
fed the same messages directly (the streams of test_pairing.py); a run whose
daemon died is closed with its statements ``incomplete``; a restarted reader
goes on from its checkpoint without losing a statement.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from test_pairing import (
    PARSE_COMPLETE,
    Playbook,
    bind,
    complete,
    copy_data,
    copy_done,
    data_row,
    error,
    execute,
    parse,
    query,
    ready,
    sync,
)

from gateway.audit.export import export_record
from gateway.audit.journal import (
    HEADER,
    KIND_CLIENT,
    Journal,
    SegmentReader,
    checkpoint_path,
    decode_messages,
    encode_chunk,
    list_runs,
    segment_path,
)
from gateway.audit.records import AuditEvent, EventRow, row_event
from gateway.audit.redaction import Redactor
from gateway.audit.replay import CRASH_ERROR, JournalProcessor, TrackerSettings
from gateway.audit.tap import UNRECORDABLE, ConnectionAudit
from gateway.audit.writer import AuditWriter
from gateway.protocol.framing import TappedMessage
from gateway.protocol.messages import encode_message
from gateway.protocol.sqlstate import SqlState

SECRET = "pw-hunter2"


class Rows:
    """A store that keeps what it is given (optionally refusing, as a full disk)."""

    def __init__(self) -> None:
        self.rows: list[EventRow] = []
        self.batches: list[int] = []
        self.failing = False

    def append_audit_rows(
        self,
        rows: Sequence[EventRow],
        *,
        substitute_invalid: bool = False,
        numbered: list[tuple[int, int]] | None = None,
    ) -> int:
        if self.failing:
            raise OSError("disk full (test)")
        assert substitute_invalid
        if numbered is not None:  # one trail for all: the seq is the row's place
            numbered += ((n, len(self.rows) + n + 1) for n in range(len(rows)))
        self.rows.extend(rows)
        self.batches.append(len(rows))
        return len(rows)

    def events(self, kind: str | None = None) -> list[AuditEvent]:
        return [row_event(r) for r in self.rows if kind is None or r[2] == kind]


class NoConsumer:
    async def start(self, writer: AuditWriter) -> None: ...

    def flush(self) -> None: ...

    async def close(self) -> None: ...


def _processor(directory: Path, run: str, store: Rows, **kwargs: int) -> JournalProcessor:
    return JournalProcessor(directory, run, store, TrackerSettings(), lambda: (SECRET,), **kwargs)


class JournalBook(Playbook):
    """The Playbook's streams, fed through the relay's trackers into the journal
    (as the relay does, one record per chunk) beside the direct tracker."""

    def __init__(self, directory: Path) -> None:
        super().__init__(redactor=Redactor.build((), (SECRET,)))
        self.journal = Journal(directory)
        self.writer = AuditWriter(self.journal, NoConsumer())
        self.audit = ConnectionAudit(self.writer, "s1", "c1")
        self.audit.connection_event("connection_start", {"user": "u"}, now_ns=self.now)

    def client(self, *chunks: bytes) -> None:
        tapped = self.client_tracker.feed(b"".join(chunks))
        # The journal carries one time per chunk, as the relay gives one.
        self.now += 1000
        for message in tapped:
            self.tracker.client(message, self.now)
        if tapped:
            assert self.audit.on_client(tapped, self.now) is None

    def server(self, *chunks: bytes) -> None:
        tapped = self.server_tracker.feed(b"".join(chunks))
        self.now += 1000
        for message in tapped:
            self.events += map(row_event, self.tracker.server(message, self.now))
        if tapped:
            assert self.audit.on_server(tapped, self.now) is None

    def end(self) -> list[AuditEvent]:
        self.audit.connection_event("connection_end", {"end_reason": "x"}, now_ns=self.now)
        return self.close()


# --- the record format -----------------------------------------------------------------


def test_connection_events_take_their_microsecond_as_statements_do(tmp_path: Path) -> None:
    # 999 ns into a microsecond of 2026: a float division of the nanoseconds
    # rounds into the next microsecond; the tracker floors a statement's time.
    now_ns = 1_796_558_032_352_317_999
    journal = Journal(tmp_path)
    audit = ConnectionAudit(AuditWriter(journal, NoConsumer()), "s1", "c1")
    audit.connection_event("connection_start", {}, now_ns=now_ns)
    audit.connection_event("connection_end", {}, now_ns=now_ns)
    store = Rows()
    _processor(tmp_path, journal.run, store).poll(flush=True)
    assert [(row[2], row[3]) for row in store.rows] == [
        ("connection_start", now_ns // 1000),
        ("connection_end", now_ns // 1000),
    ]


class Published:
    """An exporter that keeps what it is handed."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int]] = []
        #: the records as the export sends them
        self.exported: list[dict[str, Any]] = []

    def publish(self, rows: Sequence[EventRow], numbered: Sequence[tuple[int, int]]) -> None:
        self.records += [(rows[position][2], seq) for position, seq in numbered]
        self.exported += [export_record(rows[position], seq) for position, seq in numbered]


def test_each_committed_batch_is_published_with_its_seqs_after_the_store_took_it(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path)
    audit = ConnectionAudit(AuditWriter(journal, NoConsumer()), "s1", "c1")
    audit.connection_event("connection_start", {}, now_ns=1_000)
    store, exporter = Rows(), Published()
    processor = JournalProcessor(
        tmp_path, journal.run, store, TrackerSettings(), lambda: (), exporter=exporter
    )
    processor.poll(flush=True)
    assert exporter.records == [("connection_start", 1)]
    audit.connection_event("connection_end", {}, now_ns=2_000)
    store.failing = True
    with pytest.raises(OSError):
        processor.poll(flush=True)
    assert exporter.records == [("connection_start", 1)]  # nothing the store refused
    store.failing = False
    processor.poll(flush=True)
    assert exporter.records == [("connection_start", 1), ("connection_end", 2)]


def test_what_is_published_is_the_redacted_record_the_store_took_never_the_sql_sent(
    tmp_path: Path,
) -> None:
    book = JournalBook(tmp_path)
    book.client(query("ALTER ROLE app PASSWORD 'literal-hunter3'"))
    book.server(complete("ALTER ROLE"), ready())
    book.client(query(f"select '{SECRET}'"))
    book.server(complete("SELECT 1"), ready())
    store, exporter = Rows(), Published()
    processor = JournalProcessor(
        tmp_path, book.journal.run, store, TrackerSettings(), lambda: (SECRET,), exporter=exporter
    )
    processor.poll(flush=True)
    assert [r["sql"] for r in exporter.exported if r["kind"] == "statement"] == [
        "ALTER ROLE app PASSWORD '***'",
        "select '***'",
    ]
    assert [r["seq"] for r in exporter.exported] == list(range(1, len(store.rows) + 1))
    assert [(r["kind"], r["sql"]) for r in exporter.exported] == [
        (e.kind, e.sql) for e in map(row_event, store.rows)
    ]
    sent = json.dumps(exporter.exported)
    assert "literal-hunter3" not in sent and SECRET not in sent


def test_a_chunk_record_reads_back_byte_exact(tmp_path: Path) -> None:
    messages = [
        TappedMessage(ord("Q"), b"select 1\x00", False, 0, 7),
        TappedMessage(ord("B"), b"\x00" * 40, True, 2**40, 2**63 - 1),
        TappedMessage(ord("S"), b"", False, 3, 9),
    ]
    journal = Journal(tmp_path)
    journal.append(encode_chunk(KIND_CLIENT, 7, 123456789, messages))
    (record,) = SegmentReader(segment_path(tmp_path, journal.run, 0)).records()
    assert (record.kind, record.connection, record.time_ns) == (KIND_CLIENT, 7, 123456789)
    assert decode_messages(record.payload) == messages
    assert (
        record.end == journal.journaled == os.path.getsize(segment_path(tmp_path, journal.run, 0))
    )
    assert oct(os.stat(segment_path(tmp_path, journal.run, 0)).st_mode & 0o777) == "0o600"


def test_a_torn_tail_is_left_unread_until_the_rest_arrives(tmp_path: Path) -> None:
    record = encode_chunk(KIND_CLIENT, 1, 5, [TappedMessage(ord("Q"), b"select 2\x00")])
    path = tmp_path / "seg.journal"
    path.write_bytes(record + record[:10])
    reader = SegmentReader(path)
    assert len(list(reader.records())) == 1
    assert (reader.offset, reader.torn) == (len(record), 10)
    with path.open("ab") as f:
        f.write(record[10:])
    assert [r.end for r in reader.records()] == [2 * len(record)]
    assert reader.torn == 0
    with pytest.raises(ValueError, match="a journal record ends inside"):
        decode_messages(record[HEADER.size : -1])


def test_segments_rotate_past_their_size_and_the_reader_follows(tmp_path: Path) -> None:
    store = Rows()
    book = JournalBook(tmp_path)
    book.journal.segment_bytes = 200
    processor = _processor(tmp_path, book.journal.run, store)
    for n in range(30):
        book.client(query(f"select {n}"))
        book.server(complete("SELECT 1"), ready())
        if n == 10:
            processor.poll(flush=True)
    assert book.journal.segment > 3
    processor.poll(flush=True)
    assert [e.sql for e in store.events("statement")] == [f"select {n}" for n in range(30)]
    # Everything before the segment being read is in the store: gone from disk.
    assert processor.committed == book.journal.position
    assert book.journal.processed(*processor.committed) == book.journal.journaled
    assert len(list(tmp_path.glob("*.journal"))) == 1


def test_checkpoints_are_written_at_most_once_an_interval_unless_flushed(tmp_path: Path) -> None:
    store = Rows()
    book = JournalBook(tmp_path)
    processor = _processor(tmp_path, book.journal.run, store, batch_size=2)
    written: list[int] = []
    checkpoint = processor._checkpoint

    def counted(state: Any) -> None:
        written.append(state.offset)
        checkpoint(state)

    processor._checkpoint = counted  # type: ignore[method-assign]
    for n in range(3):
        book.client(query(f"select {n}"))
        book.server(complete("SELECT 1"), ready())
    processor.poll()  # the first batch checkpoints (none was written yet)
    assert len(written) == 1
    for n in range(3, 9):
        book.client(query(f"select {n}"))
        book.server(complete("SELECT 1"), ready())
    processor.poll()  # full batches commit; the checkpoint waits for its interval
    assert len(store.events("statement")) >= 8
    assert len(written) == 1
    book.client(query("select 9"))
    book.server(complete("SELECT 1"), ready())
    processor.poll(flush=True)
    assert len(written) == 2
    assert checkpoint_path(tmp_path, book.journal.run).exists()


# --- the same rows as the tracker --------------------------------------------------------


def _script_simple(book: JournalBook) -> None:
    book.client(query("select * from t"))
    book.server(data_row(b"1"), data_row(b"2"), complete("SELECT 2"), ready())
    book.client(query(f"select '{SECRET}'; select 2"))
    book.server(complete("SELECT 1"), complete("SELECT 1"), ready())


def _script_pipeline(book: JournalBook) -> None:
    book.client(
        parse("insert into t values ($1)", "s1", (23,)),
        bind([b"1"], statement="s1"),
        execute(),
        bind([SECRET.encode()], statement="s1"),
        execute(),
        sync(),
    )
    book.server(PARSE_COMPLETE, encode_message(ord("2"), b""))
    book.server(complete("INSERT 0 1"), encode_message(ord("2"), b""), error("23505"), ready())


def _script_copy_and_cancel(book: JournalBook) -> None:
    book.client(query("copy t from stdin"))
    book.server(encode_message(ord("G"), b"\x00\x00\x00"))
    book.client(copy_data(b"1\n"), copy_data(b"22\n"), copy_done())
    book.server(complete("COPY 2"), ready())
    book.client(query("select pg_sleep(10)"))
    book.server(error("57014", "canceling statement due to user request"), ready())


def _script_incomplete(book: JournalBook) -> None:
    book.client(query("delete from t"))


@pytest.mark.parametrize(
    "script",
    [_script_simple, _script_pipeline, _script_copy_and_cancel, _script_incomplete],
    ids=["simple", "pipeline", "copy-and-cancel", "incomplete"],
)
def test_the_reader_gives_the_rows_the_tracker_gives(tmp_path: Path, script: object) -> None:
    store = Rows()
    book = JournalBook(tmp_path)
    script(book)  # type: ignore[operator]
    direct = book.end()
    _processor(tmp_path, book.journal.run, store).poll(flush=True)
    assert [e.kind for e in store.events()] == (
        ["connection_start"] + ["statement"] * len(direct) + ["connection_end"]
    )
    assert store.events("statement") == direct
    assert direct and all(SECRET not in repr(e) for e in direct)


def test_a_malformed_tapped_message_is_skipped_and_the_next_statement_still_recorded(
    tmp_path: Path,
) -> None:
    store = Rows()
    book = JournalBook(tmp_path)
    # A FunctionCall too short to hold its oid: the server will reject it; the
    # audit must neither raise nor lose what follows.
    book.audit.on_client(book.client_tracker.feed(encode_message(ord("F"), b"\x00")), 1)
    book.audit.on_client(book.client_tracker.feed(query("select 1")), 2)
    book.audit.on_server(book.server_tracker.feed(complete("SELECT 1") + ready()), 3)
    _processor(tmp_path, book.journal.run, store).poll(flush=True)
    assert [(e.protocol, e.sql, e.status) for e in store.events("statement")] == [
        ("simple", "select 1", "ok")
    ]


# --- batching ------------------------------------------------------------------------------


def test_full_batches_go_at_once_and_a_partial_one_waits_for_a_flush(tmp_path: Path) -> None:
    store = Rows()
    book = JournalBook(tmp_path)
    for n in range(25):
        book.client(query(f"select {n}"))
        book.server(complete("SELECT 1"), ready())
    processor = _processor(tmp_path, book.journal.run, store, batch_size=10)
    processor._interval = 3600.0  # only a flush may write a partial batch
    processor.poll()
    assert store.batches == [10, 10]
    processor.poll(flush=True)
    assert store.batches == [10, 10, 6]
    assert [e.sql for e in store.events("statement")] == [f"select {n}" for n in range(25)]


def test_the_reader_counts_each_written_batch_for_the_metrics_once(tmp_path: Path) -> None:
    store = Rows()
    book = JournalBook(tmp_path)
    for n in range(25):
        book.client(query(f"select {n}"))
        book.server(complete("SELECT 1"), ready())
    processor = _processor(tmp_path, book.journal.run, store, batch_size=10)
    assert processor.take_stats() is None
    store.failing = True
    with pytest.raises(OSError):
        processor.poll(flush=True)
    assert processor.take_stats() is None  # a failed write counts nothing
    store.failing = False
    processor.poll(flush=True)
    stats = processor.take_stats()
    assert stats is not None
    assert stats.statements == 25
    assert len(stats.batch_seconds) == len(store.batches)
    assert processor.take_stats() is None


def test_a_failed_write_keeps_the_rows_for_the_next_poll(tmp_path: Path) -> None:
    store = Rows()
    book = JournalBook(tmp_path)
    book.client(query("select 1"))
    book.server(complete("SELECT 1"), ready())
    processor = _processor(tmp_path, book.journal.run, store)
    store.failing = True
    with pytest.raises(OSError, match="disk full"):
        processor.poll(flush=True)
    assert processor.committed == (0, 0)
    store.failing = False
    assert processor.poll(flush=True) == book.journal.position
    assert [e.sql for e in store.events("statement")] == ["select 1"]


# --- restarts and crashes ----------------------------------------------------------------


def test_a_restarted_reader_goes_on_from_its_checkpoint_and_loses_nothing(
    tmp_path: Path,
) -> None:
    store = Rows()
    book = JournalBook(tmp_path)
    book.client(parse("select $1::int", "p1", (23,)), sync())
    book.server(PARSE_COMPLETE, ready())
    book.client(query("select 'before'"))
    book.server(complete("SELECT 1"), ready())
    book.client(query("update t set x = 1"))  # its outcome comes after the restart
    first = _processor(tmp_path, book.journal.run, store)
    first.poll(flush=True)
    # The first reader dies here; a new one starts from the checkpoint.
    book.server(complete("UPDATE 3"), ready())
    book.client(bind([b"7"], statement="p1"), execute(), sync())
    book.server(encode_message(ord("2"), b""), complete("SELECT 1"), ready())
    book.end()
    _processor(tmp_path, book.journal.run, store).poll(flush=True)
    assert [(e.sql, e.status, e.command_tag) for e in store.events("statement")] == [
        ("select 'before'", "ok", "SELECT 1"),
        ("update t set x = 1", "ok", "UPDATE 3"),
        ("select $1::int", "ok", "SELECT 1"),
    ]
    assert [p.value for p in store.events("statement")[2].parameters or ()] == ["7"]
    assert SECRET.encode() not in b"".join(p.read_bytes() for p in tmp_path.iterdir())


def test_a_run_whose_daemon_died_is_closed_with_its_statements_incomplete(
    tmp_path: Path,
) -> None:
    store = Rows()
    book = JournalBook(tmp_path)
    book.client(query("select 1"))
    book.server(complete("SELECT 1"), ready())
    book.client(query("delete from t where pg_sleep(3) is not null"))
    crashed = book.journal.run
    # The daemon is killed: a torn record at the end, nothing more.
    with segment_path(tmp_path, crashed, 0).open("ab") as f:
        f.write(encode_chunk(KIND_CLIENT, 1, book.now, [TappedMessage(81, b"x\x00")])[:12])
    later = Journal(tmp_path)
    processor = _processor(tmp_path, later.run, store)
    assert processor.recover() == 1
    events = store.events()
    assert [(e.kind, e.sql, e.status) for e in events] == [
        ("connection_start", None, None),
        ("statement", "select 1", "ok"),
        ("statement", "delete from t where pg_sleep(3) is not null", "incomplete"),
        ("connection_end", None, None),
    ]
    assert events[2].error_message == CRASH_ERROR
    assert events[3].detail == {"end_reason": "gateway_crash"}
    assert list_runs(tmp_path) == [later.run]


def test_while_the_store_refuses_a_full_batch_nothing_more_is_read(tmp_path: Path) -> None:
    store = Rows()
    book = JournalBook(tmp_path)
    for n in range(20):
        book.client(query(f"select {n}"))
        book.server(complete("SELECT 1"), ready())
    processor = _processor(tmp_path, book.journal.run, store, batch_size=4)
    store.failing = True
    for _ in range(3):
        with pytest.raises(OSError, match="disk full"):
            processor.poll()
    held = processor.position
    assert held < book.journal.position
    store.failing = False
    processor.poll(flush=True)
    assert [e.sql for e in store.events("statement")] == [f"select {n}" for n in range(20)]


def test_a_record_that_cannot_be_written_ends_the_connection_and_no_other(
    tmp_path: Path,
) -> None:
    store = Rows()
    book = JournalBook(tmp_path)
    book.client(query("select 1"))
    book.server(complete("SELECT 1"), ready())
    # The disk is full for the next write (ENOSPC, as /dev/full answers).
    os.dup2(os.open("/dev/full", os.O_WRONLY), book.journal._fd)
    refused = book.audit.on_client([TappedMessage(ord("Q"), b"delete from t\x00")], book.now)
    assert refused is UNRECORDABLE
    assert (refused.reason, refused.sqlstate) == ("audit_unavailable", SqlState.SYSTEM_ERROR)
    # The connection stays refused even once the disk has room again ...
    assert book.audit.on_client([TappedMessage(ord("Q"), b"select 2\x00")], book.now) is not None
    # ... while a new connection is journaled in a new segment.
    other = ConnectionAudit(book.writer, "s1", "c2")
    other.connection_event("connection_start", {}, now_ns=book.now)
    assert other.on_client([TappedMessage(ord("Q"), b"select 3\x00")], book.now) is None
    assert book.journal.segment == 1
    _processor(tmp_path, book.journal.run, store).poll(flush=True)
    assert [e.sql for e in store.events("statement")] == ["select 1"]

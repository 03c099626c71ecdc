"""Review paging over a counting in-memory trail: every page costs the same.

The trail is a fake of the store's two review reads that counts the reads and
the rows each returns, so the cost of page 1 and page 766 is compared by what
the store would do, not by a clock.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import gateway.audit.review as review_module
from gateway.audit.review import (
    EXPORT_COLUMNS,
    Cursor,
    ExportEncoder,
    ExportWriter,
    Page,
    count_sessions,
    export_stream,
    iter_sessions,
    paging,
    read_page,
    record_page,
    session_ids_oldest_first,
    statement_page,
    type_name,
)
from gateway.errors import InvalidRequest

SESSION = "5e55104a" * 4


@dataclass(frozen=True)
class Record:
    seq: int
    kind: str


class CountingTrail:
    """A session's records in memory, counting the store reads made of it."""

    def __init__(self, kinds: Iterable[str]) -> None:
        self.records = [Record(seq, kind) for seq, kind in enumerate(kinds, start=1)]
        self.reads = 0
        self.rows = 0

    def list_audit(
        self,
        session_id: str,
        *,
        after_seq: int = 0,
        limit: int = 1000,
        kinds: Iterable[str] | None = None,
    ) -> list[Record]:
        assert session_id == SESSION
        wanted = None if kinds is None else set(kinds)
        found = [
            r for r in self.records if r.seq > after_seq and (wanted is None or r.kind in wanted)
        ][:limit]
        self.reads += 1
        self.rows += len(found)
        return found

    def count_audit(self, session_id: str, kind: str | None = None) -> int:
        assert session_id == SESSION
        self.reads += 1
        return sum(1 for r in self.records if kind is None or r.kind == kind)


def busy_session(connections: int, statements_each: int) -> list[str]:
    kinds: list[str] = []
    for _ in range(connections):
        kinds += ["connection_start", *["statement"] * statements_each, "connection_end"]
    return kinds


def test_a_statement_page_costs_the_same_reads_and_rows_for_page_1_and_page_766() -> None:
    trail = CountingTrail(busy_session(connections=3, statements_each=51_100))
    first = statement_page(trail, SESSION, 1, 200)
    cost_first = (trail.reads, trail.rows)
    trail.reads = trail.rows = 0
    far = statement_page(trail, SESSION, 766, 200)
    assert (trail.reads, trail.rows) == cost_first
    assert trail.rows <= 200 + 6 + 1  # the page, the connection records, the density probe
    statements = [r for r in trail.records if r.kind == "statement"]
    assert first.records == statements[:200]
    assert far.records == statements[765 * 200 : 766 * 200]


def test_statement_pages_skip_the_connection_records_between_them() -> None:
    trail = CountingTrail(busy_session(connections=4, statements_each=3))
    statements = [r for r in trail.records if r.kind == "statement"]
    pages = [statement_page(trail, SESSION, n, 5).records for n in (1, 2, 3)]
    assert pages == [statements[0:5], statements[5:10], statements[10:12]]
    assert statement_page(trail, SESSION, 4, 5).records == []


def test_a_trail_with_a_hole_in_its_seqs_is_still_paged_right() -> None:
    trail = CountingTrail(busy_session(connections=2, statements_each=4))
    del trail.records[2]  # seq 3 is gone, as after tampering
    statements = [r for r in trail.records if r.kind == "statement"]
    assert statement_page(trail, SESSION, 2, 3).records == statements[3:6]


def test_a_record_page_is_its_seq_range_read_once() -> None:
    trail = CountingTrail(busy_session(connections=2, statements_each=10))
    page = record_page(trail, SESSION, 3, 5)
    assert [r.seq for r in page.records] == [11, 12, 13, 14, 15]
    assert (trail.reads, trail.rows) == (1, 5)
    assert page.next_cursor == Cursor(SESSION, 15)


def test_the_next_cursor_reads_on_where_the_page_ended_and_the_last_page_has_none() -> None:
    trail = CountingTrail(busy_session(connections=1, statements_each=4))
    first = read_page(trail, SESSION, after_seq=0, limit=4, kinds=("statement",))
    assert first.next_cursor is not None
    token = first.next_cursor.encode()
    rest = read_page(
        trail,
        SESSION,
        after_seq=Cursor.decode(token, SESSION).after_seq,
        limit=4,
        kinds=("statement",),
    )
    assert [r.seq for r in first.records + rest.records] == [2, 3, 4, 5]
    assert rest.next_cursor is None


def test_a_cursor_of_another_session_or_garbage_is_refused() -> None:
    token = Cursor(SESSION, 41).encode()
    assert Cursor.decode(token, SESSION) == Cursor(SESSION, 41)
    with pytest.raises(InvalidRequest, match="another session"):
        Cursor.decode(token, "0" * 32)
    for garbage in ("41", "c1.!!!", "c1." + "YWJj", ""):
        with pytest.raises(InvalidRequest, match="not a cursor"):
            Cursor.decode(garbage, SESSION)


def test_paging_counts_pages_and_refuses_one_past_the_last() -> None:
    view = paging(7, 3, 3)
    assert (view.page, view.pages, view.total) == (3, 3, 7)
    assert paging(0, 1, 200).pages == 1
    with pytest.raises(InvalidRequest, match="page 4 is past the last page: 7 statements"):
        paging(7, 4, 3)


def test_type_names_are_postgres_names_or_the_oid() -> None:
    assert [type_name(oid) for oid in (23, 3802, 12345, None)] == ["int4", "jsonb", "oid12345", "?"]


def test_the_export_keeps_the_exact_data_in_fixed_columns() -> None:
    record = {
        "session_id": SESSION,
        "seq": 2,
        "kind": "statement",
        "sql": "select '\x1b[2J', 'a,\"b\"'\n",
        "parameters": [{"index": 1, "value": "é"}],
        "detail": None,
    }
    out = io.StringIO()
    writer = ExportWriter(out, "csv")
    writer.write([record])
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0] == list(EXPORT_COLUMNS)
    row = dict(zip(rows[0], rows[1], strict=True))
    assert row["sql"] == record["sql"]
    assert json.loads(row["parameters"]) == record["parameters"]
    assert row["detail"] == "" and row["rows"] == ""

    lines = io.StringIO()
    ExportWriter(lines, "jsonl").write([record, record])
    assert [json.loads(line) for line in lines.getvalue().splitlines()] == [record, record]
    with pytest.raises(InvalidRequest):
        ExportWriter(io.StringIO(), "xml")


# --- the streamed export ---------------------------------------------------------------


def as_json(record: Record) -> dict[str, Any]:
    return {"session_id": SESSION, "seq": record.seq, "kind": record.kind, "sql": 'a,"b"\n'}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_streamed_export_is_the_writers_output_read_and_sent_a_page_at_a_time(fmt: str) -> None:
    trail = CountingTrail(busy_session(connections=2, statements_each=4))  # 12 records
    events: list[str] = []

    async def read(session_id: str, after_seq: int) -> Page[Record]:
        events.append(f"read after {after_seq}")
        return read_page(trail, session_id, after_seq=after_seq, limit=5)

    async def collect() -> list[bytes]:
        chunks = []
        async for chunk in export_stream(ExportEncoder(fmt), [SESSION], read, as_json):
            events.append(f"sent {len(chunks)}")
            chunks.append(chunk)
        return chunks

    chunks = asyncio.run(collect())

    expected = io.StringIO()
    ExportWriter(expected, fmt).write([as_json(r) for r in trail.records])
    assert b"".join(chunks) == expected.getvalue().encode()
    # Keyed reads, each page sent before the next is read: memory holds one page.
    reads_and_sends = [e for e in events if not (fmt == "csv" and e == "sent 0")]
    first = 1 if fmt == "csv" else 0
    assert reads_and_sends == [
        "read after 0",
        f"sent {first}",
        "read after 5",
        f"sent {first + 1}",
        "read after 10",
        f"sent {first + 2}",
    ]


def test_an_export_of_no_session_is_the_csv_header_alone_or_nothing() -> None:
    async def read(session_id: str, after_seq: int) -> Page[Record]:
        raise AssertionError("no session, no read")

    async def collect(fmt: str) -> bytes:
        return b"".join([c async for c in export_stream(ExportEncoder(fmt), [], read, as_json)])

    assert asyncio.run(collect("csv")) == (",".join(EXPORT_COLUMNS) + "\n").encode()
    assert asyncio.run(collect("jsonl")) == b""
    with pytest.raises(InvalidRequest, match="format"):
        ExportEncoder("xml")


# --- the session walk ------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    id: str
    started_at: datetime


class SessionTable:
    """The store's session list: newest first by (started_at, id), since/until, limit."""

    def __init__(self, sessions: list[Session]) -> None:
        self.sessions = sorted(sessions, key=lambda s: (s.started_at, s.id), reverse=True)
        self.reads = 0

    def list_sessions(
        self, *, limit: int = 100, since: datetime | None = None, until: datetime | None = None
    ) -> list[Session]:
        self.reads += 1
        return [
            s
            for s in self.sessions
            if (since is None or s.started_at >= since) and (until is None or s.started_at < until)
        ][:limit]


def test_the_session_walk_pages_by_start_time_and_keeps_sessions_sharing_one() -> None:
    t0 = datetime(2024, 6, 1, tzinfo=UTC)
    # Pages of 3 end inside runs of sessions that started in the same microsecond.
    starts = [0, 1, 1, 2, 3, 3, 4, 4]
    table = SessionTable(
        [Session(f"s{n}", t0 + timedelta(microseconds=at)) for n, at in enumerate(starts)]
    )

    walked = [s.id for s in iter_sessions(table, page_size=3)]

    assert walked == [s.id for s in table.sessions]
    assert session_ids_oldest_first(table) == walked[::-1]
    assert count_sessions(table) == len(starts)
    since = t0 + timedelta(microseconds=1)
    until = t0 + timedelta(microseconds=3)
    window = session_ids_oldest_first(table, since=since, until=until)
    assert window == [s.id for s in reversed(table.sessions) if since <= s.started_at < until]


@pytest.mark.parametrize("run", [3, 4, 7])
def test_the_session_walk_keeps_a_page_or_more_of_sessions_started_in_one_microsecond(
    run: int,
) -> None:
    t0 = datetime(2024, 6, 1, tzinfo=UTC)
    starts = [0, *[1] * run, 2, 3]
    table = SessionTable(
        [Session(f"s{n}", t0 + timedelta(microseconds=at)) for n, at in enumerate(starts)]
    )
    assert [s.id for s in iter_sessions(table, page_size=3)] == [s.id for s in table.sessions]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT n.nspname FROM pg_catalog.pg_namespace n ORDER BY 1",
        "select c.oid, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace",
        "SELECT table_name FROM information_schema.tables",
        "WITH t AS (SELECT * FROM pg_type) SELECT * FROM t",
        "SET extra_float_digits = 3",
        "SHOW search_path",
        "select version()",
        "SELECT pg_catalog.current_schema() AS schema;",
    ],
)
def test_what_tools_send_on_their_own_is_a_catalogue_query(sql: str) -> None:
    assert review_module.is_catalogue_query(sql)


@pytest.mark.parametrize(
    "sql",
    [
        None,
        "",
        "SELECT 1",
        "INSERT INTO copy SELECT * FROM pg_class",
        "DELETE FROM pg_catalog_backup",
        "select version(), * from accounts",
    ],
)
def test_a_statement_of_ones_own_is_not_a_catalogue_query(sql: str | None) -> None:
    assert not review_module.is_catalogue_query(sql)


def test_a_session_cursor_round_trips_and_refuses_what_it_did_not_issue() -> None:
    cursor = review_module.SessionCursor(datetime(2024, 5, 1, 12, 0, 0, 5, tzinfo=UTC), "ab" * 16)
    assert review_module.SessionCursor.decode(cursor.encode()) == cursor
    for bad in ("", "s1.!!", "c1.YWJj", "s1." + "bm90IGEgdGltZXxhYmM"):
        with pytest.raises(InvalidRequest, match="cursor"):
            review_module.SessionCursor.decode(bad)

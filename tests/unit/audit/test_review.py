"""Review paging over a counting in-memory trail: every page costs the same.

The trail is a fake of the store's two review reads that counts the reads and
the rows each returns, so the cost of page 1 and page 766 is compared by what
the store would do, not by a clock.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from gateway.audit.review import (
    EXPORT_COLUMNS,
    Cursor,
    ExportWriter,
    paging,
    read_page,
    record_page,
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

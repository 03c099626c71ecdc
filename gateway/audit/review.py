"""Reviewing a session's audit trail: pages by keyed cursor, export formats, type names.

Role: the review logic that the control API serves and the CLI (and a future web
page) share, so none of them computes paging, export columns or type names on
its own. Sans-store: it works on records passed in, or over :class:`AuditTrail`,
the two store reads it needs (the store implements it; this package never
imports the store).

Invariants:

* Every page costs the same, whatever its number. A page is read by a keyed
  cursor (session, ``seq > after_seq``), never by skipping earlier pages.
  Records of a session are numbered ``seq`` 1, 2, 3 ... (the store appends at
  its head and refuses deletes), so page *N* of the whole trail is the seq range
  ``((N-1)*size, N*size]``, and statement *k* sits at *k* plus the number of
  connection records before it, which :func:`statement_page` counts from the
  connection records alone (two per connection). A trail whose seqs are not
  dense (tampered; ``pam audit verify`` names it) is still answered correctly,
  by walking it here, server-side.
* A cursor is opaque to clients and names its session: one from another
  session is refused, not silently applied.
* Export rows keep the exact data (no escaping: that is the terminal's job);
  the CSV columns are fixed, in order, because a SIEM maps them by position.
* An export streams: :func:`export_stream` reads one page by keyed cursor,
  encodes it and hands its bytes on before reading the next, so memory is
  bounded by a page, never by the trail. The reads go through the caller's
  ``read`` (the API runs them on the store's thread); nothing here waits on I/O.
* The session list is ordered newest first by (start time, id); a page of it
  is read after a :class:`SessionCursor` (the last row of the page before).
  :func:`iter_sessions` walks it by ``until`` here, server-side, so a client
  asks once (an export of a window, the count ``verify`` reports).
* :func:`is_catalogue_query` is the one classification of the statements
  database tools send on their own (catalogue reads, session settings), which
  a timeline may hide; it only hides, never drops a record.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import math
import re
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any, Final, Generic, Protocol, TypeVar

from gateway.audit.records import AUDIT_KINDS
from gateway.errors import InvalidRequest

#: The largest page the API answers (``limit``/``page_size``).
API_MAX_PAGE: Final = 10_000
#: Statements per page of ``pam sessions show``.
DEFAULT_PAGE_SIZE: Final = 200
#: Records per read when streaming an export.
EXPORT_PAGE: Final = 1_000

STATEMENT: Final = "statement"
#: The kinds that are not statements (connection start and end): a few per
#: connection, read to place a statement page without reading the statements.
_OTHER_KINDS: Final = tuple(sorted(AUDIT_KINDS - {STATEMENT}))

#: The CSV export's columns, in order. Fixed: a SIEM maps columns by position.
EXPORT_COLUMNS: Final = (
    "session_id",
    "seq",
    "kind",
    "occurred_at",
    "recorded_at",
    "connection_id",
    "requester",
    "resource_name",
    "account_name",
    "protocol",
    "statement_name",
    "portal_name",
    "sql",
    "parameters",
    "command_tag",
    "rows",
    "status",
    "sqlstate",
    "error_message",
    "duration_ms",
    "copy_direction",
    "copy_bytes",
    "detail",
    "prev_hash",
    "hash",
)
#: Columns holding structured values; the CSV carries them as compact JSON text.
JSON_COLUMNS: Final = frozenset({"parameters", "detail"})
EXPORT_FORMATS: Final = ("jsonl", "csv")
#: The media type each export format is served as.
EXPORT_MEDIA_TYPES: Final = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}
#: Response header of a streamed export: how many sessions it covers (known
#: before the first byte, unlike the record count, which the reader counts).
EXPORT_SESSIONS_HEADER: Final = "Pam-Export-Sessions"

#: Common type OIDs (PostgreSQL's pg_type.dat) so a types-only trail reads ``$1::int4``.
TYPE_NAMES: Final = {
    16: "bool",
    17: "bytea",
    20: "int8",
    21: "int2",
    23: "int4",
    25: "text",
    114: "json",
    700: "float4",
    701: "float8",
    1042: "bpchar",
    1043: "varchar",
    1082: "date",
    1083: "time",
    1114: "timestamp",
    1184: "timestamptz",
    1700: "numeric",
    2950: "uuid",
    3802: "jsonb",
}

_CURSOR_PREFIX: Final = "c1."
_SESSION_CURSOR_PREFIX: Final = "s1."

#: What a database tool reads on its own: the system catalogues...
_CATALOGUE_RELATION: Final = re.compile(
    r"\b(?:pg_catalog\s*\.|information_schema\s*\.|pg_(?:class|namespace|type|attribute|attrdef"
    r"|proc|database|roles|user|authid|auth_members|settings|index|indexes|constraint"
    r"|description|shdescription|extension|tables|views|matviews|am|amop|collation|trigger"
    r"|inherits|depend|tablespace|range|enum|event_trigger|policy|publication|rewrite"
    r"|sequence|sequences|language|opclass|operator|cast|stat_\w+|foreign_\w+)\b)",
    re.IGNORECASE,
)
#: ...and the session set-up and probes it sends around them.
_SESSION_CHATTER: Final = re.compile(
    r"\s*(?:(?:SET|SHOW|RESET|DISCARD|DEALLOCATE)\b|SELECT\s+(?:pg_catalog\s*\.\s*)?"
    r"(?:version|current_schema|current_schemas|current_database|current_user|session_user"
    r"|pg_backend_pid)\s*\([^;]*\)\s*(?:AS\s+\w+\s*)?;?\s*$)",
    re.IGNORECASE,
)
_READS: Final = re.compile(r"\s*(?:SELECT|WITH)\b", re.IGNORECASE)


def is_catalogue_query(sql: str | None) -> bool:
    """Whether *sql* is what a database tool (a GUI, psql's backslash commands,
    a driver) sends on its own: a read of the system catalogues, or session
    set-up and probes (``SET``, ``SHOW``, ``SELECT version()``). A read that
    names a catalogue counts, whatever else it reads; a change never does."""
    if not sql:
        return False
    if _SESSION_CHATTER.match(sql):
        return True
    return _READS.match(sql) is not None and _CATALOGUE_RELATION.search(sql) is not None


def type_name(type_oid: int | None) -> str:
    """``int4`` for 23, ``oid12345`` for a type without a common name, ``?`` for none."""
    if not type_oid:
        return "?"
    return TYPE_NAMES.get(type_oid, f"oid{type_oid}")


# --- the port ------------------------------------------------------------------------


class TrailRecord(Protocol):
    """What paging needs of a record: its place and its kind."""

    @property
    def seq(self) -> int: ...

    @property
    def kind(self) -> str: ...


R = TypeVar("R", bound=TrailRecord)
R_co = TypeVar("R_co", bound=TrailRecord, covariant=True)


class AuditTrail(Protocol[R_co]):
    """The store reads review needs, keyed by seq (the store implements them)."""

    def list_audit(
        self,
        session_id: str,
        *,
        after_seq: int = 0,
        limit: int = 1000,
        kinds: Iterable[str] | None = None,
    ) -> Sequence[R_co]:
        """A session's records with ``seq > after_seq``, in seq order, at most *limit*."""
        ...

    def count_audit(self, session_id: str, kind: str | None = None) -> int:
        """How many records the session's trail holds (of *kind*, if given)."""
        ...


# --- paging --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Paging:
    """Where a page sits: ``page`` ``None`` means every page (``--all``)."""

    page: int | None
    page_size: int
    pages: int
    total: int


def paging(total: int, page: int | None, page_size: int, *, what: str = "statements") -> Paging:
    """The page count for *total* records; a page past the last is refused."""
    pages = max(1, math.ceil(total / page_size))
    if page is not None and page > pages:
        raise InvalidRequest(
            f"page {page} is past the last page: {total} {what} make {pages}"
            f" page{'s' if pages != 1 else ''} of {page_size}"
        )
    return Paging(page, page_size, pages, total)


def _token(prefix: str, text: str) -> str:
    """*text* as an opaque cursor token of the kind *prefix* names."""
    return prefix + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _token_text(token: str, prefix: str, bad: InvalidRequest) -> str:
    """The text in a cursor *token* of the kind *prefix* names; raises *bad* when
    it is not one."""
    if not token.startswith(prefix):
        raise bad
    body = token[len(prefix) :]
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the next page starts: the records of *session_id* after *after_seq*."""

    session_id: str
    after_seq: int

    def encode(self) -> str:
        return _token(_CURSOR_PREFIX, f"{self.session_id}:{self.after_seq}")

    @classmethod
    def decode(cls, token: str, session_id: str) -> Cursor:
        """The cursor *token* encodes, which must name *session_id*."""
        bad = InvalidRequest(
            "cursor: not a cursor this gateway issued",
            hint="pass the next_cursor of the previous page unchanged",
        )
        named, _, after = _token_text(token, _CURSOR_PREFIX, bad).rpartition(":")
        if not named or not after.isdigit():
            raise bad
        if named != session_id:
            raise InvalidRequest("cursor: it belongs to another session")
        return cls(named, int(after))


@dataclass(frozen=True, slots=True)
class SessionCursor:
    """Where the next page of the session list starts: after the session that
    started at *started_at* with id *session_id* (newest first)."""

    started_at: datetime
    session_id: str

    def encode(self) -> str:
        raw = f"{self.started_at.astimezone(UTC).isoformat()}|{self.session_id}"
        return _token(_SESSION_CURSOR_PREFIX, raw)

    @classmethod
    def decode(cls, token: str) -> SessionCursor:
        bad = InvalidRequest(
            "cursor: not a session list cursor this gateway issued",
            hint="follow the page's own 'next' link",
        )
        when, _, session_id = _token_text(token, _SESSION_CURSOR_PREFIX, bad).partition("|")
        try:
            started_at = datetime.fromisoformat(when)
        except ValueError:
            raise bad from None
        if not session_id or started_at.tzinfo is None:
            raise bad
        return cls(started_at, session_id)


@dataclass(frozen=True, slots=True)
class Page(Generic[R]):
    """One page of records, and the cursor of the next (``None``: this is the last)."""

    records: list[R]
    next_cursor: Cursor | None


def read_page(
    trail: AuditTrail[R],
    session_id: str,
    *,
    after_seq: int,
    limit: int,
    kinds: Sequence[str] | None = None,
) -> Page[R]:
    """The records after a cursor: one keyed read, whatever the position."""
    records = list(trail.list_audit(session_id, after_seq=after_seq, limit=limit, kinds=kinds))
    following = Cursor(session_id, records[-1].seq) if len(records) == limit else None
    return Page(records, following)


def record_page(trail: AuditTrail[R], session_id: str, page: int, page_size: int) -> Page[R]:
    """Page *page* of the whole trail (every kind): the seq range of that page."""
    return read_page(trail, session_id, after_seq=(page - 1) * page_size, limit=page_size)


def statement_page(trail: AuditTrail[R], session_id: str, page: int, page_size: int) -> Page[R]:
    """Statements ``(page-1)*page_size+1 ..`` of *session_id*, in seq order.

    Reads the connection records to find the seq of the page's first statement,
    then that page: the same reads for page 1 and page 766. *session_id* must
    be a full id (the API resolves prefixes first).
    """
    index = (page - 1) * page_size + 1
    if _is_dense(trail, session_id):
        start = _nth_seq_not_in(_other_seqs(trail, session_id), index)
        return read_page(
            trail, session_id, after_seq=start - 1, limit=page_size, kinds=(STATEMENT,)
        )
    return _walked_statement_page(trail, session_id, index, page_size)


def _is_dense(trail: AuditTrail[R], session_id: str) -> bool:
    """Whether the trail's seqs are exactly 1..count.

    *count* distinct positive seqs with none above *count* are 1..count. A
    record appended between the two reads makes this false (the walk answers),
    never wrongly true: appends only ever go above the head.
    """
    count = trail.count_audit(session_id)
    return not trail.list_audit(session_id, after_seq=count, limit=1)


def _other_seqs(trail: AuditTrail[R], session_id: str) -> Iterator[int]:
    """Seqs of the session's non-statement records, ascending, read lazily."""
    after = 0
    while True:
        chunk = trail.list_audit(
            session_id, after_seq=after, limit=API_MAX_PAGE, kinds=_OTHER_KINDS
        )
        for record in chunk:
            yield record.seq
        if len(chunk) < API_MAX_PAGE:
            return
        after = chunk[-1].seq


def _nth_seq_not_in(taken: Iterable[int], n: int) -> int:
    """The *n*-th positive integer (1-based) not in the ascending *taken*."""
    candidate = n
    for seq in taken:
        if seq > candidate:
            break
        candidate += 1
    return candidate


def _walked_statement_page(
    trail: AuditTrail[R], session_id: str, index: int, page_size: int
) -> Page[R]:
    # Only for a trail with holes in its seqs: skip statements server-side, in
    # the largest reads the store allows; the client still gets one page.
    after_seq = 0
    skip = index - 1
    while skip > 0:
        want = min(skip, API_MAX_PAGE)
        chunk = trail.list_audit(session_id, after_seq=after_seq, limit=want, kinds=(STATEMENT,))
        if len(chunk) < want:
            return Page([], None)
        after_seq = chunk[-1].seq
        skip -= want
    return read_page(trail, session_id, after_seq=after_seq, limit=page_size, kinds=(STATEMENT,))


# --- export --------------------------------------------------------------------------


def csv_row(record: Mapping[str, Any]) -> list[Any]:
    """One record (as the API's JSON) as a CSV row of :data:`EXPORT_COLUMNS`."""
    row: list[Any] = []
    for column in EXPORT_COLUMNS:
        value = record.get(column)
        if column in JSON_COLUMNS:
            value = (
                None
                if value is None
                else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
            )
        row.append("" if value is None else value)
    return row


def jsonl_line(record: Mapping[str, Any]) -> str:
    """One record (as the API's JSON) as one JSON line, exactly as the API has it."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"


class ExportWriter:
    """Writes audit records as JSON lines or CSV (with its fixed header) to *out*."""

    def __init__(self, out: IO[str], fmt: str) -> None:
        if fmt not in EXPORT_FORMATS:
            raise InvalidRequest(f"format: {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
        self._out = out
        self._csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(EXPORT_COLUMNS)
        self.records = 0

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        if self._csv is not None:
            self._csv.writerows(csv_row(r) for r in records)
        else:
            self._out.writelines(jsonl_line(r) for r in records)
        self._out.flush()
        self.records += len(records)


class ExportEncoder:
    """An :class:`ExportWriter` into a buffer: the bytes of each page, for a stream.

    Built before the response starts, so a wrong format is refused as an error
    answer, not a cut stream. The CSV header is the first :meth:`take`.
    """

    def __init__(self, fmt: str) -> None:
        self._buffer = io.StringIO()
        self._writer = ExportWriter(self._buffer, fmt)
        self.media_type: str = EXPORT_MEDIA_TYPES[fmt]

    def encode(self, records: Sequence[Mapping[str, Any]]) -> bytes:
        """*records* (as the API's JSON) in the export format, UTF-8."""
        self._writer.write(records)
        return self.take()

    def take(self) -> bytes:
        """What was written since the last take (the CSV header, at first)."""
        text = self._buffer.getvalue()
        self._buffer.seek(0)
        self._buffer.truncate()
        return text.encode()


async def export_stream(
    encoder: ExportEncoder,
    session_ids: Sequence[str],
    read: Callable[[str, int], Awaitable[Page[R]]],
    as_json: Callable[[R], Mapping[str, Any]],
) -> AsyncIterator[bytes]:
    """Every record of each session in turn, in seq order, one encoded page at a time.

    ``read(session_id, after_seq)`` is one keyed read (:func:`read_page` on the
    store's thread); *as_json* turns a record into the API's JSON, which the
    export keeps exactly. A page's bytes are yielded before the next is read.
    """
    header = encoder.take()
    if header:
        yield header
    for session_id in session_ids:
        after_seq = 0
        while True:
            page = await read(session_id, after_seq)
            if page.records:
                yield encoder.encode([as_json(r) for r in page.records])
            if page.next_cursor is None:
                break
            after_seq = page.next_cursor.after_seq


# --- the session list ----------------------------------------------------------------


class SessionRow(Protocol):
    """What the session walk needs of a session."""

    @property
    def id(self) -> str: ...

    @property
    def started_at(self) -> datetime: ...


S_co = TypeVar("S_co", bound=SessionRow, covariant=True)


class SessionList(Protocol[S_co]):
    """The store's session list: newest first, ``since`` inclusive, ``until`` exclusive."""

    def list_sessions(
        self,
        *,
        limit: int = 100,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Sequence[S_co]: ...


def iter_sessions(
    store: SessionList[SessionRow],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    page_size: int = API_MAX_PAGE,
) -> Iterator[SessionRow]:
    """Every session started in ``[since, until)``, newest first, read a page at a time.

    The list has no cursor; it is walked by ``until`` (exclusive start time).
    Sessions sharing the oldest start time of a page are read again with the
    next page and skipped by id; that read asks for as many more rows, so it
    always has room for *page_size* new ones, however many sessions started in
    the same microsecond. Blocking: run it on the store's thread.
    """
    boundary: datetime | None = None
    at_boundary: set[str] = set()
    while True:
        limit = page_size + len(at_boundary)
        page = store.list_sessions(limit=limit, since=since, until=until)
        fresh = [s for s in page if s.id not in at_boundary]
        yield from fresh
        if len(page) < limit or not fresh:
            return
        oldest = page[-1].started_at
        if oldest != boundary:
            at_boundary = set()
        boundary = oldest
        at_boundary |= {s.id for s in page if s.started_at == oldest}
        until = oldest + timedelta(microseconds=1)


def session_ids_oldest_first(
    store: SessionList[SessionRow],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[str]:
    """The ids of the sessions started in ``[since, until)``, oldest first (an export's order).

    Ids only, never records, are collected. Blocking: run it on the store's thread.
    """
    ids = [s.id for s in iter_sessions(store, since=since, until=until)]
    ids.reverse()
    return ids


def count_sessions(store: SessionList[SessionRow]) -> int:
    """How many sessions the store holds (what ``verify`` reports it checked)."""
    return sum(1 for _ in iter_sessions(store))

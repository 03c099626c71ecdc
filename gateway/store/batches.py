"""The trail's sealed batches in the database: insert, read back, search, count.

Role: the part of :class:`~gateway.store.audit.AuditStore` that knows the
``audit_batches`` table (chain version 3, :mod:`gateway.audit.batch`). Functions
of a connection, called inside the store's transactions.

Invariants:

* A batch is inserted whole or not at all, in the transaction that read the
  session's head; PostgreSQL takes them with COPY, SQLite with one multi-row
  INSERT.
* Reading trusts a batch's index columns (seq and time range, kinds) only to
  skip it; what is returned comes from the records themselves. A batch whose
  records cannot be read is a :class:`~gateway.errors.StoreError` naming the
  session and seqs, with the hint to verify.
* Text search folds ASCII case only, on both backends (what SQLite's ``lower``
  did for the rows of chain version 2): the bytes of a batch are searched first,
  so only batches that hold the text are decoded.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError
from sqlalchemy import (
    ColumnElement,
    Connection,
    LargeBinary,
    Select,
    exists,
    func,
    literal,
    or_,
    select,
)

from gateway.audit.batch import (
    BATCH_CHAIN_VERSION,
    KIND_BITS,
    PARAMETER_FIELDS,
    BatchFormatError,
    SealedBatch,
    decode_records,
    field_position,
    record_fields,
)
from gateway.audit.chain import RECORD_DIGEST_BYTES
from gateway.audit.records import datetime_micros, micros_datetime
from gateway.errors import StoreError
from gateway.store.models import AuditRecord
from gateway.store.schema import audit_batches, sessions

if TYPE_CHECKING:
    from gateway.store.rows import AnyRow

__all__ = [
    "FAILED_STATUS_BYTES",
    "batch_head",
    "count_batch_errors",
    "count_batch_records",
    "holds_failed_statement",
    "insert_batches",
    "iter_session_batches",
    "search_batches",
    "session_batch_records",
    "statement_counts",
]

#: Batches fetched per round trip when reading in order.
_STREAM_BATCHES: Final = 16

#: The columns a batch is inserted with, in SealedBatch order plus the store's own.
_COLUMNS: Final = (*SealedBatch._fields, "chain_version", "recorded_at")
#: Where a statement record holds its SQL and status.
_SQL: Final = field_position("statement", "sql")
_STATUS: Final = field_position("statement", "status")


def insert_batches(conn: Connection, batches: Sequence[SealedBatch], recorded_at: Any) -> None:
    """Insert *batches* (PostgreSQL: COPY; SQLite: one multi-row INSERT)."""
    if not batches:
        return
    rows = [(*batch, BATCH_CHAIN_VERSION, recorded_at) for batch in batches]
    if conn.dialect.name == "postgresql":
        driver = conn.connection.driver_connection
        assert driver is not None
        names = ", ".join(f'"{name}"' for name in _COLUMNS)
        with (
            driver.cursor() as cursor,
            cursor.copy(f"COPY audit_batches ({names}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)
        return
    one = "(" + ", ".join("?" * len(_COLUMNS)) + ")"
    conn.exec_driver_sql(
        f"INSERT INTO audit_batches ({', '.join(_COLUMNS)}) VALUES " + ", ".join([one] * len(rows)),
        tuple(itertools.chain.from_iterable(rows)),
    )


def batch_head(conn: Connection, session_id: str) -> tuple[int, str] | None:
    """(last seq, hash) of the session's last batch, if it has any."""
    row = conn.execute(
        select(audit_batches.c.last_seq, audit_batches.c.hash)
        .where(audit_batches.c.session_id == session_id)
        .order_by(audit_batches.c.first_seq.desc())
        .limit(1)
    ).one_or_none()
    return None if row is None else (int(row.last_seq), str(row.hash))


def _kinds_mask(kinds: Sequence[str] | None) -> int:
    return 0 if kinds is None else sum(KIND_BITS[kind] for kind in set(kinds))


def _batch_query() -> Select[Any]:
    return select(
        audit_batches,
        sessions.c.resource_name,
        sessions.c.account_name,
        sessions.c.requester,
    ).select_from(audit_batches.join(sessions, audit_batches.c.session_id == sessions.c.id))


def _unreadable(row: AnyRow) -> StoreError:
    return StoreError(
        f"audit records seq {row.first_seq}-{row.last_seq} of session '{row.session_id}'"
        " are unreadable",
        hint="run 'pam audit verify' on the session",
    )


def _records(row: AnyRow) -> list[list[Any]]:
    try:
        return decode_records(row.records)
    except BatchFormatError:
        raise _unreadable(row) from None


def _audit_record(row: AnyRow, index: int, record: Sequence[Any]) -> AuditRecord:
    """Record *index* of batch *row* as the read model.

    Its ``hash`` is its digest, except that the batch's last record shows the
    batch's hash (what the next batch chains to and a seal covers), and its
    ``prev_hash`` is the ``hash`` of the record before it: so records link one
    to the next as rows of chain version 2 do.
    """
    fields = record_fields(record)
    if fields is None:
        raise _unreadable(row)
    digests: bytes = row.digests
    size = RECORD_DIGEST_BYTES
    last = row.last_seq - row.first_seq
    fields["occurred_at"] = micros_datetime(fields["occurred_at"])
    parameters = fields.get("parameters")
    if parameters is not None:
        fields["parameters"] = [dict(zip(PARAMETER_FIELDS, p, strict=False)) for p in parameters]
    prev_hash = row.prev_hash if index == 0 else digests[(index - 1) * size : index * size].hex()
    own = row.hash if index == last else digests[index * size : (index + 1) * size].hex()
    try:
        return AuditRecord(
            **fields,
            session_id=row.session_id,
            recorded_at=row.recorded_at,
            prev_hash=prev_hash,
            hash=own,
            resource_name=row.resource_name,
            account_name=row.account_name,
            requester=row.requester,
        )
    except (ValidationError, TypeError, OverflowError):
        raise StoreError(
            f"audit record seq {fields['seq']} of session '{row.session_id}' is malformed",
            hint="run 'pam audit verify' on the session",
        ) from None


def session_batch_records(
    conn: Connection,
    session_id: str,
    *,
    after_seq: int,
    limit: int,
    kinds: Sequence[str] | None,
) -> list[AuditRecord]:
    """A session's batched records with ``seq > after_seq``, in seq order, at most *limit*."""
    query = _batch_query().where(
        audit_batches.c.session_id == session_id, audit_batches.c.last_seq > after_seq
    )
    mask = _kinds_mask(kinds)
    if mask:
        query = query.where(audit_batches.c.kinds.op("&")(mask) != 0)
    query = query.order_by(audit_batches.c.first_seq).execution_options(yield_per=_STREAM_BATCHES)
    found: list[AuditRecord] = []
    with conn.execute(query) as result:
        for row in result:
            for index, record in enumerate(_records(row)):
                if record[0] <= after_seq or (kinds is not None and record[1] not in kinds):
                    continue
                found.append(_audit_record(row, index, record))
                if len(found) == limit:
                    return found
    return found


def count_batch_records(conn: Connection, session_id: str, kind: str | None) -> int:
    """How many batched records the session holds (of *kind*, if given)."""
    where = audit_batches.c.session_id == session_id
    if kind is None:
        total = audit_batches.c.last_seq - audit_batches.c.first_seq + 1
        return int(
            conn.execute(select(func.coalesce(func.sum(total), 0)).where(where)).scalar_one()
        )
    if kind == "statement":
        total = audit_batches.c.statement_count
        return int(
            conn.execute(select(func.coalesce(func.sum(total), 0)).where(where)).scalar_one()
        )
    query = select(audit_batches).where(where, audit_batches.c.kinds.op("&")(KIND_BITS[kind]) != 0)
    return sum(
        sum(1 for record in _records(row) if record[1] == kind)
        for row in conn.execute(query.execution_options(yield_per=_STREAM_BATCHES))
    )


#: How a failed statement's ``status`` sits in a batch's bytes: the MessagePack
#: string ``"error"`` followed by its ``sqlstate`` field, a 5-character string
#: (``0xa5``) or nil (``0xc0``). UTF-8 text cannot hold ``"error"`` followed by
#: either byte, and a parameter's value is followed by its ``truncated`` flag, so
#: outside a status field these bytes appear only where a text field ends in
#: ``"¥error"`` and the next field starts with one of them: a batch that matches
#: is decoded to count (:func:`count_batch_errors`); a session filter
#: (:func:`holds_failed_statement`) takes the match as it is.
FAILED_STATUS_BYTES: Final = (b"\xa5error\xa5", b"\xa5error\xc0")


def _holds_bytes(conn: Connection, pattern: bytes) -> ColumnElement[bool]:
    """``audit_batches.records`` contains *pattern* (byte-wise, on both backends)."""
    if conn.dialect.name == "postgresql":
        return func.position(literal(pattern, LargeBinary).op("IN")(audit_batches.c.records)) > 0
    return func.instr(audit_batches.c.records, literal(pattern, LargeBinary)) > 0


def _may_hold_failures(conn: Connection) -> ColumnElement[bool]:
    return or_(*(_holds_bytes(conn, pattern) for pattern in FAILED_STATUS_BYTES))


def holds_failed_statement(conn: Connection, session_id: Any) -> ColumnElement[bool]:
    """The session *session_id* (a column or value) has a batch holding a failed statement."""
    return exists().where(audit_batches.c.session_id == session_id, _may_hold_failures(conn))


def count_batch_errors(conn: Connection, session_ids: Sequence[str]) -> dict[str, int]:
    """How many failed statements (status ``error``) the sessions' batches hold;
    only the batches whose bytes may hold one are decoded."""
    counts = dict.fromkeys(session_ids, 0)
    query = select(audit_batches).where(
        audit_batches.c.session_id.in_(session_ids), _may_hold_failures(conn)
    )
    for row in conn.execute(query.execution_options(yield_per=_STREAM_BATCHES)):
        counts[row.session_id] += sum(
            1 for r in _records(row) if r[1] == "statement" and r[_STATUS] == "error"
        )
    return counts


def statement_counts(conn: Connection, session_ids: Sequence[str]) -> dict[str, int]:
    """How many statements the sessions' batches hold (from the index column)."""
    query = (
        select(audit_batches.c.session_id, func.sum(audit_batches.c.statement_count))
        .where(audit_batches.c.session_id.in_(session_ids))
        .group_by(audit_batches.c.session_id)
    )
    found = dict.fromkeys(session_ids, 0)
    found.update({row[0]: int(row[1] or 0) for row in conn.execute(query)})
    return found


def _ascii_folded(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass").lower()


def search_batches(
    conn: Connection,
    text: str | None,
    *,
    where: Sequence[Any],
    since: datetime | None,
    until: datetime | None,
    status: str | None,
    limit: int,
) -> list[AuditRecord]:
    """The newest *limit* batched records that match, newest first.

    *where* holds the conditions on the session (grant, requester, id). Batches
    are read by their latest time, newest first, and the scan stops once no
    batch left can hold a record newer than the *limit* found.
    """
    since_us = None if since is None else datetime_micros(since)
    until_us = None if until is None else datetime_micros(until)
    query = _batch_query().where(*where)
    if since_us is not None:
        query = query.where(audit_batches.c.max_at >= since_us)
    if until_us is not None:
        query = query.where(audit_batches.c.min_at < until_us)
    query = query.order_by(audit_batches.c.max_at.desc(), audit_batches.c.id.desc())
    needle = None if text is None else _ascii_folded(text)
    # A min-heap of the best so far: (occurred_at, batch id, index, row, record).
    best: list[tuple[int, int, int, Any, list[Any]]] = []
    with conn.execute(query.execution_options(yield_per=_STREAM_BATCHES)) as result:
        for row in result:
            if len(best) >= limit and (row.max_at, row.id) < best[0][:2]:
                # Every record left is older than the oldest kept, or as old and in
                # an older batch (ties go to the newer batch): none can get in.
                break
            if needle is not None and needle not in row.records.lower():
                continue
            for index, record in enumerate(_records(row)):
                if not _matches(record, needle, since_us, until_us, status):
                    continue
                entry = (record[2], row.id, index, row, record)
                if len(best) < limit:
                    heapq.heappush(best, entry)
                elif entry[:3] > best[0][:3]:
                    heapq.heapreplace(best, entry)
    best.sort(key=lambda entry: entry[:3], reverse=True)
    return [_audit_record(row, index, record) for _, _, index, row, record in best]


def _matches(
    record: list[Any],
    needle: bytes | None,
    since_us: int | None,
    until_us: int | None,
    status: str | None,
) -> bool:
    at = record[2]
    if (since_us is not None and at < since_us) or (until_us is not None and at >= until_us):
        return False
    if record[1] != "statement":
        return needle is None and status is None
    if status is not None and record[_STATUS] != status:
        return False
    if needle is None:
        return True
    sql = record[_SQL]
    return isinstance(sql, str) and needle in _ascii_folded(sql)


def iter_session_batches(conn: Connection, session_id: str) -> Iterator[AnyRow]:
    """A session's batches in seq order, streamed (for verify)."""
    query = (
        select(audit_batches)
        .where(audit_batches.c.session_id == session_id)
        .order_by(audit_batches.c.first_seq, audit_batches.c.id)
        .execution_options(yield_per=_STREAM_BATCHES)
    )
    yield from conn.execute(query)

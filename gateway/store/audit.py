"""The audit trail: append, read (list, count, search) and verify.

Invariants:

* The trail is append-only: nothing here updates or deletes an ``audit_events``
  row. Each session's records are numbered ``seq`` 1, 2, 3, ... and hash-chained
  under a key derived from the master key (:mod:`gateway.audit.chain`).
* Appends to one session are serialised by a lock on its session row
  (PostgreSQL) or by ``BEGIN IMMEDIATE`` (SQLite), so two processes appending to
  one session still produce one unbroken chain; sessions are locked in id order,
  so two batches never wait on each other in a cycle. An append to an ended
  session re-seals its trail.
* A stored column holds exactly what the chain MACed (the canonical JSON of
  parameters and detail), so verify recomputes the hash from the row alone.
* :meth:`AuditStore.append_audit_rows` is the audit writer's hot path: one pass
  per row, one multi-row INSERT per few hundred rows.
* Verify reads one consistent snapshot and streams it, so memory does not grow
  with the trail and appends are not held up.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError
from sqlalchemy import Connection, func, select

from gateway.audit.batch import SealedBatch, is_encodable, seal_batch
from gateway.audit.chain import CHAIN_VERSION, AuditChain
from gateway.audit.records import AUDIT_KINDS, AUDIT_STATUSES, AuditEvent, EventRow, event_rows
from gateway.audit.verify import ChainProblem, SessionVerifier
from gateway.errors import InvalidRequest, NotFound, StoreError
from gateway.store.batches import (
    count_batch_errors,
    count_batch_records,
    insert_batches,
    iter_session_batches,
    search_batches,
    session_batch_records,
    statement_counts,
)
from gateway.store.models import AuditRecord, SessionCounts
from gateway.store.rows import existing_session_id
from gateway.store.schema import audit_events, connections, sessions
from gateway.store.sealing import row_problems
from gateway.store.trail import TrailStore
from gateway.store.validation import (
    check_choice,
    check_count,
    check_limit,
    check_optional_time,
    check_text,
    row_values,
    stand_in_row,
)

if TYPE_CHECKING:
    from gateway.store.rows import AnyRow

__all__ = ["AuditStore"]


#: Rows fetched per round trip when verify streams a trail.
_AUDIT_STREAM_ROWS: Final = 2000

#: Records per sealed batch at most: a page of review decodes one or two.
_RECORDS_PER_BATCH: Final = 1000

#: Escape character for LIKE patterns built from user text.
_LIKE_ESCAPE: Final = "/"


def _json_value(text: str | None) -> Any:
    """A JSON column's value; the raw text if it no longer parses (verify then
    reports the record as changed instead of failing)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _escape_like(value: str) -> str:
    return (
        value.replace(_LIKE_ESCAPE, _LIKE_ESCAPE * 2)
        .replace("%", _LIKE_ESCAPE + "%")
        .replace("_", _LIKE_ESCAPE + "_")
    )


def _stored_fields(row: AnyRow) -> dict[str, Any]:
    """Rebuild, from a stored row, the mapping :func:`event_fields` made at append."""
    occurred_at: datetime = row.occurred_at
    return {
        "session_id": row.session_id,
        "connection_id": row.connection_id,
        "kind": row.kind,
        "occurred_at": occurred_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "protocol": row.protocol,
        "sql": row.sql,
        "statement_name": row.statement_name,
        "portal_name": row.portal_name,
        "parameters": _json_value(row.parameters),
        "command_tag": row.command_tag,
        "rows": row.rows,
        "status": row.status,
        "sqlstate": row.sqlstate,
        "error_message": row.error_message,
        "duration_ms": None if row.duration_ms is None else float(row.duration_ms),
        "copy_direction": row.copy_direction,
        "copy_bytes": row.copy_bytes,
        "detail": _json_value(row.detail),
    }


def _stored_values(row: AnyRow) -> tuple[Any, ...]:
    """Rebuild, from a stored row, the values :meth:`AuditChain.row_hash` MACed at append."""
    occurred_at: datetime = row.occurred_at
    return (
        row.session_id,
        row.connection_id,
        row.kind,
        occurred_at.astimezone(UTC).isoformat(timespec="microseconds"),
        row.protocol,
        row.sql,
        row.statement_name,
        row.portal_name,
        row.parameters,
        row.command_tag,
        row.rows,
        row.status,
        row.sqlstate,
        row.error_message,
        None if row.duration_ms is None else float(row.duration_ms),
        row.copy_direction,
        row.copy_bytes,
        row.detail,
    )


def _audit_record(row: AnyRow) -> AuditRecord:
    fields = _stored_fields(row)
    fields["occurred_at"] = row.occurred_at
    try:
        return AuditRecord(
            **fields,
            seq=row.seq,
            recorded_at=row.recorded_at,
            prev_hash=row.prev_hash,
            hash=row.hash,
            resource_name=row.resource_name,
            account_name=row.account_name,
            requester=row.requester,
        )
    except ValidationError:
        raise StoreError(
            f"audit record seq {row.seq} of session '{row.session_id}' is malformed",
            hint="run 'pam audit verify' on the session",
        ) from None


def _sealed(
    chain: AuditChain, session_id: str, head: tuple[int, str], bodies: list[tuple[Any, ...]]
) -> list[SealedBatch]:
    """*bodies* as the session's next batches, chained on from *head*.

    Raises ``ValueError`` for text that UTF-8 cannot carry.
    """
    seq, prev_hash = head
    batches = []
    for start in range(0, len(bodies), _RECORDS_PER_BATCH):
        batch = seal_batch(
            chain, session_id, seq + 1, prev_hash, bodies[start : start + _RECORDS_PER_BATCH]
        )
        batches.append(batch)
        seq, prev_hash = batch.last_seq, batch.hash
    return batches


def _encodable_bodies(
    items: list[tuple[int, tuple[Any, ...]]], rows: Sequence[EventRow], substitute_invalid: bool
) -> list[tuple[Any, ...]]:
    """The bodies of *items*, each that UTF-8 cannot carry replaced by a stand-in
    (or refused with :class:`InvalidRequest` outside the writer's mode)."""
    bodies = []
    for position, body in items:
        if not is_encodable(body):
            problem = InvalidRequest(f"audit event {position} holds text that is not valid Unicode")
            stand_in = stand_in_row(position, rows[position], problem)
            if not substitute_invalid or stand_in is None or not is_encodable(stand_in[1:]):
                raise problem
            body = stand_in[1:]
        bodies.append(body)
    return bodies


class AuditStore(TrailStore):
    """Appending to, reading and verifying the sessions' audit trails."""

    def append_audit(self, events: Sequence[AuditEvent]) -> int:
        """Append *events* to their sessions' trails, in order; returns how many.

        All or nothing: an invalid event (:class:`InvalidRequest`) or an unknown
        session (:class:`NotFound`) refuses the whole batch, and a database failure
        raises :class:`StoreError` (the caller decides whether to fail closed).
        Each event gets the next ``seq`` of its session and is chained to the
        record before it, whoever wrote that one. Appending to an ended session
        is allowed (late events) and re-seals its trail.
        """
        return self.append_audit_rows(event_rows(events))

    def append_audit_rows(
        self,
        rows: Sequence[EventRow],
        *,
        substitute_invalid: bool = False,
        numbered: list[tuple[int, int]] | None = None,
    ) -> int:
        """:meth:`append_audit` for events as :data:`~gateway.audit.records.EventRow`
        tuples, as the audit writer process receives them.

        *substitute_invalid* (the audit writer's mode): an event the store cannot
        take is recorded as a stand-in instead of refusing the batch, which would
        be refused again on every retry while the sessions wait. The stand-in keeps
        the event's session, connection, kind and time, has status ``incomplete``
        (for a statement) and says in ``error_message`` which field was refused
        (never its value). Events that cannot be attributed even so (no valid
        session, connection or time, or a session the store does not hold) are
        left out; the return value, the number written, then falls short.

        *numbered*, if given, receives ``(position in rows, seq)`` for each event
        written (the trail's export numbers what it sends with it).
        """
        # (position in rows, (session_id, *record body)) of each event to write
        prepared: list[tuple[int, tuple[Any, ...]]] = []
        for position, row in enumerate(rows):
            try:
                prepared.append((position, row_values(position, row)))
            except InvalidRequest as exc:
                if not substitute_invalid:
                    raise
                stand_in = stand_in_row(position, row, exc)
                if stand_in is not None:
                    prepared.append((position, stand_in))
        if not prepared:
            return 0
        recorded_at = self._timestamp_param(self._now())
        by_session: dict[str, list[tuple[int, tuple[Any, ...]]]] = {}
        for position, values in prepared:
            by_session.setdefault(values[0], []).append((position, values[1:]))
        heads: dict[str, tuple[int, str]] = {}
        written = 0
        with self._transaction(write=True) as conn:
            # Locked in id order, so two batches never wait on each other in a
            # cycle; the lock orders every append to a session (and its end).
            found = conn.execute(
                select(sessions.c.id, sessions.c.ended_at)
                .where(sessions.c.id.in_(sorted(by_session)))
                .order_by(sessions.c.id)
                .with_for_update()
            ).all()
            known = {row.id: row.ended_at is not None for row in found}
            sealed: list[SealedBatch] = []
            for session_id, items in sorted(by_session.items()):
                if session_id not in known:
                    if not substitute_invalid:
                        raise NotFound(f"session '{session_id}' not found")
                    continue
                head = self._chain_head(conn, session_id)
                bodies = [body for _, body in items]
                try:
                    batches = _sealed(self._chain, session_id, head, bodies)
                except ValueError:  # text UTF-8 cannot carry, such as a lone surrogate
                    bodies = _encodable_bodies(items, rows, substitute_invalid)
                    batches = _sealed(self._chain, session_id, head, bodies)
                sealed += batches
                seq, prev_hash = batches[-1].last_seq, batches[-1].hash
                heads[session_id] = (seq, prev_hash)
                if numbered is not None:
                    first = seq - len(items) + 1
                    numbered += ((p, first + i) for i, (p, _) in enumerate(items))
                written += len(bodies)
            insert_batches(conn, sealed, recorded_at)
            for session_id, is_ended in known.items():
                if is_ended:
                    conn.execute(
                        sessions.update()
                        .where(sessions.c.id == session_id)
                        .values(**self._seal_values(session_id, heads[session_id]))
                    )
        self._remember_heads(heads)
        return written

    def list_audit(
        self,
        session_id: str,
        *,
        after_seq: int = 0,
        limit: int = 1000,
        kinds: Iterable[str] | None = None,
    ) -> list[AuditRecord]:
        """A session's records with ``seq > after_seq``, in seq order (one page).

        *session_id* may be a unique prefix. *kinds* keeps only those kinds. Page
        with ``after_seq=records[-1].seq``.
        """
        check_count("after_seq", after_seq)
        check_limit(limit)
        wanted = self._check_kinds(kinds)
        with self._transaction(write=False) as conn:
            full_id = existing_session_id(conn, session_id)
            # A trail begun before chain version 3 has its first records as rows.
            query = (
                self._audit_query()
                .where(audit_events.c.session_id == full_id, audit_events.c.seq > after_seq)
                .order_by(audit_events.c.seq, audit_events.c.id)
                .limit(limit)
            )
            if wanted is not None:
                query = query.where(audit_events.c.kind.in_(wanted))
            records = [_audit_record(r) for r in conn.execute(query)]
            if len(records) < limit:
                records += session_batch_records(
                    conn,
                    full_id,
                    after_seq=max(after_seq, records[-1].seq if records else 0),
                    limit=limit - len(records),
                    kinds=wanted,
                )
        return records

    def count_audit(self, session_id: str, kind: str | None = None) -> int:
        """How many records a session's trail holds (of *kind*, if given)."""
        check_choice("kind", kind, AUDIT_KINDS)
        with self._transaction(write=False) as conn:
            full_id = existing_session_id(conn, session_id)
            query = (
                select(func.count())
                .select_from(audit_events)
                .where(audit_events.c.session_id == full_id)
            )
            if kind is not None:
                query = query.where(audit_events.c.kind == kind)
            rows = int(conn.execute(query).scalar_one())
            return rows + count_batch_records(conn, full_id, kind)

    def session_counts(self, session_ids: Sequence[str]) -> dict[str, SessionCounts]:
        """Connections, statements and failed statements (status ``error``) of
        each session (full ids), in a few queries for the lot: a page of the
        session list."""
        ids = list(dict.fromkeys(session_ids))
        if not ids:
            return {}
        with self._transaction(write=False) as conn:
            opened = self._grouped(conn, connections.c.session_id, ids)
            statements = statement_counts(conn, ids)
            errors = count_batch_errors(conn, ids)
            # A trail begun before chain version 3 has its first records as rows.
            row_statements = self._grouped(
                conn, audit_events.c.session_id, ids, audit_events.c.kind == "statement"
            )
            row_errors = self._grouped(
                conn,
                audit_events.c.session_id,
                ids,
                audit_events.c.kind == "statement",
                audit_events.c.status == "error",
            )
        return {
            i: SessionCounts(
                connections=opened[i],
                statements=statements[i] + row_statements[i],
                errors=errors[i] + row_errors[i],
            )
            for i in ids
        }

    @staticmethod
    def _grouped(conn: Connection, column: Any, ids: list[str], *where: Any) -> dict[str, int]:
        """Rows per session id of *column*'s table (that match *where*)."""
        query = select(column, func.count()).where(column.in_(ids), *where).group_by(column)
        found = dict.fromkeys(ids, 0)
        found.update({row[0]: int(row[1]) for row in conn.execute(query)})
        return found

    def search_audit(
        self,
        text: str | None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        resource: str | None = None,
        account: str | None = None,
        requester: str | None = None,
        session_id: str | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Records across sessions, newest first.

        *text* is a substring of the SQL, ignoring the case of ASCII letters (``%``
        and ``_`` are literal characters); ``None`` matches every record, with or
        without SQL. *since* (inclusive) and *until* (exclusive) bound
        ``occurred_at``; *resource*, *account*, *requester* and *status* match
        exactly; *session_id* may be a unique prefix.
        """
        check_text("text", text, required=False)
        since = check_optional_time("since", since)
        until = check_optional_time("until", until)
        check_choice("status", status, AUDIT_STATUSES)
        check_limit(limit)
        where: list[Any] = []
        if resource is not None:
            where.append(sessions.c.resource_name == resource)
        if account is not None:
            where.append(sessions.c.account_name == account)
        if requester is not None:
            where.append(sessions.c.requester == requester)
        query = self._audit_query().where(*where)
        if text is not None:
            pattern = "%" + _escape_like(text) + "%"
            query = query.where(
                func.lower(audit_events.c.sql).like(func.lower(pattern), escape=_LIKE_ESCAPE)
            )
        if since is not None:
            query = query.where(audit_events.c.occurred_at >= since)
        if until is not None:
            query = query.where(audit_events.c.occurred_at < until)
        if status is not None:
            query = query.where(audit_events.c.status == status)
        query = query.order_by(audit_events.c.occurred_at.desc(), audit_events.c.id.desc())
        with self._transaction(write=False) as conn:
            if session_id is not None:
                full_id = existing_session_id(conn, session_id)
                where.append(sessions.c.id == full_id)
                query = query.where(audit_events.c.session_id == full_id)
            found = [_audit_record(r) for r in conn.execute(query.limit(limit))]
            found += search_batches(
                conn, text, where=where, since=since, until=until, status=status, limit=limit
            )
        # Stable: each part is newest first already, so ties keep their order.
        found.sort(key=lambda record: record.occurred_at, reverse=True)
        return found[:limit]

    def verify_audit(self, session_id: str | None = None) -> list[ChainProblem]:
        """Recompute the hash chain of one session (id or unique prefix) or of all.

        Returns every problem found, each naming its session and record; an empty
        list means every trail checked is intact. Reads one consistent snapshot
        and streams the records, so memory does not grow with the trail.
        """
        problems: list[ChainProblem] = []
        with self._transaction(write=False, snapshot=True) as conn:
            session_query = select(
                sessions.c.id,
                sessions.c.ended_at,
                sessions.c.audit_count,
                sessions.c.audit_head,
                sessions.c.audit_seal,
            ).order_by(sessions.c.id)
            if session_id is not None:
                session_query = session_query.where(
                    sessions.c.id == existing_session_id(conn, session_id)
                )
            for end in conn.execute(session_query).all():
                verifier = SessionVerifier(self._chain, end.id)
                self._feed_rows(conn, verifier)
                for batch in iter_session_batches(conn, end.id):
                    verifier.feed_batch(batch)
                problems.extend(self._finish(verifier, end))
                problems.extend(
                    row_problems(self._chain, conn, end.id, verifier.started_connections)
                )
        return problems

    @staticmethod
    def _feed_rows(conn: Connection, verifier: SessionVerifier) -> None:
        """Feed the session's records of chain versions 1 and 2 (one row each)."""
        rows = conn.execute(
            select(audit_events)
            .where(audit_events.c.session_id == verifier.session_id)
            .order_by(audit_events.c.seq, audit_events.c.id)
            .execution_options(yield_per=_AUDIT_STREAM_ROWS)
        )
        for row in rows:
            if row.chain_version == CHAIN_VERSION:
                # Hashed over its columns; the fields only name it in a report.
                values, fields = _stored_values(row), {"kind": row.kind, "sql": row.sql}
            else:
                values, fields = (), _stored_fields(row)
            verifier.feed(
                row.id,
                row.seq,
                row.prev_hash,
                row.hash,
                fields,
                version=row.chain_version,
                values=values,
            )

    @staticmethod
    def _finish(verifier: SessionVerifier, end: AnyRow | None) -> list[ChainProblem]:
        if end is None:
            # The foreign key makes this impossible unless it was bypassed.
            return verifier.finish(ended=False, count=None, head=None, seal=None)
        return verifier.finish(
            ended=end.ended_at is not None,
            count=end.audit_count,
            head=end.audit_head,
            seal=end.audit_seal,
        )

    @staticmethod
    def _check_kinds(kinds: Iterable[str] | None) -> list[str] | None:
        if kinds is None:
            return None
        if isinstance(kinds, str):
            kinds = [kinds]
        wanted = list(kinds)
        for kind in wanted:
            check_choice("kinds", kind, AUDIT_KINDS)
        return wanted

    @staticmethod
    def _audit_query() -> Any:
        return select(
            audit_events,
            sessions.c.resource_name,
            sessions.c.account_name,
            sessions.c.requester,
        ).select_from(audit_events.join(sessions, audit_events.c.session_id == sessions.c.id))

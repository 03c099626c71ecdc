"""Pairing client statements with server outcomes, in protocol order.

Sans-IO: :class:`StatementTracker` is fed the messages the relay tapped from each
direction (in the order the relay saw them) and returns finished statements as
:data:`~gateway.audit.records.EventRow` tuples. It decodes only Query, Parse,
Bind, Execute, FunctionCall, Close, Sync and CopyDone/CopyFail from the client
and CommandComplete, ErrorResponse, EmptyQueryResponse, PortalSuspended,
FunctionCallResponse, Copy*Response and ReadyForQuery from the server
(PostgreSQL 15 docs, 55.2.2 "Simple Query", 55.2.3 "Extended Query", 55.2.5
"COPY Operations", 55.7 "Message Formats").

How outcomes pair (55.2.3): the server answers the client's messages in order.
A per-connection FIFO holds the messages that expect an outcome (Query, Parse,
Execute, FunctionCall, Sync). CommandComplete / PortalSuspended /
EmptyQueryResponse finish the oldest Execute (or accumulate into the current
Query); ParseComplete retires the oldest Parse; ErrorResponse fails the oldest
outstanding entry and, in the extended protocol, everything the client sent
after it up to Sync is *skipped*, as the server skips it; ReadyForQuery closes
the batch. NoticeResponse, NotificationResponse and ParameterStatus are
asynchronous and never pair with anything (they are not even tapped).

Every Execute is its own record, with the parameters of the Bind that created
its portal: ``$10`` stays parameter 10, every Execute of the unnamed portal
counts, a prepared statement run many times records each run.

The tracker keeps the pairing; reading the fields of a tapped body is in
:mod:`gateway.audit.decoding` and the entries it keeps between a message and its
outcome are in :mod:`gateway.audit.pending` (both imported by name: no extra
call per message).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from typing import Literal

from gateway.audit.decoding import (
    INT16,
    UINT32,
    ParameterRow,
    body_text,
    decode_parameters,
    read_cstring,
    rows_from_tag,
)
from gateway.audit.pending import (
    EXECUTE_OR_QUERY,
    KIND_EXECUTE,
    KIND_FUNCTION,
    KIND_PARSE,
    KIND_QUERY,
    KIND_SYNC,
    PROTOCOLS,
    SYNC_ENTRY,
    Pending,
    Portal,
    Prepared,
)
from gateway.audit.records import (
    MAX_BIGINT,
    SQLSTATE_PATTERN,
    AuditStatus,
    EventRow,
)
from gateway.audit.redaction import MASK, Redactor
from gateway.protocol.constants import BackendType, FrontendType
from gateway.protocol.framing import TappedMessage
from gateway.protocol.messages import parse_error_fields
from gateway.protocol.sqlstate import SqlState

ParameterMode = Literal["values", "types", "none"]

#: Client message types the audit needs to see (bodies copied, capped).
CLIENT_TAP = frozenset(
    {
        FrontendType.QUERY,
        FrontendType.PARSE,
        FrontendType.BIND,
        FrontendType.EXECUTE,
        FrontendType.FUNCTION_CALL,
        FrontendType.CLOSE,
        FrontendType.SYNC,
        FrontendType.COPY_DONE,
        FrontendType.COPY_FAIL,
    }
)
#: Client messages only counted: COPY FROM STDIN data.
CLIENT_MEASURE = frozenset({FrontendType.COPY_DATA})
SERVER_TAP = frozenset(
    {
        BackendType.COMMAND_COMPLETE,
        BackendType.ERROR_RESPONSE,
        BackendType.EMPTY_QUERY_RESPONSE,
        BackendType.PORTAL_SUSPENDED,
        BackendType.FUNCTION_CALL_RESPONSE,
        BackendType.PARSE_COMPLETE,
        BackendType.COPY_IN_RESPONSE,
        BackendType.COPY_OUT_RESPONSE,
        BackendType.COPY_BOTH_RESPONSE,
        BackendType.READY_FOR_QUERY,
    }
)
#: Server messages only counted: result rows and COPY TO STDOUT data.
SERVER_MEASURE = frozenset({BackendType.DATA_ROW, BackendType.COPY_DATA})

QUERY_CANCELED = SqlState.QUERY_CANCELED
_NO_EVENTS: tuple[EventRow, ...] = ()
# Message types as plain ints, for the dispatch on every tapped message.
_QUERY_TYPE = int(FrontendType.QUERY)
_PARSE_TYPE = int(FrontendType.PARSE)
_BIND_TYPE = int(FrontendType.BIND)
_EXECUTE_TYPE = int(FrontendType.EXECUTE)
_SYNC_TYPE = int(FrontendType.SYNC)
_CLOSE_TYPE = int(FrontendType.CLOSE)
_FUNCTION_CALL_TYPE = int(FrontendType.FUNCTION_CALL)
_COMMAND_COMPLETE_TYPE = int(BackendType.COMMAND_COMPLETE)
_READY_FOR_QUERY_TYPE = int(BackendType.READY_FOR_QUERY)
_PARSE_COMPLETE_TYPE = int(BackendType.PARSE_COMPLETE)
_ERROR_RESPONSE_TYPE = int(BackendType.ERROR_RESPONSE)
_PORTAL_SUSPENDED_TYPE = int(BackendType.PORTAL_SUSPENDED)
_EMPTY_QUERY_RESPONSE_TYPE = int(BackendType.EMPTY_QUERY_RESPONSE)
_COPY_IN_TYPES = (int(BackendType.COPY_IN_RESPONSE), int(BackendType.COPY_BOTH_RESPONSE))
_COPY_OUT_RESPONSE_TYPE = int(BackendType.COPY_OUT_RESPONSE)
_FUNCTION_CALL_RESPONSE_TYPE = int(BackendType.FUNCTION_CALL_RESPONSE)


#: Parse messages remembered per connection, and the longest one remembered: at
#: most 64 KiB per connection, whatever the client sends.
_PARSE_CACHE_SIZE = 32
_PARSE_CACHE_MAX_BODY = 2048


class StatementTracker:
    """One connection's statement audit: tapped messages in, statement rows out.

    Runs on the event loop for every tapped message, so it builds as little as
    it can: a small pending entry per statement and, once the outcome is in, the
    :data:`~gateway.audit.records.EventRow` tuple the writer sends on as it is.
    """

    def __init__(
        self,
        session_id: str,
        connection_id: str,
        *,
        redactor: Redactor,
        parameter_mode: ParameterMode = "values",
        max_value_bytes: int = 256,
        max_sql_chars: int = 64 * 1024,
    ) -> None:
        self.session_id = session_id
        self.connection_id = connection_id
        self._redactor = redactor
        self._parameter_mode = parameter_mode
        self._max_value_bytes = max_value_bytes
        self._max_sql_chars = max_sql_chars
        self._prepared: dict[str, Prepared] = {}
        #: Parse bodies already decoded and redacted (see _parse)
        self._parsed: dict[bytes, tuple[str, Prepared]] = {}
        self._portals: dict[str, Portal] = {}
        self._pending: deque[Pending] = deque()
        self._failed = False
        self._client_bytes = 0
        self._server_messages = 0
        self._events: list[EventRow] = []

    # --- client side ----------------------------------------------------------------

    def client(self, message: TappedMessage, now_ns: int) -> None:
        # One flat dispatch on purpose (as server's): a method per message type
        # would add a call to every tapped message; the rarer ones have their own.
        mtype, body, truncated, _, self._client_bytes = message
        if mtype == _QUERY_TYPE:
            self._pending.append(
                Pending(
                    KIND_QUERY,
                    now_ns,
                    sql=self._clean_sql(body_text(body), truncated),
                    client_bytes_at=self._client_bytes,
                )
            )
        elif mtype == _EXECUTE_TYPE:
            # Most clients run the unnamed portal: skip decoding an empty name.
            portal = "" if body[:1] == b"\x00" else read_cstring(body, 0)[0]
            bound = self._portals.get(portal)
            self._pending.append(
                Pending(KIND_EXECUTE, now_ns, portal=portal, client_bytes_at=self._client_bytes)
                if bound is None
                else Pending(
                    KIND_EXECUTE,
                    now_ns,
                    bound.sql,
                    bound.statement,
                    portal,
                    bound.parameters,
                    self._client_bytes,
                )
            )
        elif mtype == _BIND_TYPE:
            self._on_bind(body)
        elif mtype == _SYNC_TYPE:
            # Nothing of a Sync's entry ever changes: one shared object will do.
            self._pending.append(SYNC_ENTRY)
        elif mtype == _PARSE_TYPE:
            parsed = None if truncated else self._parsed.get(body)
            if parsed is None:
                parsed = self._parse(body, truncated)
            name, prepared = parsed
            self._prepared[name] = prepared
            self._pending.append(
                Pending(
                    KIND_PARSE,
                    now_ns,
                    sql=prepared.sql,
                    statement=name,
                    client_bytes_at=self._client_bytes,
                )
            )
        elif mtype == _FUNCTION_CALL_TYPE:
            self._on_function_call(body, now_ns)
        elif mtype == _CLOSE_TYPE and body:
            name, _ = read_cstring(body, 1)
            (self._prepared if body[0] == ord("S") else self._portals).pop(name, None)
        # CopyDone / CopyFail only update the byte counter read above.

    def _parse(self, body: bytes, truncated: bool) -> tuple[str, Prepared]:
        """Decode and redact a Parse; remembered by its bytes, since clients
        send the same Parse over and over (the unnamed statement, mostly)."""
        name, pos = read_cstring(body, 0)
        sql, pos = read_cstring(body, pos)
        types: tuple[int, ...] = ()
        if pos + 2 <= len(body):
            (count,) = INT16.unpack_from(body, pos)
            avail = min(count, (len(body) - pos - 2) // 4)
            types = struct.unpack_from(f"!{avail}I", body, pos + 2) if avail > 0 else ()
        clean = self._clean_sql(sql, truncated)
        parsed = (name, Prepared(clean, types, Redactor.hides_parameters(clean)))
        if not truncated and len(body) <= _PARSE_CACHE_MAX_BODY:
            if len(self._parsed) >= _PARSE_CACHE_SIZE:
                self._parsed.clear()
            self._parsed[body] = parsed
        return parsed

    def _clean_sql(self, sql: str, truncated: bool) -> str:
        if len(sql) > self._max_sql_chars:
            sql, truncated = sql[: self._max_sql_chars], True
        clean = self._redactor.sql(sql)
        return clean + " …[truncated]" if truncated else clean

    def _on_bind(self, body: bytes) -> None:
        if body[:2] == b"\x00\x00":  # the unnamed portal of the unnamed statement
            portal, statement, pos = "", "", 2
        else:
            portal, pos = read_cstring(body, 0)
            statement, pos = read_cstring(body, pos)
        prepared = self._prepared.get(statement)
        parameters: tuple[ParameterRow, ...] | None = None
        mode = self._parameter_mode
        if mode != "none":
            parameters = decode_parameters(
                body,
                pos,
                prepared.param_types if prepared else (),
                mode == "values",
                self._max_value_bytes,
                self._redactor,
            )
            if parameters and (prepared.hides_parameters if prepared else False):
                parameters = tuple(
                    (index, oid, fmt, MASK if value else value, cut)
                    for index, oid, fmt, value, cut in parameters
                )
        self._portals[portal] = Portal(statement, prepared.sql if prepared else "", parameters)

    def _on_function_call(self, body: bytes, now_ns: int) -> None:
        (oid,) = UINT32.unpack_from(body, 0)
        parameters = None
        mode = self._parameter_mode
        if mode != "none":
            # Same layout as Bind's formats/values, after the function's oid.
            parameters = decode_parameters(
                body, 4, (), mode == "values", self._max_value_bytes, self._redactor
            )
        self._pending.append(
            Pending(
                KIND_FUNCTION,
                now_ns,
                sql=f"-- FunctionCall oid {oid}",
                parameters=parameters,
                client_bytes_at=self._client_bytes,
            )
        )

    # --- server side ------------------------------------------------------------------

    def server(self, message: TappedMessage, now_ns: int) -> Sequence[EventRow]:
        # One flat dispatch on purpose: see client.
        mtype = message.type
        if mtype == _COMMAND_COMPLETE_TYPE:
            entry = self._current(EXECUTE_OR_QUERY)
            if entry is not None:
                tag = body_text(message.body)
                entry.add_tag(tag)
                rows = rows_from_tag(tag)
                if rows is not None:
                    entry.rows = rows if entry.rows is None else min(entry.rows + rows, MAX_BIGINT)
                if entry.kind == KIND_EXECUTE:
                    self._finish(entry, message, now_ns, "ok")
                else:
                    self._note_copy(entry, message)
        elif mtype == _READY_FOR_QUERY_TYPE:
            self._on_ready(now_ns)
        elif mtype == _PARSE_COMPLETE_TYPE:
            entry = self._current((KIND_PARSE,))
            if entry is not None:
                self._pending.remove(entry)
        elif mtype == _ERROR_RESPONSE_TYPE:
            self._on_error(message, now_ns)
        elif mtype == _PORTAL_SUSPENDED_TYPE:
            entry = self._current((KIND_EXECUTE,))
            if entry is not None:
                entry.add_tag("(portal suspended)")
                # The DataRows since the previous tapped server message are this
                # Execute's: the server answers in order.
                entry.rows = message.measured_messages - self._server_messages
                self._finish(entry, message, now_ns, "ok")
        elif mtype == _EMPTY_QUERY_RESPONSE_TYPE:
            entry = self._current(EXECUTE_OR_QUERY)
            if entry is not None:
                entry.add_tag("(empty query)")
                if entry.kind == KIND_EXECUTE:
                    self._finish(entry, message, now_ns, "ok")
        elif mtype in _COPY_IN_TYPES:
            entry = self._current(EXECUTE_OR_QUERY)
            if entry is not None:
                entry.copy = "in"
                entry.client_bytes_at = self._client_bytes
        elif mtype == _COPY_OUT_RESPONSE_TYPE:
            entry = self._current(EXECUTE_OR_QUERY)
            if entry is not None:
                entry.copy = "out"
                entry.server_bytes_at = message.measured_bytes
        elif mtype == _FUNCTION_CALL_RESPONSE_TYPE:
            entry = self._current((KIND_FUNCTION,))
            if entry is not None:
                entry.add_tag("FUNCTION CALL")
        self._server_messages = message.measured_messages
        # Most tapped server messages finish no statement: those get a shared
        # empty tuple rather than a new list.
        events = self._events
        if not events:
            return _NO_EVENTS
        self._events = []
        return events

    def _current(self, kinds: tuple[int, ...]) -> Pending | None:
        """The oldest unfinished entry of ``kinds``, never across a batch boundary."""
        for entry in self._pending:
            if entry.status is not None:
                continue
            if entry.kind in kinds:
                return entry
            if entry.kind != KIND_PARSE:
                return None
        return None

    def _on_error(self, message: TappedMessage, now_ns: int) -> None:
        fields = parse_error_fields(message.body)
        status: AuditStatus = "cancelled" if fields.sqlstate == QUERY_CANCELED else "error"
        # The server's word, kept only when it is a SQLSTATE: the store refuses a
        # record with anything else (and, with it, the whole batch).
        sqlstate = fields.sqlstate if SQLSTATE_PATTERN.fullmatch(fields.sqlstate) else None
        # Server messages can quote the statement's text: same masking as SQL.
        error = self._redactor.sql(fields.message)
        for entry in self._pending:
            if entry.status is not None:
                continue
            if entry.kind == KIND_SYNC:
                break
            self._finish(entry, message, now_ns, status, sqlstate=sqlstate, error=error)
            if entry.kind in (KIND_QUERY, KIND_FUNCTION):
                return
            break
        # Extended protocol: the server skips everything up to the next Sync.
        self._failed = True

    def _on_ready(self, now_ns: int) -> None:
        pending = self._pending
        while pending:
            entry = pending.popleft()
            kind = entry.kind
            if kind == KIND_SYNC:
                break
            if kind in (KIND_QUERY, KIND_FUNCTION):
                if entry.status is None:
                    entry.status, entry.ended_ns = "ok", now_ns
                self._events.append(self._row(entry))
                break
            if kind == KIND_EXECUTE and entry.status is None:
                entry.status = "skipped" if self._failed else "incomplete"
                entry.ended_ns = now_ns
                self._events.append(self._row(entry))
        self._failed = False

    def _finish(
        self,
        entry: Pending,
        message: TappedMessage,
        now_ns: int,
        status: AuditStatus,
        *,
        sqlstate: str | None = None,
        error: str | None = None,
    ) -> None:
        entry.status, entry.ended_ns = status, now_ns
        entry.sqlstate, entry.error = sqlstate, error
        self._note_copy(entry, message)
        if entry.kind in (KIND_EXECUTE, KIND_PARSE):
            # Queries and function calls are recorded at ReadyForQuery, once all
            # their results are in; an Execute (or a failed Parse) is final now.
            self._events.append(self._row(entry))
            self._pending.remove(entry)

    def _note_copy(self, entry: Pending, message: TappedMessage) -> None:
        """Add the bytes of the COPY that just ended to the entry (a Query may hold several)."""
        if entry.copy is None:
            return
        if entry.copy == "out":
            copied = message.measured_bytes - entry.server_bytes_at
        else:
            copied = self._client_bytes - entry.client_bytes_at
        entry.copy_bytes = (entry.copy_bytes or 0) + copied
        entry.server_bytes_at = message.measured_bytes
        entry.client_bytes_at = self._client_bytes

    def _row(self, entry: Pending) -> EventRow:
        started = entry.started_ns
        ended = entry.ended_ns or started
        return (
            self.session_id,
            self.connection_id,
            "statement",
            started // 1000,
            PROTOCOLS[entry.kind],
            entry.sql,
            entry.statement,
            entry.portal,
            entry.parameters,
            entry.tag,
            entry.rows,
            entry.status,
            entry.sqlstate,
            entry.error,
            # Milliseconds to the nearest microsecond, in integer arithmetic
            # (round(x, 3) goes through a decimal conversion, 8x the cost). The
            # relay's clock is the wall clock: never a negative duration when it
            # steps back mid-statement.
            (max(ended - started, 0) + 500) // 1000 / 1000,
            entry.copy,
            entry.copy_bytes,
            None,
        )

    def close(self, now_ns: int) -> Sequence[EventRow]:
        """The connection ended: whatever never got an outcome is ``incomplete``."""
        events = self._events
        for entry in self._pending:
            if entry.kind in (KIND_EXECUTE, KIND_QUERY, KIND_FUNCTION):
                if entry.status is None:
                    entry.status, entry.ended_ns = "incomplete", now_ns
                events.append(self._row(entry))
        self._pending.clear()
        self._events = []
        return events

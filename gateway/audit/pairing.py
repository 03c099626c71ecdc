"""Pairing client statements with server outcomes, in protocol order.

Sans-IO: :class:`StatementTracker` is fed the messages the relay tapped from each
direction (in the order the relay saw them) and returns finished statement
events. It decodes only Query, Parse, Bind, Execute, FunctionCall, Close, Sync
and CopyDone/CopyFail from the client and CommandComplete, ErrorResponse,
EmptyQueryResponse, PortalSuspended, FunctionCallResponse, Copy*Response and
ReadyForQuery from the server (PostgreSQL 15 docs, 55.2.2 "Simple Query", 55.2.3
"Extended Query", 55.2.5 "COPY Operations", 55.7 "Message Formats").

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
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, auto
from typing import Literal

from gateway.audit.records import AuditEvent, Parameter
from gateway.audit.redaction import MASK, Redactor
from gateway.protocol.constants import BackendType, FrontendType
from gateway.protocol.framing import TappedMessage
from gateway.protocol.messages import parse_error_fields

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

QUERY_CANCELED = "57014"
_NO_EVENTS: tuple[AuditEvent, ...] = ()
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")


class _Kind(Enum):
    QUERY = auto()
    PARSE = auto()
    EXECUTE = auto()
    FUNCTION = auto()
    SYNC = auto()


@dataclass(frozen=True, slots=True)
class _Prepared:
    sql: str
    param_types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Portal:
    statement: str
    sql: str
    parameters: tuple[Parameter, ...] | None


@dataclass(slots=True)
class _Pending:
    kind: _Kind
    started_ns: int
    sql: str | None = None
    statement: str | None = None
    portal: str | None = None
    parameters: tuple[Parameter, ...] | None = None
    tags: list[str] = field(default_factory=list)
    rows: int | None = None
    copy: Literal["in", "out"] | None = None
    #: COPY byte counters when this entry's COPY started
    server_bytes_at: int = 0
    client_bytes_at: int = 0
    status: str | None = None
    ended_ns: int = 0
    sqlstate: str | None = None
    error: str | None = None
    copy_bytes: int | None = None


#: Parse messages remembered per connection, and the longest one remembered: at
#: most 64 KiB per connection, whatever the client sends.
_PARSE_CACHE_SIZE = 32
_PARSE_CACHE_MAX_BODY = 2048
#: The one pending entry every Sync shares (see StatementTracker.client).
_SYNC = _Pending(_Kind.SYNC, 0)


def rows_from_tag(tag: str) -> int | None:
    """The row count of a CommandComplete tag ("INSERT 0 5" -> 5, "SELECT 3" -> 3)."""
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() and " " in tag else None


def _cstring(body: bytes, pos: int) -> tuple[str, int]:
    """A NUL-terminated string of a tapped body. The relay copies at most
    ``TAP_LIMIT`` bytes of a message, so a long Query or Bind arrives cut off: the
    string then runs to the end of what was kept (the caller marks it truncated).
    The relay has already forwarded the message, so nothing here may raise."""
    end = body.find(b"\x00", pos)
    if end < 0:
        return body[pos:].decode("utf-8", "replace"), len(body)
    return body[pos:end].decode("utf-8", "replace"), end + 1


class StatementTracker:
    """One connection's statement audit: tapped messages in, statement events out."""

    def __init__(
        self,
        session_id: str,
        connection_id: str,
        *,
        redactor: Redactor,
        parameter_mode: ParameterMode = "values",
        max_value_bytes: int = 256,
        max_sql_chars: int = 64 * 1024,
        wall_clock: Callable[[int], datetime] | None = None,
    ) -> None:
        self.session_id = session_id
        self.connection_id = connection_id
        self._redactor = redactor
        self._parameter_mode = parameter_mode
        self._max_value_bytes = max_value_bytes
        self._max_sql_chars = max_sql_chars
        self._wall_clock = wall_clock or _from_ns
        self._prepared: dict[str, _Prepared] = {}
        #: Parse bodies already decoded and redacted (see _parse)
        self._parsed: dict[bytes, tuple[str, _Prepared]] = {}
        self._portals: dict[str, _Portal] = {}
        self._pending: deque[_Pending] = deque()
        self._failed = False
        self._client_bytes = 0
        self._server_messages = 0
        self._events: list[AuditEvent] = []

    # --- client side ----------------------------------------------------------------

    def client(self, message: TappedMessage, now_ns: int) -> None:
        self._client_bytes = message.measured_bytes
        mtype = message.type
        body = message.body
        if mtype == FrontendType.EXECUTE:
            # Most clients run the unnamed portal: skip decoding an empty name.
            portal = "" if body[:1] == b"\x00" else _cstring(body, 0)[0]
            bound = self._portals.get(portal)
            self._push(
                _Kind.EXECUTE,
                now_ns,
                sql=bound.sql if bound else None,
                statement=bound.statement if bound else None,
                portal=portal,
                parameters=bound.parameters if bound else None,
            )
        elif mtype == FrontendType.BIND:
            self._on_bind(body)
        elif mtype == FrontendType.SYNC:
            # Nothing of a Sync's entry ever changes: one shared object will do.
            self._pending.append(_SYNC)
        elif mtype == FrontendType.PARSE:
            parsed = self._parsed.get(body) if not message.truncated else None
            if parsed is None:
                parsed = self._parse(body, message.truncated)
            name, prepared = parsed
            self._prepared[name] = prepared
            self._push(_Kind.PARSE, now_ns, sql=prepared.sql, statement=name)
        elif mtype == FrontendType.QUERY:
            sql, _ = _cstring(body, 0)
            self._push(_Kind.QUERY, now_ns, sql=self._clean_sql(sql, message.truncated))
        elif mtype == FrontendType.FUNCTION_CALL:
            self._on_function_call(body, now_ns)
        elif mtype == FrontendType.CLOSE and body:
            name, _ = _cstring(body, 1)
            (self._prepared if body[0] == ord("S") else self._portals).pop(name, None)
        # CopyDone / CopyFail only update the byte counter read above.

    def _parse(self, body: bytes, truncated: bool) -> tuple[str, _Prepared]:
        """Decode and redact a Parse; remembered by its bytes, since clients
        send the same Parse over and over (the unnamed statement, mostly)."""
        name, pos = _cstring(body, 0)
        sql, pos = _cstring(body, pos)
        types: tuple[int, ...] = ()
        if pos + 2 <= len(body):
            (count,) = _INT16.unpack_from(body, pos)
            avail = min(count, (len(body) - pos - 2) // 4)
            types = struct.unpack_from(f"!{avail}I", body, pos + 2) if avail > 0 else ()
        parsed = (name, _Prepared(self._clean_sql(sql, truncated), types))
        if not truncated and len(body) <= _PARSE_CACHE_MAX_BODY:
            if len(self._parsed) >= _PARSE_CACHE_SIZE:
                self._parsed.clear()
            self._parsed[body] = parsed
        return parsed

    def _push(
        self,
        kind: _Kind,
        now_ns: int,
        *,
        sql: str | None = None,
        statement: str | None = None,
        portal: str | None = None,
        parameters: tuple[Parameter, ...] | None = None,
    ) -> None:
        self._pending.append(
            _Pending(
                kind,
                now_ns,
                sql=sql,
                statement=statement,
                portal=portal,
                parameters=parameters,
                client_bytes_at=self._client_bytes,
            )
        )

    def _clean_sql(self, sql: str, truncated: bool) -> str:
        if len(sql) > self._max_sql_chars:
            sql, truncated = sql[: self._max_sql_chars], True
        clean = self._redactor.sql(sql)
        return clean + " …[truncated]" if truncated else clean

    def _on_bind(self, body: bytes) -> None:
        portal, pos = _cstring(body, 0)
        statement, pos = _cstring(body, pos)
        prepared = self._prepared.get(statement)
        sql = prepared.sql if prepared else ""
        parameters: tuple[Parameter, ...] | None = None
        if self._parameter_mode != "none":
            parameters = self._decode_parameters(
                body, pos, prepared.param_types if prepared else ()
            )
            if parameters and Redactor.hides_parameters(sql):
                parameters = tuple(
                    Parameter(p.index, p.type_oid, p.format, MASK if p.value else p.value)
                    for p in parameters
                )
        self._portals[portal] = _Portal(statement, sql, parameters)

    def _decode_parameters(
        self, body: bytes, pos: int, types: tuple[int, ...]
    ) -> tuple[Parameter, ...] | None:
        if pos + 2 > len(body):
            return None  # the tap kept too little to know the parameters
        (nformats,) = _INT16.unpack_from(body, pos)
        counts_at = pos + 2 + 2 * max(nformats, 0)
        if counts_at + 2 > len(body):
            return None
        formats = struct.unpack_from(f"!{nformats}h", body, pos + 2) if nformats > 0 else ()
        (count,) = _INT16.unpack_from(body, counts_at)
        pos = counts_at + 2
        values_wanted = self._parameter_mode == "values"
        out: list[Parameter] = []
        limit = self._max_value_bytes
        for i in range(count):
            binary = (formats[0] if nformats == 1 else formats[i] if i < nformats else 0) == 1
            type_oid = types[i] if i < len(types) and types[i] else None
            if pos + 4 > len(body):  # the tap kept only the start of a huge Bind
                out.append(Parameter(i + 1, type_oid, "binary" if binary else "text", None, True))
                continue
            (length,) = _INT32.unpack_from(body, pos)
            pos += 4
            if length < 0:
                out.append(Parameter(i + 1, type_oid, "null", None))
                continue
            raw = body[pos : pos + min(length, limit)]
            cut = length > limit or pos + length > len(body)
            pos += length
            if not values_wanted:
                value = None
            elif binary:
                value = self._redactor.binary(raw)
            else:
                value = self._redactor.value(raw.decode("utf-8", "replace"))
            out.append(Parameter(i + 1, type_oid, "binary" if binary else "text", value, cut))
        return tuple(out)

    def _on_function_call(self, body: bytes, now_ns: int) -> None:
        (oid,) = _UINT32.unpack_from(body, 0)
        parameters = None
        if self._parameter_mode != "none":
            # Same layout as Bind's formats/values, after the function's oid.
            parameters = self._decode_parameters(body, 4, ())
        self._push(_Kind.FUNCTION, now_ns, sql=f"-- FunctionCall oid {oid}", parameters=parameters)

    # --- server side ------------------------------------------------------------------

    def server(self, message: TappedMessage, now_ns: int) -> Sequence[AuditEvent]:
        mtype = message.type
        if mtype == BackendType.COMMAND_COMPLETE:
            entry = self._current((_Kind.EXECUTE, _Kind.QUERY))
            if entry is not None:
                tag, _ = _cstring(message.body, 0)
                entry.tags.append(tag)
                rows = rows_from_tag(tag)
                if rows is not None:
                    entry.rows = (entry.rows or 0) + rows
                if entry.kind is _Kind.EXECUTE:
                    self._finish(entry, message, now_ns, "ok")
                else:
                    self._note_copy(entry, message)
        elif mtype == BackendType.READY_FOR_QUERY:
            self._on_ready(now_ns)
        elif mtype == BackendType.PARSE_COMPLETE:
            entry = self._current((_Kind.PARSE,))
            if entry is not None:
                self._pending.remove(entry)
        elif mtype == BackendType.ERROR_RESPONSE:
            self._on_error(message, now_ns)
        elif mtype == BackendType.PORTAL_SUSPENDED:
            entry = self._current((_Kind.EXECUTE,))
            if entry is not None:
                entry.tags.append("(portal suspended)")
                # The DataRows since the previous tapped server message are this
                # Execute's: the server answers in order.
                entry.rows = message.measured_messages - self._server_messages
                self._finish(entry, message, now_ns, "ok")
        elif mtype == BackendType.EMPTY_QUERY_RESPONSE:
            entry = self._current((_Kind.EXECUTE, _Kind.QUERY))
            if entry is not None:
                entry.tags.append("(empty query)")
                if entry.kind is _Kind.EXECUTE:
                    self._finish(entry, message, now_ns, "ok")
        elif mtype in (BackendType.COPY_IN_RESPONSE, BackendType.COPY_BOTH_RESPONSE):
            entry = self._current((_Kind.EXECUTE, _Kind.QUERY))
            if entry is not None:
                entry.copy = "in"
                entry.client_bytes_at = self._client_bytes
        elif mtype == BackendType.COPY_OUT_RESPONSE:
            entry = self._current((_Kind.EXECUTE, _Kind.QUERY))
            if entry is not None:
                entry.copy = "out"
                entry.server_bytes_at = message.measured_bytes
        elif mtype == BackendType.FUNCTION_CALL_RESPONSE:
            entry = self._current((_Kind.FUNCTION,))
            if entry is not None:
                entry.tags.append("FUNCTION CALL")
        self._server_messages = message.measured_messages
        return self._drain()

    def _current(self, kinds: tuple[_Kind, ...]) -> _Pending | None:
        """The oldest unfinished entry of ``kinds``, never across a batch boundary."""
        for entry in self._pending:
            if entry.status is not None:
                continue
            if entry.kind in kinds:
                return entry
            if entry.kind is not _Kind.PARSE:
                return None
        return None

    def _on_error(self, message: TappedMessage, now_ns: int) -> None:
        fields = parse_error_fields(message.body)
        status = "cancelled" if fields.sqlstate == QUERY_CANCELED else "error"
        # Server messages can quote the statement's text: same masking as SQL.
        error = self._redactor.sql(fields.message)
        for entry in self._pending:
            if entry.status is not None:
                continue
            if entry.kind is _Kind.SYNC:
                break
            self._finish(entry, message, now_ns, status, sqlstate=fields.sqlstate, error=error)
            if entry.kind in (_Kind.QUERY, _Kind.FUNCTION):
                return
            break
        # Extended protocol: the server skips everything up to the next Sync.
        self._failed = True

    def _on_ready(self, now_ns: int) -> None:
        while self._pending:
            entry = self._pending.popleft()
            if entry.kind is _Kind.SYNC:
                break
            if entry.kind in (_Kind.QUERY, _Kind.FUNCTION):
                if entry.status is None:
                    entry.status, entry.ended_ns = "ok", now_ns
                self._events.append(self._event(entry))
                break
            if entry.kind is _Kind.EXECUTE and entry.status is None:
                entry.status = "skipped" if self._failed else "incomplete"
                entry.ended_ns = now_ns
                self._events.append(self._event(entry))
        self._failed = False

    def _finish(
        self,
        entry: _Pending,
        message: TappedMessage,
        now_ns: int,
        status: str,
        *,
        sqlstate: str | None = None,
        error: str | None = None,
    ) -> None:
        entry.status, entry.ended_ns = status, now_ns
        entry.sqlstate, entry.error = sqlstate, error
        self._note_copy(entry, message)
        if entry.kind in (_Kind.EXECUTE, _Kind.PARSE):
            # Queries and function calls are recorded at ReadyForQuery, once all
            # their results are in; an Execute (or a failed Parse) is final now.
            self._events.append(self._event(entry))
            self._pending.remove(entry)

    def _note_copy(self, entry: _Pending, message: TappedMessage) -> None:
        """Add the bytes of the COPY that just ended to the entry (a Query may hold several)."""
        if entry.copy == "out":
            copied = message.measured_bytes - entry.server_bytes_at
        elif entry.copy == "in":
            copied = self._client_bytes - entry.client_bytes_at
        else:
            return
        entry.copy_bytes = (entry.copy_bytes or 0) + copied
        entry.server_bytes_at = message.measured_bytes
        entry.client_bytes_at = self._client_bytes

    def _event(self, entry: _Pending) -> AuditEvent:
        protocol: Literal["simple", "extended", "function_call"] = (
            "simple"
            if entry.kind is _Kind.QUERY
            else "function_call"
            if entry.kind is _Kind.FUNCTION
            else "extended"
        )
        ended = entry.ended_ns or entry.started_ns
        return AuditEvent(
            session_id=self.session_id,
            connection_id=self.connection_id,
            kind="statement",
            occurred_at=self._wall_clock(entry.started_ns),
            protocol=protocol,
            sql=entry.sql,
            statement_name=entry.statement,
            portal_name=entry.portal,
            parameters=entry.parameters,
            command_tag="; ".join(entry.tags) if entry.tags else None,
            rows=entry.rows,
            status=entry.status,  # type: ignore[arg-type]
            sqlstate=entry.sqlstate,
            error_message=entry.error,
            duration_ms=round((ended - entry.started_ns) / 1e6, 3),
            copy_direction=entry.copy,
            copy_bytes=entry.copy_bytes,
        )

    def _drain(self) -> Sequence[AuditEvent]:
        # Called for every tapped server message; most finish no statement, so
        # those get a shared empty tuple rather than a new list.
        events = self._events
        if not events:
            return _NO_EVENTS
        self._events = []
        return events

    def close(self, now_ns: int) -> Sequence[AuditEvent]:
        """The connection ended: whatever never got an outcome is ``incomplete``."""
        for entry in self._pending:
            if entry.kind in (_Kind.EXECUTE, _Kind.QUERY, _Kind.FUNCTION):
                if entry.status is None:
                    entry.status, entry.ended_ns = "incomplete", now_ns
                self._events.append(self._event(entry))
        self._pending.clear()
        return self._drain()


def _from_ns(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)

"""The relay core: one local client paired with one authenticated upstream session.

Forwarding is byte-for-byte: each received chunk is written whole to the other
side, once (one write per read, never a flush per message). Backpressure works
both ways: when a transport's write buffer is over its high-water mark, the
relay stops reading the other side until it drains.

Message boundaries are followed from the 5-byte headers only
(:class:`~gateway.protocol.framing.BoundaryTracker`), so the gateway can end a
connection cleanly: a FATAL ErrorResponse is injected only at a boundary of the
server-to-client stream, never in the middle of a server message.

With an audit tap, a client chunk's tapped messages are recorded BEFORE the
chunk is forwarded: a chunk that cannot be recorded is not forwarded at all,
and the connection ends (nothing the server runs goes unrecorded).

The gateway's own NoticeResponses (:meth:`Relay.notify`: the grant expires
soon) go to the client at a server message boundary too: at once when the
server stream stands at one, else after the first forwarded chunk that ends at
one. With an :class:`IdleLimit`, one timer per connection ends it once it has
been idle that long (:mod:`gateway.net.idle` says what idle is).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import structlog

from gateway.net.idle import AWAITS_READY, READY, IdleWatch
from gateway.protocol import messages
from gateway.protocol.constants import FrontendType
from gateway.protocol.errors import ProtocolError
from gateway.protocol.framing import BoundaryTracker, TappedMessage
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason

log = structlog.get_logger(__name__)

#: Large reads amortise the per-read cost; the server sends up to 8 KB per
#: socket write, TLS records are 16 KB, so 256 KB collects many messages.
READ_SIZE = 256 * 1024
#: Default cap on a single message's declared length (PostgreSQL's own limit
#: for most messages is 1 GB).
DEFAULT_MAX_MESSAGE_LENGTH = (1 << 30) + 64
#: How long a forced end waits for the server's current message to complete.
BOUNDARY_GRACE_SECONDS = 1.0
CLOSE_TIMEOUT_SECONDS = 2.0
#: Tapped bodies are copied up to this size (a huge Bind keeps its first part).
TAP_LIMIT = 64 * 1024
_TERMINATE = frozenset({FrontendType.TERMINATE})


@dataclass(frozen=True, slots=True)
class Termination:
    """Why and how the gateway is ending a live connection."""

    reason: ConnectionEndReason
    sqlstate: str
    message: str
    hint: str | None = None

    def error_response(self) -> bytes:
        return messages.error_response("FATAL", self.sqlstate, self.message, hint=self.hint)


@dataclass(frozen=True, slots=True)
class IdleLimit:
    """How long a connection may stay idle, and the FATAL it gets after that."""

    seconds: float
    termination: Termination


class StatementAudit(Protocol):
    """The audit tap of one connection (see ``gateway.audit.tap``)."""

    @property
    def client_tap(self) -> frozenset[int]: ...

    @property
    def client_measure(self) -> frozenset[int]: ...

    @property
    def server_tap(self) -> frozenset[int]: ...

    @property
    def server_measure(self) -> frozenset[int]: ...

    def on_client(self, tapped: list[TappedMessage], now_ns: int) -> Termination | None:
        """Record a client chunk's tapped messages, before the chunk is forwarded;
        a Termination when they cannot be recorded (the chunk is then dropped)."""
        ...

    def on_server(self, tapped: list[TappedMessage], now_ns: int) -> Termination | None:
        """Record a server chunk's tapped messages (after forwarding); a
        Termination when they cannot be recorded."""
        ...

    @property
    def congested(self) -> bool: ...

    async def wait_for_room(self) -> None: ...


class Relay:
    """Relays bytes between a client and an upstream connection until one ends.

    Built on transports and protocols rather than streams: the handshake uses
    streams, then :meth:`run` swaps in two small protocols so each received
    chunk is framed, forwarded and tapped in one callback, with no task switch
    and no intermediate buffer. Flow control is the transports' own: when the
    transport we write to passes its high-water mark, reading from the other
    side pauses until it drains.
    """

    def __init__(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
        *,
        name: str,
        max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
        audit: StatementAudit | None = None,
        idle: IdleLimit | None = None,
    ) -> None:
        self._client_reader = client_reader
        self._upstream_reader = upstream_reader
        self._client = cast(asyncio.Transport, client_writer.transport)
        self._upstream = cast(asyncio.Transport, upstream_writer.transport)
        self._name = name
        self._audit = audit
        # Only the message types audit (and the idle rule) needs are copied;
        # the rest is skipped by arithmetic on the headers.
        self._from_client = BoundaryTracker(
            max_length=max_message_length,
            tap=_TERMINATE
            | (audit.client_tap if audit else frozenset())
            | (AWAITS_READY if idle else frozenset()),
            measure=audit.client_measure if audit else frozenset(),
            tap_limit=TAP_LIMIT,
        )
        self._from_server = BoundaryTracker(
            max_length=max_message_length,
            tap=(audit.server_tap if audit else frozenset())
            | (frozenset({READY}) if idle else frozenset()),
            measure=audit.server_measure if audit else frozenset(),
            tap_limit=TAP_LIMIT,
        )
        self._idle_limit = idle
        self._idle: IdleWatch | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._clock: Callable[[], float] = time.monotonic
        if idle is not None:
            self._clock = asyncio.get_running_loop().time
            self._idle = IdleWatch(idle.seconds, self._clock())
        #: the gateway's own NoticeResponses waiting for a server message boundary
        self._notices: list[bytes] = []
        self._termination: Termination | None = None
        self._done: asyncio.Future[None] | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._room_task: asyncio.Task[None] | None = None
        #: the client's write buffer is over its high-water mark (between the
        #: client transport's pause_writing and resume_writing)
        self._client_full = False
        #: the client sent its own Terminate: the server needs no second one
        self._client_said_goodbye = False
        #: a client chunk could not be recorded and was dropped: nothing more of
        #: the client's is forwarded, and the server may stand mid-message
        self._client_refused = False
        self._lost = {"client": False, "server": False}
        self._closed: asyncio.Event = asyncio.Event()
        self.bytes_from_client = 0
        self.bytes_from_server = 0
        self.end_reason: ConnectionEndReason | None = None
        self.error: tuple[str, str] | None = None
        #: the SQLSTATE of the FATAL ErrorResponse the relay itself sent (at most
        #: one), if it did
        self.fatal_sqlstate: str | None = None

    def prime(self, to_client: bytes, to_server: bytes) -> None:
        """Forward (and account for) bytes already read during startup."""
        if to_server:
            self._on_client_data(to_server)
        if to_client:
            idle = self._idle
            awaiting = idle.awaiting if idle is not None else 0
            self._on_server_data(to_client)
            if idle is not None:
                # The greeting's ReadyForQuery answers no client message.
                idle.awaiting = awaiting

    def notify(self, notice: bytes) -> None:
        """Send the client *notice* (a NoticeResponse of the gateway's own) at the
        next server message boundary; dropped once the relay is ending."""
        if self._termination is not None or self._is_done():
            return
        if self._from_server.at_boundary and not self._client.is_closing():
            self._client.write(notice)
        else:
            self._notices.append(notice)

    def terminate(self, termination: Termination) -> None:
        """End the relay with a FATAL to the client at the next server message
        boundary (waiting at most ``BOUNDARY_GRACE_SECONDS`` for one)."""
        if self._termination is not None or self._is_done():
            return
        self._termination = termination
        if self._from_server.at_boundary:
            self._finish_termination()
        elif self._done is not None:
            loop = asyncio.get_running_loop()
            self._grace = loop.call_later(BOUNDARY_GRACE_SECONDS, self._finish_termination)

    async def run(self) -> ConnectionEndReason:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        if self.end_reason is not None:
            # Ended before it ran (terminate() at a boundary wrote the FATAL):
            # nothing the handshake left over may follow it.
            self._done.set_result(None)
        if self._idle is not None:
            self._schedule_idle_check(self._idle.limit)
        client_side = _Side(self, from_client=True)
        server_side = _Side(self, from_client=False)
        pending_client, client_eof = _take_over(self._client_reader, self._client, client_side)
        pending_server, server_eof = _take_over(self._upstream_reader, self._upstream, server_side)
        try:
            if pending_client:
                self._on_client_data(pending_client)
            if pending_server:
                self._on_server_data(pending_server)
            if client_eof:
                self._on_eof(from_client=True)
            if server_eof:
                self._on_eof(from_client=False)
            if self._termination is not None and not self._is_done():
                if self._from_server.at_boundary:
                    self._finish_termination()
                else:
                    self._grace = loop.call_later(BOUNDARY_GRACE_SECONDS, self._finish_termination)
            if not self._is_done():
                await self._done
        finally:
            if self._grace is not None:
                self._grace.cancel()
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            if self._room_task is not None:
                self._room_task.cancel()
                await asyncio.gather(self._room_task, return_exceptions=True)
            await self._close()
        if self.end_reason is None:
            self.end_reason = ConnectionEndReason.ERROR
        return self.end_reason

    # --- callbacks from the two protocols -----------------------------------------

    def _on_client_data(self, data: bytes) -> None:
        if self._is_done() or self._client_refused:
            return  # ending: nothing more is forwarded
        try:
            tapped = self._from_client.feed(data)
        except ProtocolError as exc:
            self._forward_valid_prefix(data, from_client=True)
            self._fail_protocol(exc)
            return
        if self._idle is not None:
            self._idle.client_sent(tapped, self._clock())
        if tapped:
            # On record before the server can see it (see the module docstring).
            if self._audit is not None and not self._record_client(tapped):
                return
            self.bytes_from_client += len(data)
            self._upstream.write(data)
            if tapped[-1].type == FrontendType.TERMINATE:  # the client said goodbye
                self._client_said_goodbye = True
                self.end_reason = self.end_reason or ConnectionEndReason.CLIENT_CLOSED
        else:
            self.bytes_from_client += len(data)
            self._upstream.write(data)

    def _record_client(self, tapped: list[TappedMessage]) -> bool:
        """Journal a client chunk's taps; False (and the connection ending, the
        chunk dropped) when they cannot be."""
        assert self._audit is not None
        refusal = self._audit.on_client(tapped, time.time_ns())
        if refusal is None:
            return True
        self._client_refused = True
        if not self._client.is_closing():
            self._client.pause_reading()
        self.terminate(refusal)
        return False

    def _on_server_data(self, data: bytes) -> None:
        if self._is_done():
            return
        tracker = self._from_server
        try:
            tapped = tracker.feed(data)
        except ProtocolError as exc:
            self._forward_valid_prefix(data, from_client=False)
            self._fail_protocol(exc)
            return
        self.bytes_from_server += len(data)
        self._client.write(data)
        if self._idle is not None:
            self._idle.server_sent(tapped, self._clock())
        if self._notices and tracker.at_boundary:
            self._client.write(b"".join(self._notices))
            self._notices.clear()
        audit = self._audit
        if tapped and audit is not None:
            refusal = audit.on_server(tapped, time.time_ns())
            if refusal is not None:
                self.terminate(refusal)
        if self._termination is not None and tracker.at_boundary:
            self._finish_termination()
        elif audit is not None and audit.congested and self._room_task is None:
            # The audit writer is behind: stop reading the server until it
            # catches up, rather than buffer or drop records.
            self._upstream.pause_reading()
            self._room_task = asyncio.get_running_loop().create_task(
                self._wait_for_audit_room(audit), name=f"{self._name}:audit-room"
            )

    async def _wait_for_audit_room(self, audit: StatementAudit) -> None:
        try:
            await audit.wait_for_room()
        finally:
            self._room_task = None
            # A client still full keeps the server paused: its resume_writing
            # resumes it (it comes once, after the one pause_writing).
            if not (self._is_done() or self._upstream.is_closing() or self._client_full):
                self._upstream.resume_reading()

    def _on_eof(self, *, from_client: bool) -> None:
        if from_client:
            self._end(ConnectionEndReason.CLIENT_CLOSED)
        else:
            self._end(ConnectionEndReason.SERVER_CLOSED)

    def _on_lost(self, *, from_client: bool, exc: Exception | None) -> None:
        self._lost["client" if from_client else "server"] = True
        if all(self._lost.values()):
            self._closed.set()
        if exc is not None and self.error is None and not self._is_done():
            self.error = (SqlState.CONNECTION_FAILURE, f"connection failure: {exc}")
            if not from_client and self._from_server.at_boundary:
                # The server's connection broke between messages: the client can
                # still read why, as an ErrorResponse rather than a bare close.
                self._send_fatal(
                    SqlState.CONNECTION_FAILURE,
                    f"pam lost the connection to the database server: {exc}",
                    hint="reconnect; if it keeps happening, check the server and the"
                    " network between the gateway and it",
                )
            self._end(ConnectionEndReason.ERROR)
        else:
            self._on_eof(from_client=from_client)

    def _pause_reading_into(self, *, client_is_full: bool) -> None:
        if client_is_full:
            self._client_full = True
        source = self._upstream if client_is_full else self._client
        if not source.is_closing():
            source.pause_reading()

    def _resume_reading_into(self, *, client_is_full: bool) -> None:
        if client_is_full:
            self._client_full = False
        source = self._upstream if client_is_full else self._client
        if not source.is_closing() and not (client_is_full and self._room_task is not None):
            source.resume_reading()

    # --- idle -----------------------------------------------------------------------

    def _schedule_idle_check(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        idle, limit = self._idle, self._idle_limit
        if idle is None or limit is None or self._is_done() or self._termination is not None:
            return
        delay = idle.due(self._clock())
        if delay is None:
            self.terminate(limit.termination)
        else:
            self._schedule_idle_check(delay)

    # --- ending ---------------------------------------------------------------------

    def _is_done(self) -> bool:
        return self._done is not None and self._done.done()

    def _end(self, reason: ConnectionEndReason) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _forward_valid_prefix(self, data: bytes, *, from_client: bool) -> None:
        """A chunk broke the framing: forward (and audit) its whole messages before
        the bad header, so the other side stands at a boundary for the FATAL or
        the Terminate, and nothing relayed goes unrecorded."""
        tracker = self._from_client if from_client else self._from_server
        prefix = data[: tracker.valid_prefix]
        if not prefix:
            return
        tapped = tracker.prefix_tapped
        if from_client:
            if self._audit is not None and tapped and not self._record_client(tapped):
                return
            self.bytes_from_client += len(prefix)
            self._upstream.write(prefix)
            if tapped and tapped[-1].type == FrontendType.TERMINATE:
                self._client_said_goodbye = True  # as in _on_client_data
        else:
            self.bytes_from_server += len(prefix)
            self._client.write(prefix)
            if self._audit is not None and tapped:
                # Ending anyway (the framing broke): a failed record changes nothing.
                self._audit.on_server(tapped, time.time_ns())

    def _fail_protocol(self, exc: ProtocolError) -> None:
        # A peer broke the framing: tell the client why, then close.
        self.error = (exc.sqlstate, exc.message)
        if self._from_server.at_boundary:
            self._send_fatal(exc.sqlstate, exc.message)
        self.end_reason = ConnectionEndReason.ERROR
        self._end(ConnectionEndReason.ERROR)

    def _finish_termination(self) -> None:
        termination = self._termination
        if termination is None or self._is_done():
            return
        if self._from_server.at_boundary:
            self._send_fatal(termination.sqlstate, termination.message, hint=termination.hint)
        self.end_reason = termination.reason
        self._end(termination.reason)

    def _send_fatal(self, sqlstate: str, message: str, *, hint: str | None = None) -> None:
        if self.fatal_sqlstate is None and not self._client.is_closing():
            self.fatal_sqlstate = sqlstate
            self._client.write(messages.error_response("FATAL", sqlstate, message, hint=hint))

    async def _close(self) -> None:
        upstream, client = self._upstream, self._client
        if (
            not upstream.is_closing()
            and self._from_client.at_boundary
            and not self._client_said_goodbye
            and not self._client_refused
        ):
            # (After a refused chunk the server may stand mid-message: a
            # Terminate there could complete a statement; it gets a bare close.)
            # A polite Terminate spares the server log an "unexpected EOF".
            upstream.write(messages.terminate())
        for transport in (client, upstream):
            if not transport.is_closing():
                transport.close()  # flushes what is buffered, then closes
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self._closed.wait()
        except TimeoutError:
            client.abort()
            upstream.abort()


class _Side(asyncio.Protocol):
    """One side of a relay: hands its transport's events to the relay."""

    def __init__(self, relay: Relay, *, from_client: bool) -> None:
        self._relay = relay
        self._from_client = from_client

    def data_received(self, data: bytes) -> None:
        if self._from_client:
            self._relay._on_client_data(data)
        else:
            self._relay._on_server_data(data)

    def eof_received(self) -> bool:
        self._relay._on_eof(from_client=self._from_client)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay._on_lost(from_client=self._from_client, exc=exc)

    def pause_writing(self) -> None:
        # Our transport's write buffer is full: stop reading the other side.
        self._relay._pause_reading_into(client_is_full=self._from_client)

    def resume_writing(self) -> None:
        self._relay._resume_reading_into(client_is_full=self._from_client)


def unread_bytes(reader: asyncio.StreamReader) -> bytes:
    """What a StreamReader has buffered but nobody has read yet.

    StreamReader has no public API for this (nor for ``_eof`` below); both
    attributes are stable across CPython 3.8-3.13 and read only here.
    """
    return bytes(getattr(reader, "_buffer", b""))


def _take_over(
    reader: asyncio.StreamReader, transport: asyncio.BaseTransport, protocol: asyncio.Protocol
) -> tuple[bytes, bool]:
    """Move a transport from its stream to ``protocol``; returns the unread
    bytes and whether EOF had come."""
    buffered = unread_bytes(reader)
    eof = bool(getattr(reader, "_eof", False))
    transport.set_protocol(protocol)
    if isinstance(transport, asyncio.ReadTransport) and not transport.is_reading():
        transport.resume_reading()
    return buffered, eof


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Flush what we can within a deadline, then close; never raises."""
    try:
        if not writer.is_closing():
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await writer.drain()
            writer.close()
        async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
            await writer.wait_closed()
    except (TimeoutError, ConnectionError, OSError):
        writer.transport.abort()

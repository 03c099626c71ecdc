"""The relay core: one local client paired with one authenticated upstream session.

Forwarding is byte-for-byte: each read is written whole to the other side, once
(one write per read, never a flush per message), and the writer's ``drain()``
makes a slow reader stop the other side's reads (backpressure both ways; the
StreamReader pauses its transport when its buffer is full).

Message boundaries are followed from the 5-byte headers only
(:class:`~gateway.protocol.framing.BoundaryTracker`), so the gateway can end a
connection cleanly: a FATAL ErrorResponse is injected only at a boundary of the
server-to-client stream, never in the middle of a server message.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import structlog

from gateway.protocol import messages
from gateway.protocol.constants import FrontendType
from gateway.protocol.errors import ProtocolError
from gateway.protocol.framing import BoundaryTracker, TappedMessage

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


class EndReason(StrEnum):
    CLIENT_CLOSED = "client_closed"
    SERVER_CLOSED = "server_closed"
    SESSION_ENDED = "session_ended"
    EXPIRED = "expired"
    GATEWAY_SHUTDOWN = "gateway_shutdown"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Termination:
    """Why and how the gateway is ending a live connection."""

    reason: EndReason
    sqlstate: str
    message: str
    hint: str | None = None

    def error_response(self) -> bytes:
        return messages.error_response("FATAL", self.sqlstate, self.message, hint=self.hint)


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

    def on_client(self, tapped: list[TappedMessage], now_ns: int) -> None: ...

    def on_server(self, tapped: list[TappedMessage], now_ns: int) -> None: ...

    @property
    def congested(self) -> bool: ...

    async def wait_for_room(self) -> None: ...


class Relay:
    """Pumps bytes between a client and an upstream connection until one ends."""

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
    ) -> None:
        self._client_reader = client_reader
        self._client_writer = client_writer
        self._upstream_reader = upstream_reader
        self._upstream_writer = upstream_writer
        self._name = name
        self._audit = audit
        # Only the message types audit needs are copied; the rest is skipped
        # by arithmetic on the headers.
        self._from_client = BoundaryTracker(
            max_length=max_message_length,
            tap=_TERMINATE | (audit.client_tap if audit else frozenset()),
            measure=audit.client_measure if audit else frozenset(),
            tap_limit=TAP_LIMIT,
        )
        self._from_server = BoundaryTracker(
            max_length=max_message_length,
            tap=audit.server_tap if audit else frozenset(),
            measure=audit.server_measure if audit else frozenset(),
            tap_limit=TAP_LIMIT,
        )
        self._termination: Termination | None = None
        self._terminate_requested = asyncio.Event()
        self._fatal_sent = False
        self.bytes_from_client = 0
        self.bytes_from_server = 0
        self.end_reason: EndReason | None = None
        self.error: tuple[str, str] | None = None

    def prime(self, to_client: bytes, to_server: bytes) -> None:
        """Account for bytes already read during startup and forward them."""
        now = time.time_ns()
        if to_server:
            tapped = self._from_client.feed(to_server)
            self.bytes_from_client += len(to_server)
            self._upstream_writer.write(to_server)
            if tapped and self._audit is not None:
                self._audit.on_client(tapped, now)
        if to_client:
            tapped = self._from_server.feed(to_client)
            self.bytes_from_server += len(to_client)
            self._client_writer.write(to_client)
            if tapped and self._audit is not None:
                self._audit.on_server(tapped, now)

    def terminate(self, termination: Termination) -> None:
        """Ask the relay to end with a FATAL to the client at the next boundary."""
        if self._termination is None:
            self._termination = termination
            self._terminate_requested.set()

    async def run(self) -> EndReason:
        tasks = {
            asyncio.create_task(self._pump_client(), name=f"{self._name}:client->server"),
            asyncio.create_task(self._pump_server(), name=f"{self._name}:server->client"),
            asyncio.create_task(self._watch_termination(), name=f"{self._name}:termination"),
        }
        try:
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                self._on_error(exc)
        if self.end_reason is None:
            self.end_reason = EndReason.ERROR
        await self._close()
        return self.end_reason

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, ProtocolError):
            # The peer broke framing; tell the client why before closing.
            self.error = (exc.sqlstate, exc.message)
            if not self._fatal_sent and self._from_server.at_boundary:
                self._send_fatal(messages.error_response("FATAL", exc.sqlstate, exc.message))
            self.end_reason = EndReason.ERROR
        elif isinstance(exc, ConnectionError | OSError):
            self.end_reason = self.end_reason or EndReason.ERROR
            self.error = ("08006", f"connection failure: {exc}")
        else:
            log.error("relay_failed", connection=self._name, error=repr(exc))
            self.end_reason = EndReason.ERROR
            self.error = ("XX000", "internal error in the gateway relay")

    async def _pump_client(self) -> None:
        reader, writer, tracker = self._client_reader, self._upstream_writer, self._from_client
        audit = self._audit
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                self.end_reason = self.end_reason or EndReason.CLIENT_CLOSED
                return
            tapped = tracker.feed(data)
            self.bytes_from_client += len(data)
            writer.write(data)
            if tapped:
                if audit is not None:
                    audit.on_client(tapped, time.time_ns())
                if tapped[-1].type == FrontendType.TERMINATE:  # the client said goodbye
                    self.end_reason = EndReason.CLIENT_CLOSED
            await writer.drain()

    async def _pump_server(self) -> None:
        reader, writer, tracker = self._upstream_reader, self._client_writer, self._from_server
        audit = self._audit
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                self.end_reason = self.end_reason or EndReason.SERVER_CLOSED
                return
            tapped = tracker.feed(data)
            self.bytes_from_server += len(data)
            writer.write(data)
            if tapped and audit is not None:
                audit.on_server(tapped, time.time_ns())
            if self._termination is not None and tracker.at_boundary:
                self._finish_termination()
                return
            if audit is not None and audit.congested:
                # The audit writer is behind: slow down rather than buffer.
                await audit.wait_for_room()
            await writer.drain()

    async def _watch_termination(self) -> None:
        await self._terminate_requested.wait()
        if self._from_server.at_boundary:
            self._finish_termination()
            return
        # The server is mid-message; _pump_server injects the FATAL at the next
        # boundary. A server stalled mid-message gets a bounded wait.
        await asyncio.sleep(BOUNDARY_GRACE_SECONDS)
        self._finish_termination()

    def _finish_termination(self) -> None:
        termination = self._termination
        assert termination is not None
        if self._from_server.at_boundary:
            self._send_fatal(termination.error_response())
        self.end_reason = termination.reason

    def _send_fatal(self, payload: bytes) -> None:
        if not self._fatal_sent and not self._client_writer.is_closing():
            self._fatal_sent = True
            self._client_writer.write(payload)

    async def _close(self) -> None:
        upstream = self._upstream_writer
        if not upstream.is_closing() and self._from_client.at_boundary:
            # A polite Terminate spares the server log an "unexpected EOF".
            upstream.write(messages.terminate())
        for writer in (self._client_writer, upstream):
            await close_writer(writer)


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

"""The asyncio shell of a client connection's start.

Drives the sans-IO :class:`~gateway.protocol.client_startup.ClientStartup`: it
reads, feeds, and performs the action each event names (answer ``N``, start TLS,
forward a cancel, refuse, close without a word). The decisions are the state
machine's; this module only does I/O, logs, and keeps the deadline.

Direct TLS (``sslnegotiation=direct``, PostgreSQL 17+ clients): asyncio's
``start_tls`` cannot take bytes already read, so when the port offers TLS the
first byte of a just-accepted socket is peeked (``MSG_PEEK``) before any
transport exists. A TLS handshake record there makes the transport a TLS one
from the start, so the ClientHello is read by TLS, never by the stream.

Invariants: every wait is under the startup deadline; what reaches the client
before a valid StartupMessage is exactly what the state machine says (often
nothing); the reason for a silent close is logged, never a secret.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from gateway.net.relay import READ_SIZE, close_writer
from gateway.protocol.client_startup import (
    AnswerEncryption,
    CancelRequested,
    ClientStartup,
    CloseSilently,
    NeedData,
    Refuse,
    StartTLS,
    StartupReceived,
)
from gateway.protocol.sqlstate import SqlState
from gateway.protocol.startup import CancelRequest, StartupMessage
from gateway.refusal import RefusalReason


@dataclass(frozen=True, slots=True)
class ClientStarted:
    """A client that sent a StartupMessage the gateway will serve."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    startup: StartupMessage
    #: bytes the client sent after its StartupMessage (pipelined messages)
    pipelined: bytes


@dataclass(frozen=True, slots=True)
class StartupFailed:
    """A client whose start ended otherwise, for the trail: why, with a SQLSTATE
    (08P01 for a close without a reply, the refusal's own code otherwise)."""

    sqlstate: str
    reason: str
    #: the refusal's code in the refusal record
    kind: RefusalReason = RefusalReason.STARTUP_GARBAGE
    #: the event name of its log line
    event: str = "client_startup_closed"


async def read_client_startup(
    sock: socket.socket,
    *,
    tls: ssl.SSLContext | None,
    timeout: float,
    forward_cancel: Callable[[CancelRequest], Awaitable[None]],
    log: structlog.typing.FilteringBoundLogger,
) -> ClientStarted | StartupFailed | None:
    """Run the start of a just-accepted client to its StartupMessage; else a
    :class:`StartupFailed` worth recording, or None (a cancel request, a client
    that left without a word). The connection is then closed, with whatever
    answer was due. With ``tls``, a direct TLS ClientHello is served."""
    machine = ClientStartup(tls_available=tls is not None)
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        async with asyncio.timeout(timeout):
            direct = False
            if tls is not None:
                first = await _peek_first_byte(sock)
                direct = first is not None and machine.first_byte_peeked(first) is not None
            streams = await _open_streams(sock, tls if direct else None)
            if direct:
                _tls_started(machine, streams[1])
            return await _run(machine, *streams, tls, forward_cancel, log)
    except TimeoutError:
        if streams is None and sock.fileno() != -1:
            streams = await _open_streams(sock, None)
        refusal = machine.timed_out()
        if streams is not None:
            await _refuse(streams[1], refusal)
        return StartupFailed(
            refusal.sqlstate,
            refusal.message,
            RefusalReason.STARTUP_TIMEOUT,
            "client_startup_timed_out",
        )
    except (ssl.SSLError, ConnectionError) as exc:
        if streams is not None:
            streams[1].transport.abort()
        else:
            sock.close()
        if isinstance(exc, ssl.SSLError):
            # Logged by the refusal recorder (floods summarised); details at debug.
            log.debug("client_tls_failed", error=str(exc))
            return StartupFailed(
                SqlState.PROTOCOL_VIOLATION,
                f"TLS handshake failed: {exc}",
                RefusalReason.TLS_FAILED,
                "client_tls_failed",
            )
        log.info("client_tls_failed", error=str(exc))
        return None


async def read_tunnelled_startup(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    timeout: float,
    forward_cancel: Callable[[CancelRequest], Awaitable[None]],
    log: structlog.typing.FilteringBoundLogger,
) -> ClientStarted | StartupFailed | None:
    """As :func:`read_client_startup`, on streams already inside the tunnel's TLS:
    the client's own SSLRequest is answered ``N`` (the tunnel is the encryption)."""
    machine = ClientStartup(tls_available=False)
    try:
        async with asyncio.timeout(timeout):
            return await _run(machine, reader, writer, None, forward_cancel, log)
    except TimeoutError:
        refusal = machine.timed_out()
        await _refuse(writer, refusal)
        return StartupFailed(
            refusal.sqlstate,
            refusal.message,
            RefusalReason.STARTUP_TIMEOUT,
            "client_startup_timed_out",
        )
    except (ssl.SSLError, ConnectionError) as exc:
        log.info("tunnel_stream_failed", error=str(exc))
        writer.transport.abort()
        return None


async def _peek_first_byte(sock: socket.socket) -> int | None:
    """The first byte on a just-accepted socket, left unread; None at end of file.

    asyncio's ``start_tls`` cannot take bytes already read, and a transport
    reads as soon as it exists (uvloop's even when paused in
    ``connection_made``): so the byte is peeked before any transport is made.
    """
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock.fileno(), _set_once, readable)
    try:
        await readable
    finally:
        loop.remove_reader(sock.fileno())
    data = sock.recv(1, socket.MSG_PEEK)
    return data[0] if data else None


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _open_streams(
    sock: socket.socket, tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over an accepted socket, as ``asyncio.start_server`` makes them
    (server side, so a later ``start_tls`` is a server's), TLS first if asked."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_SIZE)
    connected: asyncio.Future[asyncio.StreamWriter] = loop.create_future()

    def on_connected(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set_result(writer)

    protocol = asyncio.StreamReaderProtocol(reader, on_connected)
    await loop.connect_accepted_socket(lambda: protocol, sock, ssl=tls)
    return reader, await connected


def _tls_started(machine: ClientStartup, writer: asyncio.StreamWriter) -> None:
    ssl_object = writer.get_extra_info("ssl_object")
    alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
    machine.tls_started(alpn=alpn)


async def _run(
    machine: ClientStartup,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    tls: ssl.SSLContext | None,
    forward_cancel: Callable[[CancelRequest], Awaitable[None]],
    log: structlog.typing.FilteringBoundLogger,
) -> ClientStarted | StartupFailed | None:
    while True:
        event = machine.next_event()
        if isinstance(event, NeedData):
            machine.receive_data(await reader.read(READ_SIZE))
        elif isinstance(event, AnswerEncryption):
            writer.write(event.data)
            await writer.drain()
        elif isinstance(event, StartTLS):
            assert tls is not None  # the machine offers TLS only when there is a context
            writer.write(event.data)
            await writer.drain()
            await writer.start_tls(tls)
            _tls_started(machine, writer)
        elif isinstance(event, StartupReceived):
            return ClientStarted(reader, writer, event.message, machine.take_remaining())
        elif isinstance(event, CancelRequested):
            await forward_cancel(event.request)
            await close_writer(writer)
            return None
        elif isinstance(event, CloseSilently):
            # PostgreSQL logs these (COMMERROR) and closes without a reply. A
            # noteworthy one is logged by the refusal recorder (floods
            # summarised), so here at debug level only.
            if event.noteworthy:
                log.debug("client_startup_closed", reason=event.reason)
            else:
                log.info("client_startup_closed", reason=event.reason)
            await close_writer(writer)
            if not event.noteworthy:
                return None
            return StartupFailed(SqlState.PROTOCOL_VIOLATION, event.reason)
        else:
            log.debug("client_startup_refused", sqlstate=event.sqlstate, reason=event.message)
            await _refuse(writer, event)
            return StartupFailed(
                event.sqlstate,
                event.message,
                RefusalReason.STARTUP_GARBAGE,
                "client_startup_refused",
            )


async def _refuse(writer: asyncio.StreamWriter, refusal: Refuse) -> None:
    if not writer.is_closing():
        writer.write(refusal.data)
    await close_writer(writer)

"""The tunnel endpoint: where CLIs on other hosts bring their grants' connections.

One TCP listener (``--tunnel-listen``, loopback by default) speaking TLS 1.3
only, with a client certificate required and verified against the gateway CA
(the context is built by ``gateway.credentials.pki``). After the handshake the
peer's certificate names a grant; :attr:`TunnelEndpoint.admit` (the grant
service) answers with that grant's door or with a refusal.

* An admitted connection is handed to the grant's own
  :class:`~gateway.net.listener.AccessListener` as streams over the TLS
  transport (``loop.connect_accepted_socket(ssl=...)``, no extra hop): the same
  :class:`~gateway.net.connection.ConnectionLife` runs it, with the PostgreSQL
  startup inside the tunnel, the grant check, the upstream sign-in, the relay,
  the records, the expiry cut and cancel forwarding; the recorded client
  address is the TLS peer's.
* A refused one (the grant ended or expired, the certificate names no grant)
  reads the client's startup inside the tunnel and answers it with a FATAL
  ErrorResponse, so the client hears why rather than a closed socket.
* A handshake that fails (no certificate, or one the CA did not sign) is
  dropped by TLS itself and logged with the peer's address: asyncio closes
  without flushing TLS's alert, so the CLI's forwarder, which never gets a
  byte back, tells its client 28000.

TCP keepalives are on for every tunnel connection, so NAT and firewalls between
the laptop and the gateway keep an idle one (a long ``pg_sleep``) open.

With :attr:`TunnelEndpoint.relays` set (``--workers N``), the daemon's endpoint
only accepts: each TCP socket goes to a relay worker before its handshake, and
the worker's own endpoint (never started) runs :meth:`TunnelEndpoint.serve_accepted`
with an ``admit`` that asks the daemon. TLS and the relay cost the worker's
core, not the daemon's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from gateway.net.acceptor import Acceptor, listening_socket
from gateway.net.client_startup import ClientStarted, read_tunnelled_startup
from gateway.net.relay import READ_SIZE, Termination, close_writer
from gateway.net.relays import TunnelRelays
from gateway.protocol.sqlstate import SqlState
from gateway.protocol.startup import CancelRequest
from gateway.reasons import ConnectionEndReason
from gateway.refusal import Refusal, RefusalPlace, RefusalReason, address_host

log = structlog.get_logger(__name__)

#: TCP keepalive: first probe after a minute idle, then every 15 s, 4 misses.
KEEPALIVE_IDLE_SECONDS = 60
KEEPALIVE_INTERVAL_SECONDS = 15
KEEPALIVE_PROBES = 4


class TunnelDoor(Protocol):
    """What the tunnel hands an admitted connection to (an AccessListener)."""

    def serve_tunnelled(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client_addr: str,
        number: int | None = None,
    ) -> asyncio.Task[None]: ...


#: given the peer's certificate (DER), the grant's door or why it is refused
Admit = Callable[[bytes | None], Awaitable[TunnelDoor | Termination]]


def enable_keepalive(sock: socket.socket) -> None:
    """TCP keepalives on a tunnel socket (both ends set them)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; macOS has only the switch above
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_SECONDS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_SECONDS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


def refusal_reason(refusal: Termination) -> RefusalReason:
    """How a refused tunnel connection is recorded: its grant ended, its
    certificate refused (28000, :attr:`ConnectionEndReason.ERROR`), or the
    gateway refusing it (audit or store unavailable, or a lookup that failed)."""
    if refusal.reason == ConnectionEndReason.SESSION_ENDED:
        return RefusalReason.GRANT_ENDED
    if (
        refusal.reason == ConnectionEndReason.ERROR
        and refusal.sqlstate == SqlState.INVALID_AUTHORIZATION_SPECIFICATION
    ):
        return RefusalReason.CERTIFICATE_REFUSED
    return RefusalReason.GATEWAY_REFUSING


def _address(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return "unknown"


@dataclass
class TunnelEndpoint:
    """The tunnel's listener; one task per connection until it is handed over."""

    tls: ssl.SSLContext
    admit: Admit
    host: str = "127.0.0.1"
    port: int = 0
    handshake_timeout: float = 15.0
    startup_timeout: float = 15.0
    #: told of every refused tunnel connection (the gateway records it)
    on_refusal: Callable[[Refusal], None] | None = None
    #: relay worker processes to hand accepted sockets to (None: served here)
    relays: TunnelRelays | None = None
    _doors: Acceptor = field(default_factory=lambda: Acceptor("tunnel"))

    async def start(self) -> int:
        sock = listening_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._doors.start(
            sock, lambda client, address, number: self._serve(client, _address(address), number)
        )
        log.info("tunnel_listening", host=self.host, port=self.port)
        return self.port

    async def close(self) -> None:
        """Stop accepting; connections already handed to a grant are the grant's."""
        await self._doors.stop_accepting()
        await self._doors.cancel_after(0)

    async def _serve(self, sock: socket.socket, client_addr: str, number: int) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        enable_keepalive(sock)
        if self.relays is not None and self.relays.hand_off_tunnel(sock, client_addr, number):
            sock.close()  # the worker has its own copy
            return
        await self.serve_accepted(sock, client_addr, number)

    async def serve_accepted(
        self, sock: socket.socket, client_addr: str, number: int
    ) -> asyncio.Task[None] | None:
        """The TLS handshake, the admission and then the grant's door (the task
        that serves the connection from there, returned) or the refusal (None)."""
        sock.setblocking(False)
        bound = log.bind(tunnel_client=client_addr)
        try:
            reader, writer = await self._handshake(sock)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            # No certificate, one the CA did not sign, not TLS 1.3, or silence.
            why = str(exc) or type(exc).__name__
            bound.debug("tunnel_handshake_refused", error=why)
            self._refused(
                RefusalReason.TUNNEL_HANDSHAKE,
                f"tunnel TLS handshake refused: {why}",
                client_addr,
                event="tunnel_handshake_refused",
            )
            sock.close()
            return None
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            outcome = await self.admit(der)
        except Exception as exc:  # a bug in a lookup must not leave the socket open
            bound.error("tunnel_admit_failed", error=repr(exc))
            writer.transport.abort()
            return None
        if isinstance(outcome, Termination):
            bound.debug("tunnel_refused", sqlstate=outcome.sqlstate, reason=outcome.message)
            self._refused(
                refusal_reason(outcome), outcome.message, client_addr, event="tunnel_refused"
            )
            await self._refuse(reader, writer, outcome, bound)
            return None
        return outcome.serve_tunnelled(reader, writer, client_addr, number)

    def _refused(self, reason: RefusalReason, message: str, client_addr: str, event: str) -> None:
        if self.on_refusal is not None:
            self.on_refusal(
                Refusal(
                    RefusalPlace.TUNNEL,
                    reason,
                    message,
                    address_host(client_addr),
                    event=event,
                )
            )

    async def _handshake(
        self, sock: socket.socket
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Streams over the accepted socket after a TLS server handshake.

        ``connect_accepted_socket`` returns once the handshake is done (and
        raises when it fails), so the TLS transport itself is what the relay
        reads and writes: no second hop."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_SIZE)
        connected: asyncio.Future[asyncio.StreamWriter] = loop.create_future()

        def on_connected(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connected.set_result(writer)

        protocol = asyncio.StreamReaderProtocol(reader, on_connected)
        async with asyncio.timeout(self.handshake_timeout):
            await loop.connect_accepted_socket(lambda: protocol, sock, ssl=self.tls)
            return reader, await connected

    async def _refuse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        refusal: Termination,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """Answer the client's startup (inside the tunnel) with ``refusal``."""

        async def drop_cancel(_request: CancelRequest) -> None:
            bound.info("tunnel_cancel_dropped", reason=refusal.message)

        started = await read_tunnelled_startup(
            reader, writer, timeout=self.startup_timeout, forward_cancel=drop_cancel, log=bound
        )
        if isinstance(started, ClientStarted):
            if not writer.is_closing():
                writer.write(refusal.error_response())
            await close_writer(writer)


__all__ = ["Admit", "TunnelDoor", "TunnelEndpoint", "enable_keepalive", "refusal_reason"]

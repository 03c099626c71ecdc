"""The door of an access grant: a listener on 127.0.0.1 for one grant's port.

The listener accepts connections and keeps the set of live ones, so that the
grant service can end them (:meth:`AccessListener.end`,
:meth:`AccessListener.terminate_live`) and wait for or close them; it forwards
a client's CancelRequest to the upstream backend its key was mapped to. One
connection's life (startup, grant check, upstream, records, relay) is
:class:`~gateway.net.connection.ConnectionLife`.

Nobody is authenticated locally: the grant is the authorisation, and the port is
bound to loopback. :class:`ConnectionHost` and :class:`GrantInfo` (declared in
:mod:`gateway.net.ports`) are exported here for the grant service.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import socket
from dataclasses import dataclass, field

import structlog

from gateway.errors import GatewayError
from gateway.net.connection import ConnectionLife, LiveConnection
from gateway.net.ports import ConnectionAuditTap, ConnectionHost, GrantInfo
from gateway.net.relay import Termination
from gateway.net.upstream import send_cancel
from gateway.protocol.startup import CancelRequest

log = structlog.get_logger(__name__)

_connection_numbers = itertools.count(1)
#: asyncio.start_server's default backlog.
_BACKLOG = 100
#: Seconds before accepting again after an accept error (asyncio's own value).
_ACCEPT_RETRY_DELAY = 1.0

__all__ = [
    "AccessListener",
    "ConnectionAuditTap",
    "ConnectionHost",
    "GrantInfo",
    "LiveConnection",
]


@dataclass
class AccessListener:
    """Serves one grant's local port."""

    grant: GrantInfo
    host: ConnectionHost
    listen_host: str = "127.0.0.1"
    port: int = 0
    #: set once the grant has ended; new connections get this FATAL
    refusal: Termination | None = None
    connections: set[LiveConnection] = field(default_factory=set)
    _listening: socket.socket | None = None
    _acceptor: asyncio.Task[None] | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> int:
        # A socket of our own rather than asyncio.start_server: a connection's
        # first byte is peeked before any transport reads it (direct TLS).
        # An IPv6 literal needs its family said (create_server defaults to IPv4).
        family = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
        sock = socket.create_server((self.listen_host, self.port), family=family, backlog=_BACKLOG)
        sock.setblocking(False)
        self._listening = sock
        self.port = sock.getsockname()[1]
        self._acceptor = asyncio.create_task(
            self._accept_loop(sock), name=f"grant-{self.grant.session_id[:8]}-accept"
        )
        return self.port

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _address = await loop.sock_accept(sock)
            except OSError as exc:
                # Out of descriptors or the like: keep the door, retry later,
                # as asyncio's own server does (ACCEPT_RETRY_DELAY).
                log.warning("accept_failed", session_id=self.grant.session_id, error=str(exc))
                await asyncio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            number = next(_connection_numbers)
            task = asyncio.create_task(
                self._serve(client, number), name=f"grant-{self.grant.session_id[:8]}-c{number}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def end(self, termination: Termination) -> None:
        """Refuse new connections and end every live one with ``termination``."""
        self.refusal = termination
        self.terminate_live(termination)

    def terminate_live(self, termination: Termination) -> None:
        """End every live connection, but keep accepting new ones."""
        for conn in list(self.connections):
            if conn.relay is not None:
                conn.relay.terminate(termination)
            else:
                conn.pending_termination = termination

    async def wait_idle(self, timeout: float) -> None:
        """Wait (bounded) until no connection handler is running."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def close(self, *, wait: float = 3.0) -> None:
        """Stop listening and wait (bounded) for connection handlers to finish."""
        if self._acceptor is not None:
            self._acceptor.cancel()
            await asyncio.gather(self._acceptor, return_exceptions=True)
            self._acceptor = None
        if self._listening is not None:
            self._listening.close()
            self._listening = None
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=wait)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _serve(self, sock: socket.socket, number: int) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            peer = sock.getpeername()
        except OSError:  # the client is already gone
            peer = None
        client_addr = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        conn = LiveConnection(number, client_addr)
        bound = log.bind(session_id=self.grant.session_id, connection=number, client=client_addr)
        life = ConnectionLife(self, conn, sock, log=bound)
        self.connections.add(conn)
        try:
            await life.serve()
        finally:
            self.connections.discard(conn)

    def serve_tunnelled(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client_addr: str
    ) -> asyncio.Task[None]:
        """Serve a connection that came through the tunnel, as one of this door's own
        (same life, same live set, cut and cancelled the same way); ``client_addr``
        is the tunnel's peer, the laptop, not a loopback forwarder."""
        number = next(_connection_numbers)
        task = asyncio.create_task(
            self._serve_streams(reader, writer, client_addr, number),
            name=f"grant-{self.grant.session_id[:8]}-t{number}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _serve_streams(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client_addr: str,
        number: int,
    ) -> None:
        conn = LiveConnection(number, client_addr)
        bound = log.bind(
            session_id=self.grant.session_id, connection=number, client=client_addr, tunnel=True
        )
        life = ConnectionLife(self, conn, (reader, writer), log=bound)
        self.connections.add(conn)
        try:
            await life.serve()
        finally:
            self.connections.discard(conn)

    async def forward_cancel(self, request: CancelRequest) -> None:
        """Forward a CancelRequest whose key this listener handed out.

        Each client key maps to its upstream backend's real key; anything else
        is dropped without a reply, as the server itself does (55.2.7).
        """
        for conn in list(self.connections):
            client_key = conn.client_key
            upstream = conn.upstream
            if (
                client_key is None
                or upstream is None
                or upstream.handshake.backend_key is None
                or client_key.pid != request.pid
                or not hmac.compare_digest(client_key.secret, request.secret)
            ):
                continue
            real = upstream.handshake.backend_key
            target = await self.host.upstream_target(self.grant.resource, self.grant.account)
            try:
                await send_cancel(target, real.pid, real.secret)
            except (GatewayError, OSError, TimeoutError) as exc:
                log.warning(
                    "cancel_forward_failed", session_id=self.grant.session_id, error=str(exc)
                )
            else:
                log.info("cancel_forwarded", session_id=self.grant.session_id, backend_pid=real.pid)
            return
        log.info("cancel_ignored_unknown_key", session_id=self.grant.session_id)

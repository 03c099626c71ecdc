"""The CLI's forwarder: a local port whose connections go to the gateway's tunnel.

When the gateway runs on another host, ``pam db access`` makes an ECDSA P-256
key in memory, sends a CSR with the grant request, and gets back a certificate
naming the grant. :class:`Forwarder` then opens 127.0.0.1:PORT itself and
carries each client connection, CancelRequests included, to the gateway's
tunnel endpoint over TLS 1.3 with that certificate, the gateway CA pinned.
The gateway does the PostgreSQL startup; this process only moves bytes.

Invariants:

* The private key never leaves this process: it is not sent, and it reaches the
  TLS context through an anonymous memory file (``os.memfd_create``), never a
  file on disk (:func:`gateway.credentials.pki.tunnel_client_context`).
* One client's trouble (Ctrl+C, a reset, a refused tunnel) ends that client's
  connection only; the forwarder keeps serving the others.
* A tunnel failure reaches the local client as a PostgreSQL ErrorResponse after
  its StartupMessage, not a closed socket: gateway unreachable -> 08001 naming
  the gateway; the gateway dropping the tunnel without a byte (it refused the
  certificate during the TLS handshake) -> 28000.
* TCP keepalives on every tunnel connection keep an idle one (a long query) up.
* An extension of the grant re-issues its certificate (same key, later
  expiry): :meth:`Forwarder.renew` makes the TLS context new connections use
  from then on; connections already carried keep theirs.
* The local leg's encryption requests are answered here: an SSLRequest gets TLS
  with a throwaway self-signed certificate made in memory (for clients that
  insist, ``sslmode=require``; the leg is loopback), a GSSENCRequest ``N``; the
  gateway then sees the StartupMessage itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, cast
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec

from cli.client import AccessJson, ApiClient, ApiError
from gateway.credentials.pki import (
    csr_for,
    ephemeral_local_context,
    new_key,
    tunnel_client_context,
)
from gateway.net.relay import READ_SIZE
from gateway.net.tunnel import enable_keepalive
from gateway.protocol import messages
from gateway.protocol.client_startup import (
    AnswerEncryption,
    ClientStartup,
    NeedData,
    Refuse,
    StartupReceived,
)
from gateway.protocol.constants import GSSENC_REQUEST_CODE, SSL_REQUEST_CODE
from gateway.protocol.sqlstate import SqlState

#: how long opening a tunnel connection (TCP and TLS) may take
CONNECT_TIMEOUT_SECONDS = 15.0
#: client bytes kept until the tunnel first answers, to answer locally if it never does
_PENDING_LIMIT = 64 * 1024


@dataclass(frozen=True)
class TunnelTarget:
    """Where the tunnel is and how to speak to it."""

    host: str
    port: int
    tls: ssl.SSLContext
    #: the name the gateway's server certificate must carry (the API's host)
    server_hostname: str
    #: the control API of the gateway this tunnel belongs to (:meth:`Forwarder.follow`)
    api_url: str | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


#: The head of every startup packet: length and code (or protocol version).
_REQUEST = struct.Struct("!II")


@dataclass(eq=False)
class _Client:
    """One local client connection while it is being carried."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    #: what the client sent before the tunnel said anything (None once it has)
    unanswered: bytearray | None = field(default_factory=bytearray)


async def _answer_locally(client: _Client, seen: bytes, error: bytes) -> None:
    """Play the start of the PostgreSQL protocol with the local client (``N`` to
    an SSLRequest), then send ``error`` after its StartupMessage (55.2.1); a
    CancelRequest, garbage or silence just closes."""
    machine = ClientStartup(tls_available=False)
    if seen:  # empty data is end of file to the machine
        machine.receive_data(seen)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            while True:
                event = machine.next_event()
                if event is NeedData.NEED_DATA:
                    data = await client.reader.read(READ_SIZE)
                    if not data:
                        return
                    machine.receive_data(data)
                elif isinstance(event, AnswerEncryption):
                    client.writer.write(event.data)
                elif isinstance(event, StartupReceived):
                    client.writer.write(error)
                    return
                elif isinstance(event, Refuse):
                    client.writer.write(event.data)
                    return
                else:
                    return
    except (TimeoutError, ConnectionError):
        return
    finally:
        await _close(client.writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        if not writer.is_closing():
            await writer.drain()
        writer.close()
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError, OSError):
        writer.transport.abort()


async def _pump(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, client: _Client, *, upstream: bool
) -> None:
    """Copy one direction until end of file; ``upstream`` is client -> tunnel."""
    try:
        while True:
            data = await source.read(READ_SIZE)
            if not data:
                break
            if upstream and client.unanswered is not None:
                if len(client.unanswered) + len(data) <= _PENDING_LIMIT:
                    client.unanswered += data
            elif not upstream:
                client.unanswered = None  # the gateway has spoken; from now on, bytes only
            sink.write(data)
            await sink.drain()
    finally:
        if upstream:
            # The client left, or its side failed (a reset): so does its tunnel
            # connection (TLS has no half-close), else the gateway's end and
            # its backend would wait on an idle tunnel until the grant ends.
            await _close(sink)


@dataclass(eq=False)
class Forwarder:
    """Serves 127.0.0.1:PORT in a thread of its own, for one grant's tunnel."""

    target: TunnelTarget
    listen_host: str = "127.0.0.1"
    port: int = 0
    #: the grant's key and the gateway CA, to renew the certificate (renew())
    key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    ca_pem: bytes | None = None
    #: where the tunnel is now, asked when it cannot be reached (failover to
    #: another gateway of the fleet); blocking, run in a thread; None: nowhere else
    relocate: Callable[[], TunnelTarget | None] | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: TLS for local clients that ask for it, made at the first SSLRequest
    _local_tls: ssl.SSLContext | None = None

    def start(self) -> int:
        """Bind the local port and serve it from a background thread; returns the port."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(
            asyncio.start_server(self._on_client, self.listen_host, self.port, limit=READ_SIZE)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=loop.run_forever, name="pam-forwarder", daemon=True)
        self._thread.start()
        return self.port

    def renew(self, cert_pem: str) -> None:
        """Use *cert_pem* (re-issued for the same key, after an extension) for
        every tunnel connection opened from now on."""
        if self.key is None or self.ca_pem is None:
            raise ApiError("this forwarder keeps no key to renew its certificate with")
        # One reference swapped: _carry reads self.target once per connection.
        self.target = replace(
            self.target, tls=tunnel_client_context(cert_pem.encode(), self.key, self.ca_pem)
        )

    def follow(self, api_url: str) -> None:
        """The grant's heartbeats now reach the gateway at *api_url* (the CLI
        failed over to it): carry new connections to that gateway's tunnel too,
        so that heartbeats and tunnel never hold the grant at two gateways
        (each would take it over from the other in turn). Blocking."""
        if self.relocate is None or self.target.api_url in (None, api_url):
            return
        moved = self.relocate()
        if moved is not None:
            self.target = moved

    def stop(self) -> None:
        """Stop listening and close every carried connection."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # kept so that stop() can end it
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        client = _Client(reader, writer)
        try:
            # One client's failure must never stop the forwarder.
            with contextlib.suppress(Exception):
                first = await self._negotiate_locally(client)
                if first is not None:
                    await self._carry(client, first)
        finally:
            # Closed already on every orderly path; this covers errors and stop().
            writer.transport.abort()

    async def _negotiate_locally(self, client: _Client) -> bytes | None:
        """Answer the client's encryption requests on this leg: an SSLRequest
        gets TLS with a throwaway local certificate (``S``), a GSSENCRequest
        ``N``; the tunnel itself is TLS already. Returns the first 8 bytes of
        what follows (a StartupMessage or CancelRequest: the tunnel's), or None
        when the client left or stayed silent."""
        encrypted = False
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                while True:
                    head = await client.reader.readexactly(_REQUEST.size)
                    length, code = _REQUEST.unpack(head)
                    if length == _REQUEST.size and code == SSL_REQUEST_CODE and not encrypted:
                        if self._local_tls is None:
                            self._local_tls = ephemeral_local_context()
                        client.writer.write(b"S")
                        await client.writer.drain()
                        await client.writer.start_tls(self._local_tls)
                        encrypted = True
                    elif length == _REQUEST.size and code == GSSENC_REQUEST_CODE:
                        client.writer.write(b"N")
                    else:
                        return head
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return None

    async def _open(
        self, target: TunnelTarget
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            return await asyncio.open_connection(
                target.host,
                target.port,
                ssl=target.tls,
                server_hostname=target.server_hostname,
                limit=READ_SIZE,
            )

    async def _open_or_fail_over(
        self, target: TunnelTarget
    ) -> tuple[TunnelTarget, asyncio.StreamReader, asyncio.StreamWriter]:
        """A tunnel connection to *target*; when it cannot be reached (not a TLS
        refusal), to where :attr:`relocate` says the grant is now."""
        try:
            return target, *await self._open(target)
        except ssl.SSLError:
            raise
        except (OSError, TimeoutError):
            if self.relocate is None:
                raise
            moved = await asyncio.to_thread(self.relocate)
            if moved is None or moved.address == target.address:
                raise
            self.target = moved  # from now on, every connection goes there
            return moved, *await self._open(moved)

    async def _carry(self, client: _Client, first: bytes) -> None:
        target = self.target
        try:
            target, t_reader, t_writer = await self._open_or_fail_over(target)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            error = messages.error_response(
                "FATAL",
                SqlState.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                f"cannot reach the pam gateway's tunnel at {target.address}: {why}",
                hint="check that the gateway is running and reachable from this host",
            )
            await _answer_locally(client, first, error)
            return
        # What the client sent before the tunnel was up goes first.
        t_writer.write(first)
        assert client.unanswered is not None
        client.unanswered += first
        sock = t_writer.get_extra_info("socket")
        if sock is not None:
            enable_keepalive(sock)
        up = self._spawn(_pump(client.reader, t_writer, client, upstream=True), "fwd-up")
        try:
            await _pump(t_reader, client.writer, client, upstream=False)
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)
            t_writer.transport.abort()
        if client.unanswered is not None:
            # Not a byte back: the gateway dropped the tunnel in the TLS handshake
            # (TLS 1.3 checks the client's certificate after the client's side
            # of the handshake is done), so the certificate was refused. The
            # drop may come before the client has even sent its startup.
            error = messages.error_response(
                "FATAL",
                SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
                f"the pam gateway at {target.address} refused this access's certificate",
                hint="the grant may have ended; request new access with `pam db access`",
            )
            await _answer_locally(client, bytes(client.unanswered), error)
            return
        await _close(client.writer)


def open_tunnel_access(
    client: ApiClient,
    *,
    resource: str | None,
    account: str | None,
    duration_seconds: int | None,
    port: int | None,
    reason: str | None = None,
    request_id: str | None = None,
    break_glass: bool = False,
    otp: str | None = None,
) -> tuple[AccessJson, Forwarder]:
    """Request a tunnel grant with a CSR for a key made here, and serve its local
    port; returns the session (its listen address the forwarder's) and the forwarder.

    ``PAM_TUNNEL_HOST`` overrides the host the tunnel is dialled at (the API's
    host by default; the certificate is still checked for the API's host name).
    """
    key = new_key()  # lives only in this process's memory
    session = client.open_access(
        resource=resource,
        account=account,
        duration_seconds=duration_seconds,
        port=None,
        reason=reason,
        client_host=socket.gethostname(),
        csr=csr_for(key),
        request_id=request_id,
        break_glass=break_glass,
        otp=otp,
    )
    cert, ca, tunnel_port = (
        session.get("certificate"),
        session.get("ca_cert_pem"),
        session.get("tunnel_port"),
    )
    if not cert or not ca or not tunnel_port:
        client.end_access(session["id"])
        raise ApiError(
            "the pam gateway did not issue a tunnel certificate for this access",
            hint="the gateway may predate the tunnel; run `pam gateway init --force` there",
        )
    api_host = urlsplit(client.endpoints.current).hostname or "localhost"
    target = TunnelTarget(
        host=os.environ.get("PAM_TUNNEL_HOST") or api_host,
        port=tunnel_port,
        tls=tunnel_client_context(cert.encode(), key, ca.encode()),
        server_hostname=api_host,
        api_url=client.endpoints.current,
    )

    def relocate() -> TunnelTarget | None:
        """The grant's tunnel as the gateway now answering says (failover: it
        takes the grant over), from this thread's own client on the same
        gateways as the heartbeats."""
        try:
            with ApiClient(client.config, endpoints=client.endpoints) as own:
                offer = own.access_certificate(session["id"])
                host = urlsplit(own.endpoints.current).hostname or "localhost"
        except ApiError:
            return None
        if not offer.get("tunnel_port"):
            return None
        return TunnelTarget(
            host=host,
            port=int(offer["tunnel_port"] or 0),
            tls=tunnel_client_context(offer["certificate"].encode(), key, ca.encode()),
            server_hostname=host,
            api_url=own.endpoints.current,
        )

    forwarder = Forwarder(target, port=port or 0, key=key, ca_pem=ca.encode(), relocate=relocate)
    try:
        local_port = forwarder.start()
    except OSError as exc:
        client.end_access(session["id"])
        raise ApiError(
            f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}",
            hint="pick another --port, or omit it for a free one",
        ) from None
    local = cast(AccessJson, dict(session))
    local["listen_host"], local["listen_port"] = "127.0.0.1", local_port
    return local, forwarder

"""The local side of an access grant: a listener on 127.0.0.1 and its connections.

For each client connection the listener (PostgreSQL 15 docs, 55.2.1):

1. answers SSLRequest and GSSENCRequest with ``N`` (the local leg is loopback);
2. reads the StartupMessage and checks it against the grant: the user must be the
   account's user name (else FATAL 28000) and the database the resource's
   (else FATAL 3D000 naming the allowed one) -- never a silent rewrite;
3. writes the connection's record *before* anything is relayed;
4. connects and authenticates upstream with the stored credentials, then sends
   the client AuthenticationOk and the server's own ParameterStatus,
   BackendKeyData and ReadyForQuery, and hands both sides to the
   :class:`~gateway.net.relay.Relay`.

Every refusal is an ErrorResponse with a SQLSTATE and a message a person can act
on, never a bare closed socket. Nobody is authenticated locally: the grant is the
authorisation, and the port is bound to loopback.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import secrets
import socket
import ssl
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

import structlog

from gateway.errors import GatewayError, UpstreamError
from gateway.net.relay import (
    READ_SIZE,
    Relay,
    StatementAudit,
    Termination,
    close_writer,
)
from gateway.net.upstream import UpstreamConnection, UpstreamTarget, connect_upstream, send_cancel
from gateway.protocol import messages
from gateway.protocol.constants import (
    MAX_STARTUP_PACKET_LENGTH,
    PROTOCOL_3_0,
    SSL_ACCEPTED,
    SSL_REFUSED,
    BackendType,
)
from gateway.protocol.errors import ProtocolError
from gateway.protocol.framing import MessageReader
from gateway.protocol.messages import BackendKey
from gateway.protocol.sqlstate import SqlState
from gateway.protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    parse_startup_packet,
)
from gateway.reasons import ConnectionEndReason

log = structlog.get_logger(__name__)

#: Startup parameters that are the gateway's to set, not the client's.
_RESERVED_PARAMS = frozenset({"user", "database", "replication"})
_PROTOCOL_OPTION_PREFIX = "_pq_."
_connection_numbers = itertools.count(1)
#: Ends the gateway imposes on a live connection, whatever the server is doing.
_CUT_BY_GATEWAY = frozenset(
    {
        ConnectionEndReason.SESSION_ENDED,
        ConnectionEndReason.EXPIRED,
        ConnectionEndReason.GATEWAY_SHUTDOWN,
    }
)
#: First byte of a TLS handshake record: a client starting TLS directly.
TLS_HANDSHAKE_RECORD = 0x16
#: TLS alert record: level fatal (2), description handshake_failure (40).
TLS_ALERT_HANDSHAKE_FAILURE = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])


class DirectTLSRefused(Exception):
    """The client opened with a TLS ClientHello instead of an SSLRequest."""


class ConnectionAuditTap(StatementAudit, Protocol):
    """The audit of one connection: the relay's statement tap plus the
    connection's own start and end (implemented by ``gateway.audit.tap``)."""

    def connection_event(
        self,
        kind: Literal["connection_start", "connection_end"],
        detail: dict[str, str | int | float | None],
        *,
        now_ns: int,
    ) -> None: ...


class ConnectionHost(Protocol):
    """What a grant's listener needs from the service that owns it."""

    @property
    def startup_timeout(self) -> float: ...

    @property
    def connect_timeout(self) -> float: ...

    @property
    def client_tls(self) -> ssl.SSLContext | None:
        """Server-side TLS for local clients that ask for it; None answers ``N``."""
        ...

    async def upstream_target(self, resource: str, account: str) -> UpstreamTarget: ...

    def connection_audit(
        self, session_id: str, connection_id: str, secrets: tuple[str, ...]
    ) -> ConnectionAuditTap | None:
        """The statement audit tap for a new connection (None: audit is off)."""
        ...

    def refusal(self) -> Termination | None:
        """Why the gateway as a whole refuses new connections right now, if it does."""
        ...

    def scram_cache(self, target: UpstreamTarget) -> MutableMapping[tuple[bytes, int], bytes]:
        """Salted passwords of this target's credentials, by (salt, iterations)."""
        ...

    async def record_connection_start(
        self,
        session_id: str,
        client_addr: str,
        application_name: str | None,
        *,
        backend_pid: int | None,
        started_at: datetime,
    ) -> str: ...

    async def record_connection_end(
        self,
        connection_id: str,
        *,
        reason: str,
        bytes_from_client: int,
        bytes_from_server: int,
        error: tuple[str, str] | None,
    ) -> None: ...


@dataclass
class GrantInfo:
    """The parts of an access session a listener checks connections against."""

    session_id: str
    resource: str
    account: str
    username: str
    database: str
    expires_at: datetime


@dataclass(eq=False)
class LiveConnection:
    number: int
    client_addr: str
    relay: Relay | None = None
    upstream: UpstreamConnection | None = None
    #: the key this client got from the gateway; never the upstream's own
    client_key: BackendKey | None = None
    #: set when the grant ends while this connection is still starting up
    pending_termination: Termination | None = None


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
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, self.port, limit=READ_SIZE, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = next(_connection_numbers)
        task = asyncio.create_task(
            self._serve(reader, writer, number), name=f"grant-{self.grant.session_id[:8]}-c{number}"
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
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=wait)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        peer = writer.get_extra_info("peername")
        client_addr = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = LiveConnection(number, client_addr)
        bound = log.bind(session_id=self.grant.session_id, connection=number, client=client_addr)
        try:
            self.connections.add(conn)
            await self._serve_connection(reader, writer, conn, bound)
        except Exception as exc:  # the last line of defence for one connection
            bound.error("connection_failed", error=repr(exc))
            if conn.relay is None and conn.upstream is not None:
                # Signed in upstream but never handed to a relay (which closes its own).
                conn.upstream.writer.transport.abort()
            if conn.relay is None and not writer.is_closing():
                # Nothing relayed yet, so the client can still read why.
                await _refuse(
                    writer,
                    SqlState.INTERNAL_ERROR,
                    "pam could not set up this connection because of an internal error",
                    hint="the gateway's log has the details",
                )
            else:
                writer.transport.abort()
        finally:
            self.connections.discard(conn)

    async def _serve_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: LiveConnection,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> None:
        inbound = MessageReader(max_length=MAX_STARTUP_PACKET_LENGTH)
        try:
            async with asyncio.timeout(self.host.startup_timeout):
                startup = await self._read_startup(reader, writer, inbound)
        except TimeoutError:
            await _refuse(
                writer, SqlState.PROTOCOL_VIOLATION, "timed out waiting for the startup packet"
            )
            return
        except DirectTLSRefused:
            # A TLS ClientHello as the first byte (sslnegotiation=direct): the
            # client cannot read an ErrorResponse, so answer with a TLS alert.
            bound.info("direct_tls_refused", hint="use sslnegotiation=postgres (the default)")
            writer.write(TLS_ALERT_HANDSHAKE_FAILURE)
            await close_writer(writer)
            return
        except ProtocolError as exc:
            await _refuse(writer, exc.sqlstate, exc.message)
            return
        except (ssl.SSLError, ConnectionError) as exc:
            bound.info("client_tls_failed", error=str(exc))
            writer.transport.abort()
            return
        if startup is None:  # CancelRequest handled, or the client went away
            await close_writer(writer)
            return

        refusal = self._check_startup(startup)
        if refusal is not None:
            bound.info("connection_refused", sqlstate=refusal.sqlstate, reason=refusal.message)
            await _refuse(writer, refusal.sqlstate, refusal.message, hint=refusal.hint)
            return

        application_name = startup.params.get("application_name")
        started_at = datetime.now(UTC)
        relay: Relay | None = None
        audit: ConnectionAuditTap | None = None
        try:
            upstream, target = await self._connect_upstream(startup)
        except UpstreamError as exc:
            bound.warning(
                "upstream_failed", kind=exc.kind, sqlstate=exc.sqlstate, error=exc.message
            )
            if exc.raw_error is not None:
                writer.write(exc.raw_error)
                await close_writer(writer)
            else:
                await _refuse(writer, exc.sqlstate, exc.message, hint=exc.hint)
            await self._record_failure(conn, application_name, started_at, exc)
            return
        except GatewayError as exc:
            # The stored credentials cannot be used (say, a password that no
            # longer decrypts): still an ErrorResponse, never a bare close.
            bound.error("credentials_unavailable", sqlstate=exc.sqlstate, error=exc.message)
            await _refuse(writer, exc.sqlstate, exc.message, hint=exc.hint)
            await self._record_failure(conn, application_name, started_at, exc)
            return
        conn.upstream = upstream
        key = upstream.handshake.backend_key
        # Recorded once the upstream session is up, in one write with its backend
        # pid, but before a byte is relayed: no record, no connection.
        try:
            connection_id = await self.host.record_connection_start(
                self.grant.session_id,
                conn.client_addr,
                application_name,
                backend_pid=key.pid if key else None,
                started_at=started_at,
            )
        except GatewayError as exc:
            bound.error("connection_record_failed", error=exc.message)
            upstream.writer.write(messages.terminate())
            await close_writer(upstream.writer)
            await _refuse(
                writer,
                SqlState.CANNOT_CONNECT_NOW,
                "pam cannot record this connection, so it refuses it: the gateway's store"
                " is not writable",
                hint="an administrator must check the gateway's store and log",
            )
            return
        bound = bound.bind(connection_id=connection_id, application_name=application_name)
        bound.info("connection_started", backend_pid=key.pid if key else None)
        audit = self.host.connection_audit(self.grant.session_id, connection_id, (target.password,))
        del target
        if audit is not None:
            audit.connection_event(
                "connection_start",
                {
                    "client_addr": conn.client_addr,
                    "application_name": application_name,
                    "backend_pid": key.pid if key else None,
                    "user": startup.user,
                    "database": startup.database,
                },
                now_ns=time.time_ns(),
            )

        relay = Relay(
            reader,
            writer,
            upstream.reader,
            upstream.writer,
            name=f"c{conn.number}",
            audit=audit,
        )
        conn.relay = relay
        greeting = _negotiate_protocol(startup) + messages.authentication_ok()
        if key is not None:
            # The client gets a key of the gateway's; the upstream's never leaves
            # the daemon. The pid stays the real one so pg_stat_activity matches.
            conn.client_key = BackendKey(
                key.pid,
                secrets.token_bytes(cancel_key_length(effective_minor_version(startup))),
            )
            startup_messages = _with_client_key(upstream.handshake.forward, conn.client_key)
        else:
            startup_messages = b"".join(upstream.handshake.forward)
        relay.prime(
            greeting + startup_messages + upstream.leftover,
            inbound.take_remaining(),
        )
        late = conn.pending_termination or self.refusal
        if late is not None:
            relay.terminate(late)
        reason = await relay.run()
        bound.info(
            "connection_ended",
            reason=str(reason),
            bytes_from_client=relay.bytes_from_client,
            bytes_from_server=relay.bytes_from_server,
        )
        if audit is not None:
            audit.connection_event(
                "connection_end",
                {
                    "end_reason": str(reason),
                    "bytes_from_client": relay.bytes_from_client,
                    "bytes_from_server": relay.bytes_from_server,
                    "error_sqlstate": relay.error[0] if relay.error else None,
                },
                now_ns=time.time_ns(),
            )
        await self.host.record_connection_end(
            connection_id,
            reason=str(reason),
            bytes_from_client=relay.bytes_from_client,
            bytes_from_server=relay.bytes_from_server,
            error=relay.error,
        )
        if key is not None and reason in _CUT_BY_GATEWAY:
            # A backend notices a vanished client only when it next reads, so a
            # query still running (pg_sleep(600)) would outlive the grant; a
            # CancelRequest stops it, as the client itself could have (55.2.7).
            await self._cancel_upstream(key)

    async def _record_failure(
        self,
        conn: LiveConnection,
        application_name: str | None,
        started_at: datetime,
        exc: GatewayError,
    ) -> None:
        """Record a connection that failed before anything was relayed."""
        try:
            connection_id = await self.host.record_connection_start(
                self.grant.session_id,
                conn.client_addr,
                application_name,
                backend_pid=None,
                started_at=started_at,
            )
            await self.host.record_connection_end(
                connection_id,
                reason=ConnectionEndReason.ERROR,
                bytes_from_client=0,
                bytes_from_server=0,
                error=(exc.sqlstate, exc.message),
            )
        except GatewayError as failure:
            log.error(
                "connection_record_failed",
                session_id=self.grant.session_id,
                error=failure.message,
            )

    async def _read_startup(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        inbound: MessageReader,
    ) -> StartupMessage | None:
        encrypted = False
        while True:
            if not encrypted and inbound.buffered and inbound.peek_byte() == TLS_HANDSHAKE_RECORD:
                raise DirectTLSRefused
            body = inbound.next_startup_packet(MAX_STARTUP_PACKET_LENGTH)
            if body is None:
                data = await reader.read(READ_SIZE)
                if not data:
                    return None
                inbound.feed(data)
                continue
            packet = parse_startup_packet(body)
            if isinstance(packet, SSLRequest | GSSENCRequest):
                if inbound.buffered:
                    # Nothing may follow an encryption request before our answer:
                    # such bytes would be taken as if they came over TLS.
                    raise ProtocolError("unexpected data after an encryption request")
                tls = self.host.client_tls
                if isinstance(packet, GSSENCRequest) or tls is None or encrypted:
                    writer.write(SSL_REFUSED)
                    await writer.drain()
                    continue
                writer.write(SSL_ACCEPTED)
                await writer.drain()
                await writer.start_tls(tls)
                encrypted = True
                continue
            if isinstance(packet, CancelRequest):
                await self._forward_cancel(packet)
                return None
            return packet

    def _check_startup(self, startup: StartupMessage) -> Termination | None:
        grant = self.grant
        gateway_refusal = self.host.refusal()
        if gateway_refusal is not None:
            return gateway_refusal
        if self.refusal is not None:
            return Termination(
                self.refusal.reason,
                SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
                self.refusal.message,
                self.refusal.hint,
            )
        if startup.is_replication:
            return Termination(
                ConnectionEndReason.ERROR,
                SqlState.FEATURE_NOT_SUPPORTED,
                "replication connections are not allowed through pam",
            )
        if startup.user != grant.username:
            return Termination(
                ConnectionEndReason.ERROR,
                SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
                f"this access session is for user {grant.username!r}, not {startup.user!r}",
                hint=f"connect with user={grant.username}",
            )
        if startup.database != grant.database:
            return Termination(
                ConnectionEndReason.ERROR,
                SqlState.INVALID_CATALOG_NAME,
                f"database {startup.database!r} is not available through this access session;"
                f" resource {grant.resource!r} allows database {grant.database!r}",
                hint=f"connect with dbname={grant.database}",
            )
        return None

    async def _connect_upstream(
        self, startup: StartupMessage
    ) -> tuple[UpstreamConnection, UpstreamTarget]:
        target = await self.host.upstream_target(self.grant.resource, self.grant.account)
        params = {
            name: value
            for name, value in startup.params.items()
            if name not in _RESERVED_PARAMS and not name.startswith(_PROTOCOL_OPTION_PREFIX)
        }
        upstream = await connect_upstream(
            target,
            params=params,
            timeout=self.host.connect_timeout,
            salted_password_cache=self.host.scram_cache(target),
        )
        return upstream, target

    async def _forward_cancel(self, request: CancelRequest) -> None:
        # Only keys this listener handed out are honoured, each mapped to its
        # upstream backend's real key; anything else is dropped without a reply,
        # as the server itself does (55.2.7).
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

    async def _cancel_upstream(self, key: BackendKey) -> None:
        try:
            target = await self.host.upstream_target(self.grant.resource, self.grant.account)
            await send_cancel(target, key.pid, key.secret)
        except (GatewayError, OSError, TimeoutError) as exc:
            log.warning("cancel_failed", session_id=self.grant.session_id, error=str(exc))


#: The newest protocol the gateway speaks to clients: 3.2 (PostgreSQL 18), whose
#: only change is a longer cancel key.
NEWEST_MINOR_VERSION = 2


def effective_minor_version(startup: StartupMessage) -> int:
    """The protocol minor version a connection runs at: 3.0 or 3.2 (3.1 was never
    released; anything newer is negotiated down)."""
    return NEWEST_MINOR_VERSION if startup.minor_version >= NEWEST_MINOR_VERSION else 0


def cancel_key_length(minor_version: int) -> int:
    # 4 bytes in 3.0; PostgreSQL 18 uses 32 bytes in 3.2 (any length up to 256).
    return 32 if minor_version >= NEWEST_MINOR_VERSION else 4


def _negotiate_protocol(startup: StartupMessage) -> bytes:
    """NegotiateProtocolVersion for a newer minor version or unknown ``_pq_.``
    options (PostgreSQL 15 docs, 55.2.1 and 55.7)."""
    unsupported = [name for name in startup.params if name.startswith(_PROTOCOL_OPTION_PREFIX)]
    minor = effective_minor_version(startup)
    if minor == startup.minor_version and not unsupported:
        return b""
    newest = (PROTOCOL_3_0 | minor).to_bytes(4, "big")
    body = newest + len(unsupported).to_bytes(4, "big")
    body += b"".join(name.encode() + b"\x00" for name in unsupported)
    return messages.encode_message(BackendType.NEGOTIATE_PROTOCOL_VERSION, body)


def _with_client_key(forward: list[bytes], client_key: BackendKey) -> bytes:
    """The server's startup messages with its BackendKeyData replaced by ours."""
    replaced = (
        messages.backend_key_data(client_key.pid, client_key.secret)
        if message[0] == BackendType.BACKEND_KEY_DATA
        else message
        for message in forward
    )
    return b"".join(replaced)


async def _refuse(
    writer: asyncio.StreamWriter, code: str, message: str, *, hint: str | None = None
) -> None:
    if not writer.is_closing():
        writer.write(messages.error_response("FATAL", code, message, hint=hint))
    await close_writer(writer)

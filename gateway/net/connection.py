"""One client connection's life, from its first byte to its record's end.

The steps, in order (each a method of :class:`ConnectionLife`):

1. **read the startup** (:mod:`gateway.net.client_startup`): SSLRequest and
   GSSENCRequest answers, direct TLS, cancel forwarding, the StartupMessage;
2. **check it against the grant**: the user must be the account's user name
   (else FATAL 28000) and the database the resource's (else FATAL 3D000 naming
   the allowed one) -- never a silent rewrite;
3. **connect upstream** and authenticate with the stored credentials (a 28P01
   gets one more try with the credential read again: a rotation may have just
   changed it);
4. **record** the connection *before* anything is relayed: no record, no
   connection;
5. **greet** the client: NegotiateProtocolVersion when due, AuthenticationOk,
   then the server's own ParameterStatus, BackendKeyData (with a key of the
   gateway's) and ReadyForQuery;
6. **relay** until either side ends;
7. **record the end**, and cancel a query still running when the gateway cut
   the connection.

After a valid StartupMessage every refusal is an ErrorResponse with a SQLSTATE
and a message a person can act on, never a bare closed socket. Nobody is
authenticated locally: the grant is the authorisation, and the door may refuse
a client outright (another OS user's process): that refusal comes before the
grant checks, and such a client's CancelRequest is never forwarded.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from gateway.durations import format_duration
from gateway.errors import GatewayError, UpstreamError
from gateway.net.client_startup import (
    ClientStarted,
    StartupFailed,
    read_client_startup,
    read_tunnelled_startup,
)
from gateway.net.ports import ConnectionAuditTap, ConnectionHost, GrantInfo
from gateway.net.relay import IdleLimit, Relay, Termination, close_writer
from gateway.net.upstream import UpstreamConnection, UpstreamTarget, connect_upstream, send_cancel
from gateway.protocol import messages
from gateway.protocol.client_startup import (
    PROTOCOL_OPTION_PREFIX,
    cancel_key_length,
    effective_minor_version,
    negotiate_protocol_version,
    with_client_key,
)
from gateway.protocol.messages import BackendKey
from gateway.protocol.sqlstate import SqlState
from gateway.protocol.startup import CancelRequest, StartupMessage
from gateway.reasons import ConnectionEndReason
from gateway.refusal import Refusal, RefusalPlace, RefusalReason, address_host

#: Startup parameters that are the gateway's to set, not the client's.
_RESERVED_PARAMS = frozenset({"user", "database", "replication"})
#: Ends the gateway imposes on a live connection, whatever the server is doing.
_CUT_BY_GATEWAY = frozenset(
    {
        ConnectionEndReason.SESSION_ENDED,
        ConnectionEndReason.EXPIRED,
        ConnectionEndReason.GATEWAY_SHUTDOWN,
        ConnectionEndReason.AUDIT_UNAVAILABLE,
        ConnectionEndReason.STORE_UNAVAILABLE,
        # Idle means no query in flight; should the count be wrong, the cancel
        # is harmless and the query does not outlive its connection.
        ConnectionEndReason.IDLE_TIMEOUT,
    }
)


#: a tunnelled client's streams, already inside the tunnel's TLS
ClientStreams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Door(Protocol):
    """What a connection needs from the listener that accepted it."""

    grant: GrantInfo
    host: ConnectionHost
    #: set once the grant has ended; new connections get this FATAL
    refusal: Termination | None

    def ended_refusal(self) -> Termination | None: ...

    async def forward_cancel(self, request: CancelRequest, source: str = "unknown") -> None: ...


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
    #: relayed by a worker process: here only a placeholder, for counts and waits
    handed_off: bool = False


class ConnectionLife:
    """Serves one accepted client connection through the steps above."""

    def __init__(
        self,
        door: Door,
        conn: LiveConnection,
        sock: socket.socket | ClientStreams,
        *,
        log: structlog.typing.FilteringBoundLogger,
        refusal: Termination | None = None,
        refused_who: str | None = None,
    ) -> None:
        self.door = door
        #: set when the door refuses this client whatever it sends (another OS
        #: user's process): answered at its startup, its cancels dropped
        self.refusal = refusal
        #: who that refused client is (``uid:N``), for the refusal record
        self.refused_who = refused_who
        self.host = door.host
        self.grant = door.grant
        self.conn = conn
        #: the accepted socket, until the startup has made streams of it; or the
        #: streams of a tunnelled connection (already inside the tunnel's TLS)
        self.sock: socket.socket | ClientStreams | None = sock
        #: the client's writer, once its startup made streams of the socket
        self.writer: asyncio.StreamWriter | None = None
        self.log = log
        self.started_at = datetime.now(UTC)
        #: the upstream password, held from sign-in until the audit has its mask
        self._secrets: tuple[str, ...] = ()
        self._audit: ConnectionAuditTap | None = None

    async def serve(self) -> None:
        """Run the connection; a bug in any step still ends it cleanly."""
        try:
            await self._live()
        except Exception as exc:  # the last line of defence for one connection
            self.log.error("connection_failed", error=repr(exc))
            conn, writer = self.conn, self.writer
            if writer is None:
                if isinstance(self.sock, tuple):
                    self.sock[1].transport.abort()
                elif self.sock is not None:
                    self.sock.close()
                return
            if conn.relay is None and conn.upstream is not None:
                # Signed in upstream but never handed to a relay (which closes its own).
                conn.upstream.writer.transport.abort()
            if conn.relay is None and not writer.is_closing():
                # Nothing relayed yet, so the client can still read why.
                await self._send_fatal(
                    writer,
                    SqlState.INTERNAL_ERROR,
                    "pam could not set up this connection because of an internal error",
                    hint="the gateway's log has the details",
                )
            else:
                writer.transport.abort()

    async def _live(self) -> None:
        sock = self.sock
        assert sock is not None, "a connection is served once"
        # A client the door refuses outright never gets a cancel forwarded.
        cancel = self._forward_cancel if self.refusal is None else self._drop_cancel
        timeout = self.host.startup_timeout
        if isinstance(sock, tuple):  # through the tunnel: TLS is the tunnel's
            started = await read_tunnelled_startup(
                *sock, timeout=timeout, forward_cancel=cancel, log=self.log
            )
        else:
            started = await read_client_startup(
                sock, tls=self.host.client_tls, timeout=timeout, forward_cancel=cancel, log=self.log
            )
        # The startup's reader owns the socket from here (it closed it, or made
        # the streams); until now, serve()'s last line of defence closes it.
        self.sock = None
        if started is None:
            return
        if isinstance(started, StartupFailed):
            # Kept in the trail as well as the log: who knocked, and why they
            # were turned away (the client got PostgreSQL's answer, or none).
            self._refused(started.kind, started.reason, started.event)
            error = GatewayError(started.reason, sqlstate=started.sqlstate)
            await self._record_failure(None, error)
            return
        self.writer = started.writer
        if not await self._admit(started):
            return
        self.started_at = datetime.now(UTC)
        upstream = await self._connect_upstream(started)
        if upstream is None:
            return
        connection_id = await self._record_start(started, upstream)
        if connection_id is None:
            return
        relay = self._greet(started, upstream, connection_id)
        reason = await relay.run()
        if relay.fatal_sqlstate is not None:
            self._error_sent(relay.fatal_sqlstate)
        await self._record_end(connection_id, relay, reason)
        key = upstream.handshake.backend_key
        if key is not None and reason in _CUT_BY_GATEWAY:
            # A backend notices a vanished client only when it next reads, so a
            # query still running (pg_sleep(600)) would outlive the grant; a
            # CancelRequest stops it, as the client itself could have (55.2.7).
            await self._cancel_upstream(key)

    async def _admit(self, client: ClientStarted) -> bool:
        """Check the startup against the gateway and the grant; refuse if it fails."""
        if self.refusal is not None:
            refusal, kind = self.refusal, RefusalReason.NOT_OWNER
        else:
            checked = self._check_grant(client.startup)
            if checked is None:
                return True
            refusal, kind = checked
        # The refusal recorder logs it (a flood summarised); the detail at debug.
        self.log.debug("connection_refused", sqlstate=refusal.sqlstate, reason=refusal.message)
        self._refused(
            kind,
            refusal.message,
            "connection_refused",
            who=self.refused_who if kind is RefusalReason.NOT_OWNER else None,
        )
        await self._send_fatal(client.writer, refusal.sqlstate, refusal.message, hint=refusal.hint)
        if refusal is self.refusal:
            # Another OS user knocking is kept in the trail, not only the log.
            error = GatewayError(refusal.message, sqlstate=refusal.sqlstate)
            await self._record_failure(client.startup.params.get("application_name"), error)
        return False

    async def _forward_cancel(self, request: CancelRequest) -> None:
        await self.door.forward_cancel(request, address_host(self.conn.client_addr))

    async def _drop_cancel(self, _request: CancelRequest) -> None:
        message = self.refusal.message if self.refusal else ""
        self.log.debug("cancel_refused", reason=message)
        self._refused(
            RefusalReason.NOT_OWNER_CANCEL,
            f"CancelRequest dropped: {message}",
            "cancel_refused",
            who=self.refused_who,
        )

    def _refused(
        self, reason: RefusalReason, message: str, event: str, *, who: str | None = None
    ) -> None:
        self.host.refused(
            Refusal(
                RefusalPlace.LISTENER,
                reason,
                message,
                address_host(self.conn.client_addr),
                who=who,
                session_id=self.grant.session_id,
                event=event,
            )
        )

    def _check_grant(self, startup: StartupMessage) -> tuple[Termination, RefusalReason] | None:
        grant = self.grant
        gateway_refusal = self.host.refusal()
        if gateway_refusal is not None:
            return gateway_refusal, RefusalReason.GATEWAY_REFUSING
        ended = self.door.ended_refusal()
        if ended is not None:
            return ended, RefusalReason.GRANT_ENDED
        if startup.is_replication:
            return Termination(
                ConnectionEndReason.ERROR,
                SqlState.FEATURE_NOT_SUPPORTED,
                "replication connections are not allowed through pam",
            ), RefusalReason.REPLICATION
        if startup.user != grant.username:
            return Termination(
                ConnectionEndReason.ERROR,
                SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
                f"this access session is for user {grant.username!r}, not {startup.user!r}",
                hint=f"connect with user={grant.username}",
            ), RefusalReason.WRONG_USER
        if startup.database != grant.database:
            return Termination(
                ConnectionEndReason.ERROR,
                SqlState.INVALID_CATALOG_NAME,
                f"database {startup.database!r} is not available through this access session;"
                f" resource {grant.resource!r} allows database {grant.database!r}",
                hint=f"connect with dbname={grant.database}",
            ), RefusalReason.WRONG_DATABASE
        return None

    async def _connect_upstream(self, client: ClientStarted) -> UpstreamConnection | None:
        """Sign in upstream; on failure tell the client and record the attempt."""
        startup, writer = client.startup, client.writer
        application_name = startup.params.get("application_name")
        try:
            target = await self.host.upstream_target(
                self.grant.resource, self.grant.account, session_id=self.grant.session_id
            )
            params = {
                name: value
                for name, value in startup.params.items()
                if name not in _RESERVED_PARAMS and not name.startswith(PROTOCOL_OPTION_PREFIX)
            }
            try:
                upstream = await self._sign_in(target, params)
            except UpstreamError as exc:
                # 28P01: the password may have just been rotated; read it once more.
                retry = None
                if exc.sqlstate == SqlState.INVALID_PASSWORD:
                    retry = await self.host.retry_target(target)
                if retry is None:
                    raise
                target = retry
                upstream = await self._sign_in(target, params)
        except UpstreamError as exc:
            self.log.warning(
                "upstream_failed", kind=exc.kind, sqlstate=exc.sqlstate, error=exc.message
            )
            if exc.raw_error is not None:
                writer.write(exc.raw_error)  # the server's own, relayed as it is
                await close_writer(writer)
            else:
                await self._send_fatal(writer, exc.sqlstate, exc.message, hint=exc.hint)
            await self._record_failure(application_name, exc)
            return None
        except GatewayError as exc:
            # The stored credentials cannot be used (say, a password that no
            # longer decrypts): still an ErrorResponse, never a bare close.
            self.log.error("credentials_unavailable", sqlstate=exc.sqlstate, error=exc.message)
            await self._send_fatal(writer, exc.sqlstate, exc.message, hint=exc.hint)
            await self._record_failure(application_name, exc)
            return None
        self.conn.upstream = upstream
        # The password leaves with the target: the audit masks it (_record_start).
        self._secrets = (target.password,)
        return upstream

    async def _sign_in(self, target: UpstreamTarget, params: dict[str, str]) -> UpstreamConnection:
        started, ok = time.monotonic(), False
        try:
            upstream = await connect_upstream(
                target,
                params=params,
                timeout=self.host.connect_timeout,
                salted_password_cache=self.host.scram_cache(target),
            )
            ok = True
            return upstream
        finally:
            metrics = self.host.metrics
            if metrics is not None:
                metrics.upstream_connected(time.monotonic() - started, ok=ok)

    def _error_sent(self, sqlstate: str) -> None:
        metrics = self.host.metrics
        if metrics is not None:
            metrics.error_sent(sqlstate)

    async def _send_fatal(
        self, writer: asyncio.StreamWriter, code: str, message: str, *, hint: str | None = None
    ) -> None:
        """Tell the client why, in the gateway's own FATAL ErrorResponse (counted
        for the metrics), then close."""
        self._error_sent(code)
        if not writer.is_closing():
            writer.write(messages.error_response("FATAL", code, message, hint=hint))
        await close_writer(writer)

    async def _record_start(
        self, client: ClientStarted, upstream: UpstreamConnection
    ) -> str | None:
        """Record the connection, in one write with its backend pid, before a byte
        is relayed; if that fails, close the upstream and refuse the client."""
        startup = client.startup
        key = upstream.handshake.backend_key
        application_name = startup.params.get("application_name")
        try:
            connection_id = await self.host.record_connection_start(
                self.grant.session_id,
                self.conn.client_addr,
                application_name,
                backend_pid=key.pid if key else None,
                started_at=self.started_at,
            )
        except GatewayError as exc:
            self.log.error("connection_record_failed", error=exc.message)
            upstream.writer.write(messages.terminate())
            await close_writer(upstream.writer)
            await self._send_fatal(
                client.writer,
                SqlState.CANNOT_CONNECT_NOW,
                "pam cannot record this connection, so it refuses it: the gateway's store"
                " is not writable",
                hint="an administrator must check the gateway's store and log",
            )
            return None
        self.log = self.log.bind(connection_id=connection_id, application_name=application_name)
        self.log.info("connection_started", backend_pid=key.pid if key else None)
        self._audit = self.host.connection_audit(
            self.grant.session_id, connection_id, self._secrets
        )
        self._secrets = ()
        if self._audit is not None:
            self._audit.connection_event(
                "connection_start",
                {
                    "client_addr": self.conn.client_addr,
                    "application_name": application_name,
                    "backend_pid": key.pid if key else None,
                    "user": startup.user,
                    "database": startup.database,
                },
                now_ns=time.time_ns(),
            )
        return connection_id

    def _greet(
        self, started: ClientStarted, upstream: UpstreamConnection, connection_id: str
    ) -> Relay:
        """Hand both sides to a relay primed with the client's greeting."""
        conn = self.conn
        relay = Relay(
            started.reader,
            started.writer,
            upstream.reader,
            upstream.writer,
            name=f"c{conn.number}",
            audit=self._audit,
            idle=idle_limit(self.grant),
        )
        conn.relay = relay
        startup = started.startup
        greeting = negotiate_protocol_version(startup) + messages.authentication_ok()
        key = upstream.handshake.backend_key
        if key is not None:
            # The client gets a key of the gateway's; the upstream's never leaves
            # the daemon. The pid stays the real one so pg_stat_activity matches.
            conn.client_key = BackendKey(
                key.pid,
                secrets.token_bytes(cancel_key_length(effective_minor_version(startup))),
            )
            startup_messages = with_client_key(upstream.handshake.forward, conn.client_key)
        else:
            startup_messages = b"".join(upstream.handshake.forward)
        relay.prime(greeting + startup_messages + upstream.leftover, started.pipelined)
        late = conn.pending_termination or self.door.refusal
        if late is not None:
            relay.terminate(late)
        return relay

    async def _record_end(self, connection_id: str, relay: Relay, reason: str) -> None:
        self.log.info(
            "connection_ended",
            reason=str(reason),
            bytes_from_client=relay.bytes_from_client,
            bytes_from_server=relay.bytes_from_server,
        )
        if self._audit is not None:
            self._audit.connection_event(
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

    async def _record_failure(self, application_name: str | None, exc: GatewayError) -> None:
        """Record a connection that failed before anything was relayed."""
        try:
            connection_id = await self.host.record_connection_start(
                self.grant.session_id,
                self.conn.client_addr,
                application_name,
                backend_pid=None,
                started_at=self.started_at,
            )
            await self.host.record_connection_end(
                connection_id,
                reason=ConnectionEndReason.ERROR,
                bytes_from_client=0,
                bytes_from_server=0,
                error=(exc.sqlstate, exc.message),
            )
        except GatewayError as failure:
            self.log.error("connection_record_failed", error=failure.message)

    async def _cancel_upstream(self, key: BackendKey) -> None:
        try:
            target = await self.host.upstream_target(
                self.grant.resource, self.grant.account, session_id=self.grant.session_id
            )
            await send_cancel(target, key.pid, key.secret)
        except (GatewayError, OSError, TimeoutError) as exc:
            self.log.warning("cancel_failed", error=str(exc))


def idle_limit(grant: GrantInfo) -> IdleLimit | None:
    """The grant's idle limit, with the FATAL naming it (57P05, the code of
    PostgreSQL's own ``idle_session_timeout``); None when it has none."""
    seconds = grant.idle_timeout_seconds
    if not seconds:
        return None
    whose = f"the limit of policy '{grant.idle_policy}'" if grant.idle_policy else "its limit"
    return IdleLimit(
        seconds,
        Termination(
            ConnectionEndReason.IDLE_TIMEOUT,
            SqlState.IDLE_SESSION_TIMEOUT,
            f"terminating connection: idle for {format_duration(seconds)} ({whose})",
            hint="reconnect: the access grant is still open",
        ),
    )


__all__ = ["ClientStreams", "ConnectionLife", "Door", "LiveConnection", "idle_limit"]

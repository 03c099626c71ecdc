"""The gateway service: access grants, their listeners, expiry and the session log.

Owns every :class:`~gateway.net.listener.AccessListener` and the store. The store is
synchronous (SQLAlchemy); all store calls run on one dedicated worker thread so
the event loop never blocks on disk and SQLite writes are serialised.

Invariants:
* Expiry is enforced here, by a timer per grant, not trusted to the CLI: at
  ``expires_at`` every live connection gets a FATAL and new ones are refused.
* A grant whose CLI stops calling in (heartbeat) for ``heartbeat_timeout``
  seconds is ended, so a ``kill -9``-ed CLI leaves no open door.
* A session row is written before its listener accepts anything; a connection
  row before its first byte is relayed; at start-up every row left open by a
  crash is closed with ``gateway_crash``. Connection rows are group-committed:
  the starts and ends that queue up while one store transaction runs share the
  next, and each caller resumes once its own change is committed.
* A connection's end is a fact with its own time: if the store refuses to write
  it (the state fail-closed mode cuts connections in), it is kept and written
  again until the store takes it, and before its session ends, so it is never
  left for the session's end to close under another reason.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog

from gateway.audit.pairing import StatementTracker
from gateway.audit.records import EventRow
from gateway.audit.redaction import Redactor
from gateway.audit.sink import AuditSink
from gateway.audit.tap import ConnectionAudit
from gateway.audit.writer import AuditWriter
from gateway.config import GatewaySettings
from gateway.errors import GatewayError, InvalidRequest, StoreError, UpstreamError
from gateway.net.listener import AccessListener, GrantInfo
from gateway.net.relay import Termination, close_writer
from gateway.net.upstream import UpstreamTarget, connect_upstream
from gateway.protocol import messages
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason, SessionEndReason
from gateway.store import (
    AccessSession,
    ConnectionEnd,
    ConnectionRecord,
    ConnectionStart,
    Store,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")

WATCHDOG_INTERVAL_SECONDS = 0.5
MAX_SCRAM_CACHES = 1024
#: How long a looked-up upstream target (resource, account, decrypted password)
#: is reused by new connections. Changes made through this daemon's API drop it
#: at once; the bound only matters for edits made behind its back.
TARGET_CACHE_SECONDS = 10.0
SHUTDOWN_GRACE_SECONDS = 3.0
#: How often connection ends the store refused are written again.
UNWRITTEN_RETRY_SECONDS = 1.0


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class ActiveGrant:
    session: AccessSession
    listener: AccessListener
    last_heartbeat: float
    expiry_task: asyncio.Task[None] | None = None
    #: set once the grant has ended but its listener still answers with a refusal
    ended: bool = False


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    resource: str
    account: str
    address: str
    ssl_mode: str
    latency_ms: float | None = None
    server_version: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    auth_method: str | None = None
    error_kind: str | None = None
    error_sqlstate: str | None = None
    error: str | None = None
    hint: str | None = None


@dataclass
class GatewayService:
    store: Store
    settings: GatewaySettings
    _grants: dict[str, ActiveGrant] = field(default_factory=dict)
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="pam-store")
    )
    #: TLS for local clients that ask for it (None: they are answered ``N``)
    client_tls_context: ssl.SSLContext | None = None
    _watchdog: asyncio.Task[None] | None = None
    _closing: bool = False
    audit_writer: AuditWriter | None = None
    #: the audit writer process (None: the trail is written on the store thread)
    audit_sink: AuditSink | None = None
    #: set while the audit trail cannot be written and fail-closed is on
    _audit_down: BaseException | None = None
    #: every account's stored password, so the audit can mask any of them
    _stored_secrets: tuple[str, ...] = field(default=(), repr=False)
    #: SCRAM salted passwords per credential (RFC 5802 lets a client cache
    #: them per salt and iteration count): no PBKDF2 on every connection
    _scram_caches: dict[bytes, dict[tuple[bytes, int], bytes]] = field(
        default_factory=dict, repr=False
    )
    #: (resource, account) -> (when looked up, target); see upstream_target
    _targets: dict[tuple[str, str], tuple[float, UpstreamTarget]] = field(
        default_factory=dict, repr=False
    )
    _targets_generation: int = 0
    #: connection starts and ends waiting for the next group commit
    _connection_changes: list[
        tuple[ConnectionStart | ConnectionEnd, asyncio.Future[ConnectionRecord | None]]
    ] = field(default_factory=list, repr=False)
    _connection_writer: asyncio.Task[None] | None = None
    #: connection ends the store refused, kept with their own end time
    _unwritten_ends: list[ConnectionEnd] = field(default_factory=list, repr=False)
    _unwritten_retry: asyncio.Task[None] | None = None

    # --- ConnectionHost, for the listeners ------------------------------------

    @property
    def startup_timeout(self) -> float:
        return self.settings.client_startup_timeout_seconds

    @property
    def connect_timeout(self) -> float:
        return self.settings.upstream_connect_timeout_seconds

    @property
    def client_tls(self) -> ssl.SSLContext | None:
        return self.client_tls_context

    async def db(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a store call on the store thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def connection_audit(
        self, session_id: str, connection_id: str, secrets: tuple[str, ...]
    ) -> ConnectionAudit | None:
        settings = self.settings
        if not settings.audit_enabled or self.audit_writer is None:
            return None
        tracker = StatementTracker(
            session_id,
            connection_id,
            # Every account's stored password is masked, not only this one's.
            redactor=Redactor.build(settings.audit_redact_patterns, secrets + self._stored_secrets),
            parameter_mode=settings.audit_parameters,
            max_value_bytes=settings.audit_max_value_bytes,
        )
        return ConnectionAudit(tracker, self.audit_writer)

    def scram_cache(self, target: UpstreamTarget) -> dict[tuple[bytes, int], bytes]:
        # Keyed by a digest of the whole credential, so a rotated password (or
        # a changed user) starts a fresh cache; the old one is dropped.
        key = hashlib.sha256(
            "\0".join((target.resource, target.account, target.username, target.password)).encode()
        ).digest()
        cache = self._scram_caches.get(key)
        if cache is None:
            if len(self._scram_caches) >= MAX_SCRAM_CACHES:
                self._scram_caches.clear()
            cache = self._scram_caches[key] = {}
        return cache

    def refusal(self) -> Termination | None:
        if self._audit_down is None:
            return None
        return Termination(
            ConnectionEndReason.AUDIT_UNAVAILABLE,
            SqlState.CANNOT_CONNECT_NOW,
            "pam refuses new connections: the audit trail cannot be written (fail-closed mode)",
            hint="an administrator must restore the gateway's store; check the gateway log",
        )

    async def _on_audit_failure(self, exc: BaseException | None) -> None:
        if not self.settings.audit_fail_closed:
            return
        self._audit_down = exc or RuntimeError("audit failure")
        termination = Termination(
            ConnectionEndReason.AUDIT_UNAVAILABLE,
            SqlState.ADMIN_SHUTDOWN,
            "terminating connection: the audit trail cannot be written and pam is in"
            " fail-closed mode",
            hint="reconnect once the gateway's store is back",
        )
        for grant in list(self._grants.values()):
            grant.listener.terminate_live(termination)

    async def _on_audit_recovery(self, _exc: BaseException | None) -> None:
        self._audit_down = None

    async def upstream_target(self, resource: str, account: str) -> UpstreamTarget:
        """Where and as whom to connect for *resource*/*account*.

        Looked up once per :data:`TARGET_CACHE_SECONDS` rather than per connection:
        three store reads and a decryption are most of a new connection's store
        work. The decrypted password is no more exposed by this than by the
        audit's masking list, which holds every stored password anyway.
        """
        key = (resource, account)
        cached = self._targets.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < TARGET_CACHE_SECONDS:
            return cached[1]
        generation = self._targets_generation
        target = await self._load_target(resource, account)
        if generation == self._targets_generation:  # not changed while we looked
            self._targets[key] = (now, target)
        return target

    async def _load_target(self, resource: str, account: str) -> UpstreamTarget:
        def load() -> UpstreamTarget:
            res = self.store.get_resource(resource)
            acct = self.store.get_account(resource, account)
            return UpstreamTarget(
                resource=res.name,
                account=acct.name,
                host=res.host,
                port=res.port,
                database=res.database,
                username=acct.username,
                password=self.store.reveal_password(resource, account),
                ssl_mode=res.ssl_mode,
                ca_cert=res.ca_cert,
            )

        return await self.db(load)

    async def record_connection_start(
        self,
        session_id: str,
        client_addr: str,
        application_name: str | None,
        *,
        backend_pid: int | None,
        started_at: datetime,
    ) -> str:
        record = await self._record_connection(
            ConnectionStart(session_id, client_addr, application_name, backend_pid, started_at)
        )
        assert isinstance(record, ConnectionRecord)
        return record.id

    async def record_connection_end(
        self,
        connection_id: str,
        *,
        reason: str,
        bytes_from_client: int,
        bytes_from_server: int,
        error: tuple[str, str] | None,
    ) -> None:
        end = ConnectionEnd(
            connection_id,
            reason,
            bytes_from_client,
            bytes_from_server,
            error[0] if error else None,
            error[1] if error else None,
            # Taken now, not when the store takes it: a refused write is retried.
            ended_at=datetime.now(UTC),
        )
        try:
            await self._record_connection(end)
        except StoreError as exc:
            self._keep_unwritten(end, exc)

    def _keep_unwritten(self, end: ConnectionEnd, exc: StoreError) -> None:
        log.error(
            "connection_end_unwritten",
            connection_id=end.connection_id,
            reason=end.reason,
            error=exc.message,
        )
        self._unwritten_ends.append(end)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._unwritten_ends and self._unwritten_retry is None and not self._closing:
            self._unwritten_retry = asyncio.create_task(
                self._retry_unwritten_ends(), name="connection-ends-retry"
            )

    async def _retry_unwritten_ends(self) -> None:
        try:
            while self._unwritten_ends:
                await asyncio.sleep(UNWRITTEN_RETRY_SECONDS)
                await self.write_unwritten_ends()
        finally:
            self._unwritten_retry = None

    async def write_unwritten_ends(self) -> None:
        """Try once more to write the connection ends the store refused; those it
        still refuses are kept. Called before a session ends, whose end would
        otherwise close them under its own reason and time."""
        ends, self._unwritten_ends = self._unwritten_ends, []
        if not ends:
            return
        outcomes = await asyncio.gather(
            *(self._record_connection(end) for end in ends), return_exceptions=True
        )
        for end, outcome in zip(ends, outcomes, strict=True):
            if isinstance(outcome, StoreError):
                self._unwritten_ends.append(end)
            elif isinstance(outcome, BaseException):
                log.error(
                    "connection_end_dropped", connection_id=end.connection_id, error=repr(outcome)
                )
        if self._unwritten_ends:
            self._schedule_retry()
        else:
            log.warning("connection_ends_written", count=len(ends))

    async def _record_connection(
        self, change: ConnectionStart | ConnectionEnd
    ) -> ConnectionRecord | None:
        """Write a connection start or end, group-committed: whatever queues up
        while one store transaction runs goes into the next one, so a burst of
        connections shares transactions. Returns once this change is committed,
        exactly as a store call of its own would (errors included)."""
        outcome: asyncio.Future[ConnectionRecord | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._connection_changes.append((change, outcome))
        if self._connection_writer is None:
            self._connection_writer = asyncio.create_task(
                self._write_connection_changes(), name="connection-records"
            )
        return await outcome

    async def _write_connection_changes(self) -> None:
        try:
            while self._connection_changes:
                batch, self._connection_changes = self._connection_changes, []
                try:
                    results = await self.db(self.store.record_connections, [c for c, _ in batch])
                except Exception as exc:
                    for _, outcome in batch:
                        if not outcome.done():
                            outcome.set_exception(exc)
                    continue
                for (_, outcome), result in zip(batch, results, strict=True):
                    if outcome.done():  # its connection was cancelled meanwhile
                        continue
                    if isinstance(result, GatewayError):
                        outcome.set_exception(result)
                    else:
                        outcome.set_result(result)
        finally:
            self._connection_writer = None

    # --- lifecycle --------------------------------------------------------------

    async def start(self) -> int:
        """Close what a crash left open and start the heartbeat watchdog."""
        closed = await self.db(self.store.close_orphans, SessionEndReason.GATEWAY_CRASH)
        if closed:
            log.warning(
                "closed_orphaned_sessions", count=closed, reason=SessionEndReason.GATEWAY_CRASH
            )
        self._watchdog = asyncio.create_task(self._watch_heartbeats(), name="grant-watchdog")
        if self.settings.audit_enabled:
            await self.refresh_secrets()
            append = self._append_audit
            if self.audit_sink is not None:
                await self.audit_sink.start()
                append = self.audit_sink.append
            self.audit_writer = AuditWriter(
                append,
                on_failure=self._on_audit_failure,
                on_recovery=self._on_audit_recovery,
            )
            self.audit_writer.start()
        return closed

    async def refresh_secrets(self) -> None:
        """Reload the stored passwords the audit masks and forget looked-up upstream
        targets (after an account or resource is added, rotated or removed)."""
        self._targets.clear()
        self._targets_generation += 1

        def load() -> tuple[str, ...]:
            found: list[str] = []
            for account in self.store.list_accounts():
                try:
                    found.append(self.store.reveal_password(account.resource_name, account.name))
                except GatewayError:
                    continue  # an undecryptable row is reported when it is used
            return tuple(found)

        self._stored_secrets = await self.db(load)

    async def _append_audit(self, rows: list[EventRow]) -> int:
        return await self.db(self.store.append_audit_rows, rows, substitute_invalid=True)

    async def shutdown(self) -> None:
        """Ordered: refuse new work, tell live clients why, record, then close."""
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        termination = Termination(
            ConnectionEndReason.GATEWAY_SHUTDOWN,
            SqlState.ADMIN_SHUTDOWN,
            "terminating connection because the pam gateway is shutting down",
            hint="reconnect once the gateway is back, with a new `pam db access`",
        )
        grants = list(self._grants.values())
        for grant in grants:
            grant.listener.end(termination)
        await asyncio.gather(
            *(g.listener.close(wait=SHUTDOWN_GRACE_SECONDS) for g in grants),
            return_exceptions=True,
        )
        if self._connection_writer is not None:
            # Connection ends still being written go in before their sessions end.
            await asyncio.gather(self._connection_writer, return_exceptions=True)
        if self._unwritten_retry is not None:
            self._unwritten_retry.cancel()
            await asyncio.gather(self._unwritten_retry, return_exceptions=True)
        await self.write_unwritten_ends()
        if self.audit_writer is not None:
            # Flush the audit trail before the sessions are sealed and closed.
            await self.audit_writer.close()
        if self.audit_sink is not None:
            await self.audit_sink.close()
        for grant in grants:
            if grant.expiry_task is not None:
                grant.expiry_task.cancel()
            if not grant.ended:
                await self.db(
                    self.store.end_session,
                    grant.session.id,
                    reason=SessionEndReason.GATEWAY_SHUTDOWN,
                )
        self._grants.clear()
        self._executor.shutdown(wait=True)

    # --- grants -----------------------------------------------------------------

    async def open_access(
        self,
        *,
        requester: str,
        resource: str,
        account: str,
        duration_seconds: int,
        port: int | None = None,
    ) -> AccessSession:
        if self._closing:
            raise InvalidRequest("the gateway is shutting down")
        limit = self.settings.max_grant_seconds
        if not 1 <= duration_seconds <= limit:
            raise InvalidRequest(
                f"duration must be between 1 second and {timedelta(seconds=limit)}",
                hint="ask for a shorter --duration",
            )
        if port is not None and not 0 <= port <= 65535:
            raise InvalidRequest(f"port {port} is out of range")
        now = datetime.now(UTC)
        session = await self.db(
            self.store.create_session,
            requester=requester,
            resource=resource,
            account=account,
            listen_host=self.settings.listen_host,
            expires_at=now + timedelta(seconds=duration_seconds),
            started_at=now,
        )
        listener = AccessListener(
            GrantInfo(
                session_id=session.id,
                resource=session.resource_name,
                account=session.account_name,
                username=session.username,
                database=session.database,
                expires_at=session.expires_at,
            ),
            self,
            listen_host=self.settings.listen_host,
            port=port or 0,
        )
        try:
            bound_port = await listener.start()
        except OSError as exc:
            await self.db(
                self.store.end_session,
                session.id,
                reason=SessionEndReason.ERROR,
                detail=f"listen failed: {exc}",
            )
            raise InvalidRequest(
                f"cannot listen on {self.settings.listen_host}:{port}: {exc.strerror or exc}",
                hint="pick another --port, or omit it for a free one",
            ) from None
        await self.db(self.store.set_session_port, session.id, bound_port)
        session = await self.db(self.store.get_session, session.id)
        grant = ActiveGrant(session, listener, last_heartbeat=time.monotonic())
        grant.expiry_task = asyncio.create_task(
            self._expire_at(grant), name=f"grant-{session.id[:8]}-expiry"
        )
        self._grants[session.id] = grant
        log.info(
            "access_granted",
            session_id=session.id,
            requester=requester,
            resource=resource,
            account=account,
            port=bound_port,
            expires_at=session.expires_at.isoformat(),
        )
        return session

    async def heartbeat(self, session_id: str) -> AccessSession:
        """The CLI is still holding the grant; returns the session's current state."""
        grant = self._grants.get(session_id)
        if grant is None:
            return await self.db(self.store.get_session, session_id)
        grant.last_heartbeat = time.monotonic()
        return grant.session

    async def close_access(
        self,
        session_id: str,
        *,
        reason: SessionEndReason = SessionEndReason.CLIENT_ENDED,
        detail: str | None = None,
    ) -> AccessSession:
        grant = self._grants.get(session_id)
        if grant is None:
            return await self.db(self.store.get_session, session_id)
        termination = Termination(
            ConnectionEndReason.SESSION_ENDED,
            SqlState.ADMIN_SHUTDOWN,
            f"terminating connection because access session {session_id[:8]} was ended"
            + (f": {detail}" if detail else " by its owner"),
            hint="request new access with `pam db access`",
        )
        return await self._end(grant, reason=reason, detail=detail, termination=termination)

    async def _end(
        self,
        grant: ActiveGrant,
        *,
        reason: str,
        detail: str | None,
        termination: Termination,
        keep_listener: bool = False,
    ) -> AccessSession:
        session_id = grant.session.id
        grant.listener.end(termination)
        if grant.expiry_task is not None and grant.expiry_task is not asyncio.current_task():
            grant.expiry_task.cancel()
        if not grant.ended:
            # Let the cut connections record their end, and the writer store
            # it, before the session is closed (and its audit chain sealed).
            await grant.listener.wait_idle(SHUTDOWN_GRACE_SECONDS)
            if self.audit_writer is not None:
                await self.audit_writer.drain()
            await self.write_unwritten_ends()
            grant.ended = True
            grant.session = await self.db(
                self.store.end_session, session_id, reason=reason, detail=detail
            )
            log.info("access_ended", session_id=session_id, reason=reason, detail=detail)
        if not keep_listener:
            self._grants.pop(session_id, None)
            await grant.listener.close()
        return grant.session

    async def _expire_at(self, grant: ActiveGrant) -> None:
        delay = (grant.session.expires_at - datetime.now(UTC)).total_seconds()
        await asyncio.sleep(max(delay, 0.0))
        session = grant.session
        message = (
            f"access grant for {session.resource_name}/{session.account_name} expired at"
            f" {format_time(session.expires_at)}"
        )
        termination = Termination(
            ConnectionEndReason.EXPIRED,
            SqlState.ADMIN_SHUTDOWN,
            message,
            hint=f"request new access with `pam db access --resource {session.resource_name}"
            f" --account {session.account_name}`",
        )
        # The listener stays up, answering every new connection with this
        # message, until the CLI lets go of the grant or stops calling in.
        await self._end(
            grant,
            reason=SessionEndReason.EXPIRED,
            detail=None,
            termination=termination,
            keep_listener=True,
        )

    async def _watch_heartbeats(self) -> None:
        timeout = self.settings.heartbeat_timeout_seconds
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_SECONDS)
            now = time.monotonic()
            for grant in list(self._grants.values()):
                if now - grant.last_heartbeat <= timeout:
                    continue
                if grant.ended:
                    self._grants.pop(grant.session.id, None)
                    await grant.listener.close()
                    continue
                detail = f"the pam CLI holding the grant stopped responding for {timeout:g}s"
                try:
                    await self.close_access(
                        grant.session.id, reason=SessionEndReason.CLIENT_ENDED, detail=detail
                    )
                except Exception as exc:  # keep watching the other grants
                    log.error("watchdog_end_failed", session_id=grant.session.id, error=repr(exc))

    # --- verify -------------------------------------------------------------------

    async def verify(self, resource: str, account: str | None) -> list[VerifyResult]:
        accounts = (
            [account]
            if account
            else [a.name for a in await self.db(self.store.list_accounts, resource)]
        )
        res = await self.db(self.store.get_resource, resource)
        if not accounts:
            raise InvalidRequest(
                f"resource {resource!r} has no accounts to verify with",
                hint=f"add one with `pam account add {resource} NAME --username USER`",
            )
        return [await self._verify_one(res.name, name) for name in accounts]

    async def _verify_one(self, resource: str, account: str) -> VerifyResult:
        target = await self.upstream_target(resource, account)
        base = {
            "resource": resource,
            "account": account,
            "address": target.address,
            "ssl_mode": target.ssl_mode,
        }
        try:
            upstream = await connect_upstream(
                target, params={"application_name": "pam verify"}, timeout=self.connect_timeout
            )
        except UpstreamError as exc:
            return VerifyResult(
                ok=False,
                error_kind=exc.kind,
                error_sqlstate=exc.sqlstate,
                error=exc.message,
                hint=exc.hint,
                **base,  # type: ignore[arg-type]
            )
        upstream.writer.write(messages.terminate())
        await close_writer(upstream.writer)
        return VerifyResult(
            ok=True,
            latency_ms=round(upstream.connect_ms, 1),
            server_version=upstream.server_version,
            tls_version=upstream.tls_version,
            cipher=upstream.cipher,
            auth_method=upstream.handshake.auth_method,
            **base,
        )

    def live_connection_count(self, session_id: str) -> int:
        grant = self._grants.get(session_id)
        return len(grant.listener.connections) if grant else 0

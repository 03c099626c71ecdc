"""The grant service: open, heartbeat, end and expire access grants, and shutdown.

Owns every :class:`~gateway.net.listener.AccessListener`. Store calls go through
the :class:`~gateway.access.ports.SessionStore` port on the store thread, so the
event loop never blocks on disk.

Invariants:
* Expiry is enforced here, by a timer per grant, not trusted to the CLI: at
  ``expires_at`` every live connection gets a FATAL and new ones are refused.
  The same timer first warns: ``expiry_notice_seconds`` before it (5 and 1
  minutes), each live connection gets a NoticeResponse saying when it will be
  cut. A notice whose time had passed when the expiry was set is not owed.
* An extension moves a live grant's expiry later and reschedules that timer;
  it never touches a live connection (a ``pg_sleep`` across the old expiry
  completes). It is checked (gateway maximum, then the caller's policy check)
  and written under the grant's lock, one at a time.
* A grant whose CLI stops calling in (heartbeat) for ``heartbeat_timeout``
  seconds is ended, so a ``kill -9``-ed CLI leaves no open door.
* A session row is written before its listener accepts anything, naming this
  gateway; at start-up the rows a crash of this gateway (or of another whose
  presence lease has lapsed) left open are closed with ``gateway_crash``. ``prepare``
  (a grant's own database role) runs between the two: a grant it refuses has its
  session ended as ``error`` and never opens a door.
* A session ends only after its cut connections have recorded their ends and
  the audit trail has been flushed, so its seal covers them.
* Shutdown is ordered: refuse new work, hand tunnel grants to another gateway
  of the fleet if one is up (``gateway.access.failover``), tell live clients
  why, record the connections' ends, flush the trail, then end the sessions
  not handed over.
* Every session this service ends is handed to ``on_ended`` (the composition
  root publishes it as a notification), once, after its row is ended.
* The store is the truth for a grant held by another gateway on the same store:
  revoking or extending it here writes the store, and the gateway holding it
  applies the change (``gateway.access.changes``, fed by the store's change
  notifications and a periodic reconcile).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.access.admission import check_grant_request
from gateway.access.changes import ChangesMadeElsewhere, end_words
from gateway.access.connections import ConnectionRecords
from gateway.access.failover import GrantTakeOver, client_key, handed_over
from gateway.access.grants import Grant, GrantState, format_time, is_live
from gateway.access.ports import SessionRecord, SessionStore, StoreThread
from gateway.audit.runtime import AuditRuntime
from gateway.config import GatewaySettings
from gateway.credentials.pki import GatewayPki, grant_id_of, is_within_validity, public_key_of
from gateway.durations import format_duration, in_words
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.net.listener import (
    DEFAULT_SOCKET_PORT,
    AccessListener,
    ConnectionHost,
    GrantInfo,
    unix_socket_path,
)
from gateway.net.relay import Termination
from gateway.net.relays import RelayPool
from gateway.protocol import messages
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason, SessionEndReason

__all__ = ["ExtensionCheck", "GrantService"]

log = structlog.get_logger(__name__)

WATCHDOG_INTERVAL_SECONDS = 0.5
SHUTDOWN_GRACE_SECONDS = 3.0
#: What an extension's caller checks before the expiry moves: the session and the
#: grant's whole duration with the extension, in seconds; raises to refuse.
ExtensionCheck = Callable[[SessionRecord, int], Awaitable[None]]

_SHUTDOWN = Termination(
    ConnectionEndReason.GATEWAY_SHUTDOWN,
    SqlState.ADMIN_SHUTDOWN,
    "terminating connection because the pam gateway is shutting down",
    hint="reconnect once the gateway is back, with a new `pam db access`",
)


@dataclass(eq=False)
class GrantService(ChangesMadeElsewhere, GrantTakeOver):
    store: SessionStore
    db: StoreThread
    settings: GatewaySettings
    #: what the listeners call back into
    host: ConnectionHost
    records: ConnectionRecords
    audit: AuditRuntime
    #: signs the client certificates of grants opened from another host
    pki: GatewayPki | None = None
    #: told of every session this service ends (after its row is ended); must not block
    on_ended: Callable[[SessionRecord], None] | None = None
    #: awaited for each new grant after its session row is written and before its
    #: door opens (a grant's own database role is made here); raising refuses the
    #: grant, its session ended as ``error`` with the reason
    prepare: Callable[[SessionRecord], Awaitable[None]] | None = None
    #: told of every change made by another gateway that this one applied to a
    #: grant it holds (ended, or its expiry moved); must not block
    on_changed_elsewhere: Callable[[SessionRecord], None] | None = None
    #: relay worker processes the grants' doors hand connections to (``--workers``)
    relays: RelayPool | None = None
    _grants: dict[str, Grant] = field(default_factory=dict)
    #: take-overs in flight (``gateway.access.failover``), one per grant
    _taking: dict[str, asyncio.Task[Grant | None]] = field(default_factory=dict)
    #: the sessions a crash had left open that :meth:`start` ended
    recovered_at_start: list[str] = field(default_factory=list)
    _watchdog: asyncio.Task[None] | None = None
    _closing: bool = False

    @property
    def gateway_id(self) -> str:
        return self.settings.gateway_id

    async def start(self) -> int:
        """Close what a crash left open and start the heartbeat watchdog.

        Before this gateway renews its presence lease: its own sessions left by
        its previous run end at that run's last renewal. So do those of other
        gateways whose lease has lapsed; a live gateway's are left alone."""
        ended: list[str] = []
        closed = await self.db(
            self.store.close_orphans, self.settings.gateway_id, starting=True, ended=ended
        )
        self.recovered_at_start = ended
        if closed:
            log.warning(
                "closed_orphaned_sessions", count=closed, reason=SessionEndReason.GATEWAY_CRASH
            )
        self._watchdog = asyncio.create_task(self._watch_heartbeats(), name="grant-watchdog")
        return closed

    def terminate_live(self, termination: Termination) -> None:
        """End every live connection of every grant; new ones are still let in."""
        for grant in list(self._grants.values()):
            grant.listener.terminate_live(termination)

    def live_counts(self) -> tuple[int, int]:
        """How many grants are live, and how many connections all grants have
        (an ending grant's are still open until they end)."""
        grants = self._grants.values()
        live = sum(1 for grant in grants if is_live(grant))
        return live, sum(len(grant.listener.connections) for grant in grants)

    def live_connection_count(self, session_id: str) -> int:
        grant = self._grants.get(session_id)
        return len(grant.listener.connections) if grant else 0

    async def shutdown(self) -> None:
        """Ordered: refuse new work, tell live clients why, record, then close.

        The change follower is stopped before this (``Gateway.shutdown``) and the
        watchdog first thing here: they are what applies a store change, so
        nothing lets go of a grant this shutdown hands over."""
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        grants = list(self._grants.values())
        # Tunnel grants go on through another gateway of the fleet, if one is up.
        heirs = await self.hand_over(grants)
        for grant in grants:
            session_id = grant.session.id
            grant.listener.end(handed_over(session_id) if session_id in heirs else _SHUTDOWN)
        await asyncio.gather(
            *(g.listener.close(wait=SHUTDOWN_GRACE_SECONDS) for g in grants),
            return_exceptions=True,
        )
        # Connection ends still being written go in before their sessions end.
        await self.records.close()
        # Flush the audit trail before the sessions are sealed and closed.
        await self.audit.close()
        for grant in grants:
            if grant.expiry_task is not None:
                grant.expiry_task.cancel()
            if not grant.is_ended and grant.session.id not in heirs:
                ended = await self.db(
                    self.store.end_session,
                    grant.session.id,
                    reason=SessionEndReason.GATEWAY_SHUTDOWN,
                )
                self._ended(ended)
        self._grants.clear()

    def _ended(self, session: SessionRecord) -> None:
        if self.on_ended is not None:
            self.on_ended(session)

    async def open_access(
        self,
        *,
        requester: str,
        resource: str,
        account: str,
        duration_seconds: int,
        port: int | None = None,
        request: dict[str, str | None] | None = None,
        owner_uid: int | None = None,
        socket_dir: str | None = None,
        csr: str | None = None,
        idle_timeout_seconds: int | None = None,
        idle_policy: str | None = None,
    ) -> SessionRecord:
        """Open a grant; *request* is what its session records of who asked
        (``gateway.store.models.REQUEST_FIELDS``), decided by the caller;
        ``owner_uid`` (the API caller's OS user, found by the kernel) alone may
        connect; ``socket_dir`` serves a Unix socket there instead of a TCP
        port, and needs an owner. With ``csr`` (from a CLI on another host) it
        is reached through the tunnel with the certificate issued for it
        (:meth:`certificate_of`) and opens no local port. With
        ``idle_timeout_seconds`` (the allowing policy's, named ``idle_policy``)
        a connection idle that long is cut."""
        public_key = self._check_csr(csr)
        check_grant_request(
            duration_seconds=duration_seconds,
            port=port,
            max_grant_seconds=self.settings.max_grant_seconds,
            closing=self._closing,
        )
        unix_path = None
        if socket_dir is not None:
            if owner_uid is None:
                raise InvalidRequest(
                    "a Unix socket grant needs `pam db access` to run on the gateway's host",
                    hint="omit --socket to get a local TCP port",
                )
            port = port or DEFAULT_SOCKET_PORT
            unix_path = unix_socket_path(socket_dir, port, owner_uid)
        now = datetime.now(UTC)
        session = await self.db(
            self.store.create_session,
            requester=requester,
            resource=resource,
            account=account,
            # A directory, as libpq's host= names a Unix socket's.
            listen_host=socket_dir or self.settings.listen_host,
            expires_at=now + timedelta(seconds=duration_seconds),
            started_at=now,
            request=request,
            gateway_id=self.settings.gateway_id,
            client_public_key=None
            if public_key is None
            else public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode(),
            idle_timeout_seconds=idle_timeout_seconds,
            idle_policy=idle_policy,
        )
        if self.prepare is not None:
            await self._prepare(session)
        bound_port, listener = await self._listen(
            session,
            port,
            owner_uid,
            unix_path,
            bind=public_key is None,
            idle=(idle_timeout_seconds, idle_policy),
        )
        if bound_port:
            await self.db(self.store.set_session_port, session.id, bound_port)
        session = await self.db(self.store.get_session, session.id)
        self._hold(session, listener)
        log.info(
            "access_granted",
            session_id=session.id,
            requester=requester,
            resource=resource,
            account=account,
            port=bound_port,
            expires_at=session.expires_at.isoformat(),
            idle_timeout_seconds=idle_timeout_seconds,
        )
        return session

    def _hold(self, session: SessionRecord, listener: AccessListener) -> Grant:
        """*session*'s grant, held here from now: its door, its client certificate
        (a tunnel grant's, for the client key its session stores), its expiry
        timer and heartbeat watch."""
        grant = Grant(session, listener, last_heartbeat=time.monotonic())
        key = client_key(session)
        if key is not None:
            assert self.pki is not None  # no tunnel grant without a CA
            grant.certificate = self.pki.issue_grant(key, session.id, session.expires_at)
            grant.public_key = public_key_of(grant.certificate)
        self._schedule_expiry(grant)
        self._grants[session.id] = grant
        return grant

    async def _prepare(self, session: SessionRecord) -> None:
        assert self.prepare is not None
        try:
            await self.prepare(session)
        except Exception as exc:
            detail = exc.message if isinstance(exc, GatewayError) else repr(exc)
            await self.db(
                self.store.end_session,
                session.id,
                reason=SessionEndReason.ERROR,
                detail=f"the grant could not be prepared: {detail}",
            )
            log.warning("access_not_prepared", session_id=session.id, error=detail)
            raise

    @property
    def expiry_notice_seconds(self) -> list[int]:
        """How long before expiry live connections are warned, longest first."""
        return sorted(set(self.settings.expiry_notice_seconds), reverse=True)

    def _check_csr(self, csr: str | None) -> ec.EllipticCurvePublicKey | None:
        if csr is None:
            return None
        if self.pki is None:
            raise InvalidRequest(
                "this gateway has no CA, so it cannot be reached from another host",
                hint="run `pam gateway init --force` on the gateway host to create one",
            )
        return self.pki.check_csr(csr)

    async def certificate_of(self, session_id: str) -> bytes | None:
        """The client certificate (PEM) issued for a grant opened with a CSR
        (taken over first if another gateway held it: its CLI failed over here)."""
        grant = await self.take_over(session_id)
        return grant.certificate if grant else None

    async def _door(self, session: SessionRecord) -> AccessListener:
        """The door of a tunnel grant taken over from another gateway."""
        idle = (session.idle_timeout_seconds, session.idle_policy)
        _port, listener = await self._listen(session, None, None, None, bind=False, idle=idle)
        return listener

    async def tunnel_door(self, cert_der: bytes | None) -> AccessListener | Termination:
        """The door of the grant a tunnel peer's (CA-verified) certificate names,
        or why it is refused: an ended grant's own reason, else 28000."""
        grant_id = grant_id_of(cert_der) if cert_der else None
        if cert_der is None or grant_id is None:
            return _cert_refused("the client certificate names no pam grant")
        grant = self._grants.get(grant_id)
        if grant is not None and grant.public_key != public_key_of(cert_der):
            return _cert_refused("the client certificate is not the one issued for this grant")
        if grant is not None and grant.listener.refusal is not None:
            return grant.listener  # ended, not yet let go: it answers with the end's reason
        if grant is None and is_within_validity(cert_der):
            # Held by another gateway, or by none since it died: failover.
            grant = await self.take_over_with(grant_id, cert_der)
        if grant is not None:
            if not is_within_validity(cert_der):
                return _cert_refused("the client certificate is outside its validity period")
            return grant.listener
        try:
            session = await self.db(self.store.get_session, grant_id)
        except NotFound:
            session = None
        if session is None or session.id != grant_id:
            return _cert_refused("the client certificate names a grant this gateway does not have")
        return Termination(
            ConnectionEndReason.SESSION_ENDED,
            SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
            f"access session {grant_id[:8]} has ended ({end_words(session)})",
            hint="request new access with `pam db access`",
        )

    async def _listen(
        self,
        session: SessionRecord,
        port: int | None,
        owner_uid: int | None,
        unix_path: str | None,
        *,
        bind: bool = True,
        idle: tuple[int | None, str | None] = (None, None),
    ) -> tuple[int, AccessListener]:
        listener = AccessListener(
            GrantInfo(
                session_id=session.id,
                resource=session.resource_name,
                account=session.account_name,
                username=session.username,
                database=session.database,
                expires_at=session.expires_at,
                idle_timeout_seconds=idle[0],
                idle_policy=idle[1],
            ),
            self.host,
            listen_host=self.settings.listen_host,
            port=port or 0,
            owner_uid=owner_uid,
            unix_path=unix_path,
            relays=self.relays,
        )
        if not bind:
            return 0, listener  # a tunnel grant: its connections come through the tunnel
        try:
            return await listener.start(), listener
        except OSError as exc:
            await self.db(
                self.store.end_session,
                session.id,
                reason=SessionEndReason.ERROR,
                detail=f"listen failed: {exc}",
            )
            where = unix_path or f"{self.settings.listen_host}:{port}"
            raise InvalidRequest(
                f"cannot listen on {where}: {exc.strerror or exc}",
                hint="pick another --port, or omit it for a free one"
                if unix_path is None
                else "pick another --port (the socket is named after it)",
            ) from None

    async def heartbeat(self, session_id: str) -> SessionRecord:
        """The CLI is still holding the grant; returns the session's current state.
        A tunnel grant another gateway held is taken over: its CLI failed over here."""
        grant = await self.take_over(session_id)
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
    ) -> SessionRecord:
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

    async def revoke(self, session_id: str, *, by: str, reason: str | None) -> SessionRecord:
        """End a live grant now on an admin's (or its owner's) word: every live
        connection gets FATAL 57P01 naming who and why, new ones are refused."""
        grant = self._grants.get(session_id)
        why = f"revoked by {by}" + (f": {reason}" if reason else "")
        if grant is None:
            return await self._revoke_in_store(session_id, why)
        if grant.is_ended:
            raise _not_live(grant.session)
        termination = Termination(
            ConnectionEndReason.SESSION_ENDED,
            SqlState.ADMIN_SHUTDOWN,
            f"terminating connection because access session {session_id[:8]} was {why}",
            hint=f"ask {by} or an administrator; request new access with `pam db access`",
        )
        # As at expiry, the port stays up answering new connections with this
        # reason (not a closed socket) until the CLI lets go of the grant.
        return await self._end(
            grant,
            reason=SessionEndReason.REVOKED,
            detail=why,
            termination=termination,
            keep_listener=True,
        )

    async def _revoke_in_store(self, session_id: str, why: str) -> SessionRecord:
        """Revoke a grant this gateway does not hold: end its session in the
        store, which tells the gateway holding it (that one cuts its connections)."""
        session = await self.db(self.store.get_session, session_id)
        if session.ended_at is not None:
            raise _not_live(session)
        ended = await self.db(
            self.store.end_session, session.id, reason=SessionEndReason.REVOKED, detail=why
        )
        if ended.end_reason != SessionEndReason.REVOKED or ended.end_detail != why:
            raise _not_live(ended)  # another end won meanwhile
        log.info("access_revoked_in_store", session_id=ended.id, detail=why)
        self._ended(ended)
        return ended

    async def extend(
        self,
        session_id: str,
        *,
        by_seconds: int,
        by: str,
        authorize: ExtensionCheck | None = None,
    ) -> SessionRecord:
        """Move a live grant's expiry *by_seconds* later, on *by*'s word.

        Refused beyond the gateway's ``max_grant_seconds`` (counted from the
        start), or by *authorize* (the caller's policy check, given the whole
        new duration). Live connections are not touched; the expiry timer and
        its notices are rescheduled; a tunnel grant's client certificate is
        re-issued for the same key, valid until the new expiry
        (:meth:`certificate_of`)."""
        if by_seconds <= 0:
            raise InvalidRequest("an extension must be at least 1 second")
        if self._closing:
            raise InvalidRequest("the gateway is shutting down")
        if session_id not in self._grants:
            return await self._extend_in_store(session_id, by_seconds, by, authorize)
        grant = await self._live_grant(session_id)
        async with grant.extending:
            await self._live_grant(session_id)  # may have ended while we waited
            previous = grant.session.expires_at
            expires_at = await self._checked_expiry(grant.session, by_seconds, authorize)
            await self._live_grant(session_id)  # may have expired during the check
            # Nothing fires while the row moves: the timer is not in _end (the
            # grant is live, checked with no await since), so cancelling is safe.
            if grant.expiry_task is not None:
                grant.expiry_task.cancel()
            try:
                session = await self.db(
                    self.store.extend_session,
                    session_id,
                    expires_at=expires_at,
                    previous=previous,
                )
            except BaseException:
                self._schedule_expiry(grant)  # the old expiry stands
                raise
            if grant.is_ended:  # ended while the row moved: its end stands
                return grant.session
            self._take_expiry(grant, session)
        _log_extended("access_extended", session, previous, by=by, by_seconds=by_seconds)
        return session

    async def _extend_in_store(
        self, session_id: str, by_seconds: int, by: str, authorize: ExtensionCheck | None
    ) -> SessionRecord:
        """Extend a grant this gateway does not hold: move its session's expiry
        in the store, which tells the gateway holding it (that one reschedules
        its expiry). Checked as a local extension is."""
        session = await self._stored_live_session(session_id)
        previous = session.expires_at
        expires_at = await self._checked_expiry(session, by_seconds, authorize)
        extended = await self.db(
            self.store.extend_session, session.id, expires_at=expires_at, previous=previous
        )
        _log_extended("access_extended_in_store", extended, previous, by=by, by_seconds=by_seconds)
        return extended

    async def _checked_expiry(
        self, session: SessionRecord, by_seconds: int, authorize: ExtensionCheck | None
    ) -> datetime:
        """*session*'s expiry moved *by_seconds* later, if this gateway's limit
        and *authorize* allow the grant's new length; else raises."""
        expires_at = session.expires_at + timedelta(seconds=by_seconds)
        total = math.ceil((expires_at - session.started_at).total_seconds())
        if total > self.settings.max_grant_seconds:
            limit = format_duration(self.settings.max_grant_seconds)
            raise InvalidRequest(
                f"a grant may last at most {limit} on this gateway; extended by"
                f" {format_duration(by_seconds)} it would last {format_duration(total)}",
                hint="extend by less, or request new access with `pam db access`",
            )
        if authorize is not None:
            await authorize(session, total)
        return expires_at

    async def _stored_live_session(self, session_id: str) -> SessionRecord:
        """The session of a grant another gateway holds, if the store has it
        live (not ended, not past its expiry), else InvalidRequest."""
        session = await self.db(self.store.get_session, session_id)
        if session.ended_at is not None or session.expires_at <= datetime.now(UTC):
            raise _not_live(session)
        return session

    async def live_session(self, session_id: str) -> SessionRecord:
        """The session of a live grant (this gateway's, else as the store has
        it), else InvalidRequest naming its end."""
        if session_id not in self._grants:
            return await self._stored_live_session(session_id)
        return (await self._live_grant(session_id)).session

    def _take_expiry(self, grant: Grant, session: SessionRecord) -> None:
        """*session*'s expiry is *grant*'s: its listener, certificate and timer."""
        grant.session = session
        grant.listener.grant.expires_at = session.expires_at
        key = client_key(session)
        if key is not None and self.pki is not None:
            grant.certificate = self.pki.issue_grant(key, session.id, session.expires_at)
        self._schedule_expiry(grant)

    async def _live_grant(self, session_id: str) -> Grant:
        """The grant of *session_id* if it is live, else InvalidRequest naming its end."""
        grant = self._grants.get(session_id)
        if grant is not None and is_live(grant):
            return grant
        raise _not_live(await self.db(self.store.get_session, session_id))

    def _schedule_expiry(self, grant: Grant) -> None:
        """(Re)start the grant's timer: its notices, then its expiry."""
        if is_live(grant):
            grant.expiry_task = asyncio.create_task(
                self._expire_at(grant), name=f"grant-{grant.session.id[:8]}-expiry"
            )

    async def end_grants_of(self, principal_id: str, *, detail: str) -> int:
        """End every live grant of *principal_id* (it was disabled); how many."""
        ended = 0
        for grant in list(self._grants.values()):
            if grant.session.principal_id != principal_id or grant.is_ended:
                continue
            await self._end_disabled(grant, detail)
            ended += 1
        return ended

    async def _end_disabled(self, grant: Grant, detail: str) -> None:
        termination = Termination(
            ConnectionEndReason.SESSION_ENDED,
            SqlState.ADMIN_SHUTDOWN,
            f"terminating connection because access session {grant.session.id[:8]}"
            f" was ended: {detail}",
            hint="ask an administrator",
        )
        await self._end(
            grant, reason=SessionEndReason.REVOKED, detail=detail, termination=termination
        )

    async def _end(
        self,
        grant: Grant,
        *,
        reason: str,
        detail: str | None,
        termination: Termination,
        keep_listener: bool = False,
    ) -> SessionRecord:
        session_id = grant.session.id
        grant.listener.end(termination)
        if grant.expiry_task is not None and grant.expiry_task is not asyncio.current_task():
            grant.expiry_task.cancel()
        if not grant.is_ended:
            # Let the cut connections record their end, and the writer store
            # it, before the session is closed (and its audit chain sealed).
            await grant.listener.wait_idle(SHUTDOWN_GRACE_SECONDS)
            await self.audit.drain()
            await self.records.write_unwritten_ends()
            grant.state = GrantState.ENDED
            grant.session = await self.db(
                self.store.end_session, session_id, reason=reason, detail=detail
            )
            log.info("access_ended", session_id=session_id, reason=reason, detail=detail)
            self._ended(grant.session)
        if not keep_listener:
            self._grants.pop(session_id, None)
            await grant.listener.close()
        return grant.session

    async def _expire_at(self, grant: Grant) -> None:
        session = grant.session
        scheduled = datetime.now(UTC)
        for lead in self.expiry_notice_seconds:
            notice_at = session.expires_at - timedelta(seconds=lead)
            if notice_at <= scheduled:
                continue  # already past when this expiry was set: not owed
            await asyncio.sleep(max((notice_at - datetime.now(UTC)).total_seconds(), 0.0))
            self._warn_of_expiry(grant, lead)
        delay = (session.expires_at - datetime.now(UTC)).total_seconds()
        await asyncio.sleep(max(delay, 0.0))
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

    def _warn_of_expiry(self, grant: Grant, lead: int) -> None:
        session = grant.session
        notice = messages.notice_response(
            "WARNING",
            SqlState.WARNING,
            f"access grant for {session.resource_name}/{session.account_name} expires at"
            f" {session.expires_at.astimezone(UTC):%H:%M:%S} UTC (in {in_words(lead)});"
            " connections will be closed then",
            hint=f"extend it with `pam grant extend {session.id[:8]} --by 30m`"
            " (or press e in the running `pam db access`)",
        )
        sent = grant.listener.notify_live(notice)
        log.info("expiry_notice", session_id=session.id, lead_seconds=lead, connections=sent)

    async def _watch_heartbeats(self) -> None:
        timeout = self.settings.heartbeat_timeout_seconds
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_SECONDS)
            now = time.monotonic()
            for grant in list(self._grants.values()):
                if now - grant.last_heartbeat <= timeout:
                    continue
                if grant.is_ended:
                    self._grants.pop(grant.session.id, None)
                    await grant.listener.close()
                    continue
                detail = f"the pam CLI holding the grant stopped responding for {timeout:g}s"
                try:
                    # What the store says of it first, as a change notification
                    # would have it applied: one another gateway took over (its
                    # CLI calls in there) or ended is not this one's to end.
                    states = await self.db(self.store.grant_states, [grant.session.id])
                    if await self.apply_stored(states):
                        continue
                    await self.close_access(
                        grant.session.id, reason=SessionEndReason.CLIENT_ENDED, detail=detail
                    )
                except Exception as exc:  # keep watching the other grants
                    log.error("watchdog_end_failed", session_id=grant.session.id, error=repr(exc))


def _log_extended(
    event: str, session: SessionRecord, previous: datetime, *, by: str, by_seconds: int
) -> None:
    log.info(
        event,
        session_id=session.id,
        by=by,
        by_seconds=by_seconds,
        previous_expires_at=previous.isoformat(),
        expires_at=session.expires_at.isoformat(),
    )


def _not_live(session: SessionRecord) -> InvalidRequest:
    return InvalidRequest(
        f"access session {session.id[:8]} is not live"
        + (f" (it ended: {session.end_reason})" if session.end_reason else "")
    )


def _cert_refused(message: str) -> Termination:
    return Termination(
        ConnectionEndReason.ERROR,
        SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
        message,
        hint="request new access with `pam db access`, which issues a new certificate",
    )

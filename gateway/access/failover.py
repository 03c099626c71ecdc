"""Failover: a gateway taking over a grant another gateway held, and the other
letting go of it.

A grant opened from another host (a tunnel grant) is reachable through any
gateway of the fleet: they share the store and the CA, and the store keeps the
grant's client public key. When its CLI cannot reach the gateway holding it
(dead, or cut off), it turns to another: its heartbeat, its certificate request
or its next tunnel connection arrives there, and that gateway takes the grant
over (:meth:`GrantTakeOver.take_over`): the store's ``holder_id`` moves to it
(``FleetStore.take_over_session``, announced to every gateway), and it builds
the grant's door, expiry timer and heartbeat watch from the stored session.
The grant's expiry, its trail (the chain is the store's, whoever appends) and
its session carry on. The previous holder, if it is alive, lets go when it
hears of the move (:meth:`GrantTakeOver._let_go`): its live connections of the
grant are cut with 57P01 saying where the grant went, and it forgets the grant
without ending the session.

A gateway stopping (SIGTERM: a rolling restart) hands its live tunnel grants
to another gateway present (:meth:`GrantTakeOver.hand_over`) instead of ending
them; the heir builds each at once (:meth:`GrantTakeOver.adopt`, on the change
notification or its reconcile) and watches its heartbeats from then on.

Invariants:

* Only a tunnel grant is taken over (a local port's door is on the dead host);
  only while its session is open and unexpired; only by a gateway with the
  fleet's CA (it re-issues the client certificate for the stored key).
* Through the tunnel, the certificate's public key must be the stored one
  before anything is written: a certificate alone moves nothing.
* One take-over at a time per grant on a gateway (concurrent heartbeat and
  tunnel connection share it).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from typing import Protocol

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.access.grants import Grant, release
from gateway.access.ports import SessionRecord, SessionStore, StoreThread
from gateway.config import GatewaySettings
from gateway.credentials.pki import GatewayPki, public_key_of
from gateway.errors import NotFound
from gateway.net.listener import AccessListener
from gateway.net.relay import Termination
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason

__all__ = ["GrantTakeOver", "client_key", "handed_over", "stored_key_der"]

log = structlog.get_logger(__name__)


class _GrantHolder(Protocol):
    """What of :class:`~gateway.access.service.GrantService` a take-over uses."""

    store: SessionStore
    db: StoreThread
    settings: GatewaySettings
    pki: GatewayPki | None
    on_changed_elsewhere: Callable[[SessionRecord], None] | None
    _grants: dict[str, Grant]
    _taking: dict[str, asyncio.Task[Grant | None]]
    _closing: bool

    @property
    def gateway_id(self) -> str: ...

    async def _door(self, session: SessionRecord) -> AccessListener: ...

    def _hold(self, session: SessionRecord, listener: AccessListener) -> Grant: ...

    async def take_over(self, session_id: str) -> Grant | None: ...

    async def _take_over(self, session_id: str) -> Grant | None: ...


def client_key(session: SessionRecord) -> ec.EllipticCurvePublicKey | None:
    """A tunnel grant's client key as its session stores it (None: a local grant)."""
    if session.client_public_key is None:
        return None
    key = serialization.load_pem_public_key(session.client_public_key.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)  # pki.check_csr admits no other
    return key


def stored_key_der(session: SessionRecord) -> bytes | None:
    """The DER SubjectPublicKeyInfo of a tunnel grant's stored client key."""
    key = client_key(session)
    if key is None:
        return None
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class GrantTakeOver:
    """The part of the grant service that takes grants over and lets them go."""

    async def take_over(self: _GrantHolder, session_id: str) -> Grant | None:
        """This gateway's grant of *session_id*: held already, or taken over now
        from the gateway that held it; None when it cannot be (not a tunnel
        grant, ended, expired, no CA, or this gateway is stopping)."""
        grant = self._grants.get(session_id)
        if grant is not None:
            return grant
        if self._closing or self.pki is None:
            return None
        task = self._taking.get(session_id)
        if task is None:
            task = asyncio.create_task(self._take_over(session_id), name="grant-take-over")
            self._taking[session_id] = task
            task.add_done_callback(lambda _t: self._taking.pop(session_id, None))
        return await asyncio.shield(task)

    async def take_over_with(self: _GrantHolder, session_id: str, cert_der: bytes) -> Grant | None:
        """:meth:`take_over` for a tunnel peer whose certificate names
        *session_id*: only when its public key is the grant's stored one."""
        if session_id not in self._grants:
            try:
                session = await self.db(self.store.get_session, session_id)
            except NotFound:
                return None
            stored = stored_key_der(session)
            if stored is None or not hmac.compare_digest(stored, public_key_of(cert_der)):
                return None
        return await self.take_over(session_id)

    async def _take_over(self: _GrantHolder, session_id: str) -> Grant | None:
        try:
            stored = await self.db(self.store.get_session, session_id)
        except NotFound:
            return None
        if stored.client_public_key is None or stored.ended_at is not None:
            return None
        me = self.settings.gateway_id
        session, previous = await self.db(self.store.take_over_session, stored.id, me)
        if session.holder_id != me or session.ended_at is not None:
            return None  # ended or expired meanwhile
        grant = self._hold(session, await self._door(session))
        log.warning(
            "access_taken_over",
            session_id=session.id,
            previous_holder=previous,
            expires_at=session.expires_at.isoformat(),
        )
        return grant

    async def _let_go(self: _GrantHolder, grant: Grant, holder: str | None) -> None:
        """Another gateway (*holder*) took *grant* over: cut its live connections
        here, saying so, and forget it; its session goes on there."""
        if self._grants.get(grant.session.id) is not grant:
            return
        self._grants.pop(grant.session.id, None)
        release(
            grant,
            Termination(
                ConnectionEndReason.GRANT_MOVED,
                SqlState.ADMIN_SHUTDOWN,
                f"terminating connection because access session {grant.session.id[:8]}"
                f" moved to gateway {holder or 'unknown'}",
                hint="reconnect: `pam db access` carries new connections there",
            ),
        )
        log.warning(
            "access_moved_elsewhere",
            session_id=grant.session.id,
            holder=holder,
            connections=len(grant.listener.connections),
        )
        await grant.listener.close()

    async def hand_over(self: _GrantHolder, grants: list[Grant]) -> dict[str, str]:
        """At shutdown: give each live tunnel grant of *grants* to another gateway
        present (``FleetStore.hand_over_session``); returns session id -> heir.
        A grant that cannot be handed over (no other gateway, the store out of
        reach) is not in the result: the caller ends it as before."""
        heirs: dict[str, str] = {}
        for grant in grants:
            if grant.is_ended or grant.session.client_public_key is None:
                continue
            try:
                heir = await self.db(
                    self.store.hand_over_session, grant.session.id, self.gateway_id
                )
            except Exception as exc:  # ended instead, as without a fleet
                log.warning("hand_over_failed", session_id=grant.session.id, error=repr(exc))
                continue
            if heir is not None:
                heirs[grant.session.id] = heir
                log.info("access_handed_over", session_id=grant.session.id, heir=heir)
        return heirs

    async def adopt(self: _GrantHolder, session_ids: list[str]) -> int:
        """Build the grants the store says this gateway holds and it does not
        (handed over by a stopping gateway); how many. Each is watched from now:
        ended if its CLI does not call in within the heartbeat timeout."""
        adopted = 0
        for session_id in session_ids:
            if session_id not in self._grants and await self.take_over(session_id):
                adopted += 1
        return adopted


def handed_over(session_id: str) -> Termination:
    """What a live connection of a grant handed over at shutdown is told."""
    return Termination(
        ConnectionEndReason.GATEWAY_SHUTDOWN,
        SqlState.ADMIN_SHUTDOWN,
        "terminating connection because the pam gateway is shutting down; access session"
        f" {session_id[:8]} goes on through another gateway",
        hint="reconnect: `pam db access` carries new connections there",
    )

"""Applying what another gateway on the same store changed about a grant this
one holds: ended it (a revoke), disabled its principal, moved its expiry, or
took it over (failover: this one lets go, ``gateway.access.failover``).

:class:`ChangesMadeElsewhere` is part of
:class:`~gateway.access.service.GrantService`; ``gateway.app.changes`` feeds it
what the store says (``grant_states``), after a change notification or on its
periodic reconcile.

Invariants:

* The store is the truth: a change is read back from it, never taken from the
  notification, and applying it again is a no-op (its grant is already ended or
  moved).
* Applying a change made elsewhere writes nothing the store already has: an end
  made elsewhere cuts the live connections with the end's reason, once, and is
  handed to ``on_changed_elsewhere``, not ``on_ended`` (the gateway that made it
  told). A disabled principal's grant is ended here, as a local disable ends it.
* An expiry moved elsewhere is taken under the grant's ``extending`` lock, so a
  local extension in flight is not undone.
* The heartbeat watchdog applies what the store says of a silent grant the same
  way before it ends one: a grant taken over elsewhere is let go, not ended.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import structlog

from gateway.access.grants import Grant, is_live, release
from gateway.access.ports import SessionRecord, SessionStore, StoredGrantState, StoreThread
from gateway.net.relay import Termination
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason, SessionEndReason

__all__ = ["ChangesMadeElsewhere", "end_words", "termination_of_end"]

log = structlog.get_logger(__name__)


class _GrantHolder(Protocol):
    """What of :class:`~gateway.access.service.GrantService` applying a change uses."""

    store: SessionStore
    db: StoreThread
    on_changed_elsewhere: Callable[[SessionRecord], None] | None
    _grants: dict[str, Grant]

    async def _end_disabled(self, grant: Grant, detail: str) -> None: ...

    def _take_expiry(self, grant: Grant, session: SessionRecord) -> None: ...

    async def _ended_elsewhere(self, grant: Grant) -> None: ...

    async def _moved_elsewhere(self, grant: Grant) -> bool: ...

    async def _let_go(self, grant: Grant, holder: str | None) -> None: ...

    @property
    def gateway_id(self) -> str: ...


class ChangesMadeElsewhere:
    """The part of the grant service that applies changes made through another gateway."""

    def live_ids(
        self: _GrantHolder, *, session_id: str | None = None, principal_id: str | None = None
    ) -> list[str]:
        """The ids of the live grants this gateway holds: all, or the one of
        *session_id*, or those of *principal_id*."""
        return [
            grant.session.id
            for grant in self._grants.values()
            if is_live(grant)
            and (session_id is None or grant.session.id == session_id)
            and (principal_id is None or grant.session.principal_id == principal_id)
        ]

    async def apply_stored(self: _GrantHolder, states: Mapping[str, StoredGrantState]) -> int:
        """Apply what the store says of grants this gateway holds (changes made
        through another gateway); how many grants changed. A grant ended
        elsewhere has its live connections cut with the end's reason; one whose
        principal was disabled is ended here; one whose expiry moved has its
        timer rescheduled."""
        changed = 0
        for session_id, state in states.items():
            grant = self._grants.get(session_id)
            if grant is None or not is_live(grant):
                continue  # not ours, or already ending here
            if state.holder_id not in (None, self.gateway_id):
                await self._let_go(grant, state.holder_id)  # taken over (failover)
            elif state.ended_at is not None:
                await self._ended_elsewhere(grant)
            elif state.disabled_principal is not None:
                await self._end_disabled(grant, f"user {state.disabled_principal} was disabled")
            elif state.expires_at != grant.session.expires_at:
                if not await self._moved_elsewhere(grant):
                    continue
            else:
                continue
            changed += 1
        return changed

    async def _ended_elsewhere(self: _GrantHolder, grant: Grant) -> None:
        session = await self.db(self.store.get_session, grant.session.id)
        if session.ended_at is None or not is_live(grant):
            return  # the read raced a local end
        release(grant, termination_of_end(session))
        grant.session = session
        log.info(
            "access_ended_elsewhere",
            session_id=session.id,
            reason=session.end_reason,
            detail=session.end_detail,
            connections=len(grant.listener.connections),
        )
        # The listener stays up, answering new connections with the end's
        # reason, until the CLI lets go of the grant (as after a local revoke).
        if self.on_changed_elsewhere is not None:
            self.on_changed_elsewhere(session)

    async def _moved_elsewhere(self: _GrantHolder, grant: Grant) -> bool:
        """Take the stored expiry of *grant* (under its lock, so a local
        extension in flight is not undone); whether it moved."""
        async with grant.extending:
            session = await self.db(self.store.get_session, grant.session.id)
            if not is_live(grant) or session.ended_at is not None:
                return False
            if session.expires_at == grant.session.expires_at:
                return False  # a local extension landed it meanwhile
            previous = grant.session.expires_at
            if grant.expiry_task is not None:
                grant.expiry_task.cancel()
            self._take_expiry(grant, session)
        log.info(
            "access_extended_elsewhere",
            session_id=session.id,
            previous_expires_at=previous.isoformat(),
            expires_at=session.expires_at.isoformat(),
        )
        if self.on_changed_elsewhere is not None:
            self.on_changed_elsewhere(session)
        return True


def termination_of_end(session: SessionRecord) -> Termination:
    """What a live connection of *session*, ended through another gateway, is
    told: the words a local end of the same kind sends."""
    short = session.id[:8]
    if session.end_reason == SessionEndReason.REVOKED and session.end_detail:
        # "revoked by NAME: why" (a revoke), or "user NAME was disabled"
        revoked = session.end_detail.startswith("revoked by ")
        return Termination(
            ConnectionEndReason.SESSION_ENDED,
            SqlState.ADMIN_SHUTDOWN,
            f"terminating connection because access session {short} was"
            + (f" {session.end_detail}" if revoked else f" ended: {session.end_detail}"),
            hint="ask an administrator; request new access with `pam db access`",
        )
    return Termination(
        ConnectionEndReason.SESSION_ENDED,
        SqlState.ADMIN_SHUTDOWN,
        f"terminating connection because access session {short} was ended ({end_words(session)})",
        hint="request new access with `pam db access`",
    )


def end_words(session: SessionRecord) -> str:
    """How an ended session ended, for a person: its reason, and its detail if any."""
    why = session.end_reason or "ended"
    return f"{why}: {session.end_detail}" if session.end_detail else why

"""The request service: create, decide, open and expire access requests.

Drives :mod:`gateway.access.requests` (the pure state machine) with the store
(:class:`RequestStore`, on the store thread) and tells the rest of the gateway
of every change (``on_change``: webhooks). Who may decide is settled here,
from the principal and the request's policy: an approver is a principal
matching one of the policy's approvers (names, ``@group``), or an admin of the
request's project when the policy names none.

Invariants:
* Every change goes through :func:`~gateway.access.requests.apply` and is
  written with its trail record in one transaction, over the version it read.
* A request past its deadline is expired before anything else is done with it
  (by the sweeper, or on the spot when someone acts on it first).
* ``on_change`` runs after the write, and never blocks or fails the change.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from gateway.access.ports import StoreThread
from gateway.access.requests import (
    DEFAULT_OPEN_WITHIN,
    DEFAULT_PENDING_TTL,
    AccessRequest,
    Action,
    Actor,
    Approve,
    Cancel,
    Deny,
    Expire,
    Open,
    RequestState,
    Revoke,
    StateChange,
    TransitionRefused,
    apply,
    new_request,
)
from gateway.errors import InvalidRequest, NotFound
from gateway.identity.policy import Policy
from gateway.identity.principals import Principal

__all__ = ["RequestService", "RequestStore", "actor_for"]

log = structlog.get_logger(__name__)

#: how often the sweeper looks for requests past their deadline
SWEEP_INTERVAL_SECONDS = 5.0


class RequestStore(Protocol):
    """Requests and their trail (``gateway.store.Store`` implements it)."""

    def create_request(
        self, request: AccessRequest, changes: Sequence[StateChange]
    ) -> AccessRequest: ...

    def save_transition(
        self, after: AccessRequest, change: StateChange, *, expected_version: int
    ) -> AccessRequest: ...

    def get_request(self, request_id: str) -> AccessRequest: ...

    def list_requests(
        self,
        *,
        states: Sequence[RequestState] | None = None,
        requester_id: str | None = None,
        projects: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[AccessRequest]: ...

    def due_requests(self, now: datetime) -> list[AccessRequest]: ...


def actor_for(principal: Principal, request: AccessRequest) -> Actor:
    """*principal* as an actor on *request*: may it approve, is it an admin."""
    is_admin = principal.is_admin(request.project)
    if request.approvers:
        may_approve = any(principal.matches_subject(s) for s in request.approvers)
    else:
        may_approve = is_admin
    return Actor(principal.id, principal.name, may_approve=may_approve, is_admin=is_admin)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False)
class RequestService:
    store: RequestStore
    db: StoreThread
    pending_ttl: timedelta = DEFAULT_PENDING_TTL
    open_within: timedelta = DEFAULT_OPEN_WITHIN
    sweep_interval: float = SWEEP_INTERVAL_SECONDS
    #: told of every change once written (request after, change recorded)
    on_change: Callable[[AccessRequest, StateChange], None] | None = None
    clock: Callable[[], datetime] = _now
    _sweeper: asyncio.Task[None] | None = field(default=None, repr=False)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="request-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    # -- asking ---------------------------------------------------------------------

    async def create(
        self,
        principal: Principal,
        *,
        project: str,
        resource: str,
        account: str,
        duration_seconds: int,
        reason: str | None,
        policy: Policy,
        break_glass: bool = False,
        extends_session: str | None = None,
    ) -> AccessRequest:
        """A new request under *policy*; with *break_glass* it is approved at
        once; with *extends_session* it asks to extend that live grant by
        *duration_seconds*."""
        request, changes = new_request(
            id=uuid.uuid4().hex,
            project=project,
            requester=Actor(principal.id, principal.name),
            resource=resource,
            account=account,
            duration_seconds=duration_seconds,
            reason=reason,
            policy_name=policy.name,
            approvals_required=policy.approvals_required,
            approvers=policy.approvers,
            now=self.clock(),
            pending_ttl=self.pending_ttl,
            open_within=self.open_within,
            break_glass=break_glass,
            extends_session=extends_session,
        )
        await self.db(self.store.create_request, request, changes)
        for change in changes:
            self._tell(request, change)
        log.info(
            "access_requested",
            request_id=request.id,
            requester=principal.name,
            resource=resource,
            account=account,
            break_glass=break_glass,
        )
        return request

    # -- deciding -------------------------------------------------------------------

    async def approvable(self, principal: Principal, request_id: str) -> AccessRequest:
        """The request, when *principal* may approve it now (checked, not applied):
        so that a refusal is said before a second factor is asked for."""
        request = await self.visible(principal, request_id)
        apply(request, Approve(actor_for(principal, request)), self.clock())
        return request

    async def approve(
        self, principal: Principal, request_id: str, comment: str | None
    ) -> AccessRequest:
        request = await self.visible(principal, request_id)
        return await self._apply(request, Approve(actor_for(principal, request), comment))

    async def deny(self, principal: Principal, request_id: str, reason: str) -> AccessRequest:
        request = await self.visible(principal, request_id)
        return await self._apply(request, Deny(actor_for(principal, request), reason))

    async def cancel(self, principal: Principal, request_id: str) -> AccessRequest:
        request = await self.visible(principal, request_id)
        return await self._apply(request, Cancel(actor_for(principal, request)))

    # -- opening and after ------------------------------------------------------------

    async def openable(self, principal: Principal, request_id: str) -> AccessRequest:
        """The request, when *principal* may open it now (checked, not applied)."""
        request = await self.visible(principal, request_id)
        if request.extends:
            raise TransitionRefused(
                f"request {request.id[:8]} extends a live grant: it opens nothing",
                hint="once approved, the gateway applies it to its grant",
            )
        apply(request, Open(actor_for(principal, request), "-"), self.clock())
        return request

    async def opened(
        self, principal: Principal, request: AccessRequest, session_id: str
    ) -> AccessRequest:
        """Record that *request* was opened as *session_id* (over the version read)."""
        return await self._apply(request, Open(actor_for(principal, request), session_id))

    async def record_extension(
        self,
        principal: Principal,
        *,
        project: str,
        session_id: str,
        resource: str,
        account: str,
        by_seconds: int,
        reason: str | None,
        policy_name: str,
    ) -> AccessRequest:
        """Record an extension applied without approval (its policy, or the
        admin role, allowed it): a request made and applied at once, so the
        access trail holds every extension, who made it and by how much."""
        actor = Actor(principal.id, principal.name)
        request, changes = new_request(
            id=uuid.uuid4().hex,
            project=project,
            requester=actor,
            resource=resource,
            account=account,
            duration_seconds=by_seconds,
            reason=reason,
            policy_name=policy_name,
            approvals_required=0,
            approvers=(),
            now=self.clock(),
            open_within=self.open_within,
            extends_session=session_id,
        )
        request, applied = apply(request, Open(actor, session_id), self.clock())
        await self.db(self.store.create_request, request, [*changes, applied])
        return request

    async def applied(self, request: AccessRequest) -> AccessRequest:
        """Record that the gateway applied an approved extension request."""
        actor = Actor(request.requester_id, request.requester)
        assert request.session_id is not None
        return await self._apply(request, Open(actor, request.session_id))

    async def revoked(self, request_id: str, *, by: Principal, reason: str | None) -> None:
        """The grant opened from *request_id* was revoked."""
        request = await self.db(self.store.get_request, request_id)
        if request.state is RequestState.OPENED:
            await self._apply(request, Revoke(actor_for(by, request), reason))

    # -- reading --------------------------------------------------------------------

    async def visible(self, principal: Principal, request_id: str) -> AccessRequest:
        """The request, when *principal* may see it (its requester, an approver,
        an admin or auditor of its project); expired first if it is due.
        Otherwise "not found", as for a request that does not exist."""
        request = await self.db(self.store.get_request, request_id)
        if not self.may_see(principal, request):
            raise NotFound(f"request '{request_id}' not found")
        return await self._expire_if_due(request)

    def may_see(self, principal: Principal, request: AccessRequest) -> bool:
        return (
            request.requester_id == principal.id
            or principal.reads_all_sessions(request.project)
            or actor_for(principal, request).may_approve
        )

    async def listing(
        self,
        principal: Principal,
        *,
        mine: bool,
        pending: bool,
        limit: int,
        states: Sequence[RequestState] | None = None,
    ) -> list[AccessRequest]:
        """What *principal* may see, newest first: with *mine* only its own;
        with *pending* only pending ones it may approve; with *states* only
        those in one of them. *limit* bounds the requests read, before the
        ones *principal* may not see are left out."""
        found = await self.db(
            self.store.list_requests,
            states=[RequestState.PENDING] if pending else states,
            requester_id=principal.id if mine else None,
            limit=limit,
        )
        now = self.clock()
        shown = []
        for request in found:
            if not self.may_see(principal, request):
                continue
            if pending:
                actor = actor_for(principal, request)
                if not actor.may_approve or actor.id == request.requester_id:
                    continue
                if request.expires_at <= now or request.approved_by(actor.id):
                    continue
            shown.append(request)
        return shown

    # -- internals ------------------------------------------------------------------

    async def _apply(self, request: AccessRequest, action: Action) -> AccessRequest:
        after, change = apply(request, action, self.clock())
        await self.db(self.store.save_transition, after, change, expected_version=request.version)
        self._tell(after, change)
        log.info(
            "access_request_changed",
            request_id=after.id,
            change=change.kind.value,
            actor=change.actor,
            state=after.state.value,
        )
        return after

    async def _expire_if_due(self, request: AccessRequest) -> AccessRequest:
        try:
            return await self._apply(request, Expire())
        except InvalidRequest:
            # Not due, not in a state that expires, or changed meanwhile: as it is now.
            return await self.db(self.store.get_request, request.id)

    def _tell(self, request: AccessRequest, change: StateChange) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(request, change)
        except Exception as exc:  # a listener's failure never fails the change
            log.error("request_listener_failed", request_id=request.id, error=repr(exc))

    async def expire_due(self) -> int:
        """Expire every request past its deadline; how many."""
        expired = 0
        for request in await self.db(self.store.due_requests, self.clock()):
            try:
                await self._apply(request, Expire())
                expired += 1
            except InvalidRequest as exc:  # another gateway or an actor got there first
                log.info("request_expiry_skipped", request_id=request.id, why=exc.message)
        return expired

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.expire_due()
            except Exception as exc:  # keep sweeping: the store may be back next time
                log.error("request_sweep_failed", error=repr(exc))

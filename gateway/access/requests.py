"""Access requests: the state machine of asking, approving and opening a grant.

Pure: no I/O, no clock of its own (``now`` is passed in), no store. Every
transition is :func:`apply` on one :class:`AccessRequest` with one action; it
returns the new request and the :class:`StateChange` the audit trail records,
or raises :class:`TransitionRefused` naming why. The allowed transitions are
all in :data:`ALLOWED` (as h11 keeps its states in one table)::

    (new) --request--> PENDING --approve (N distinct)--> APPROVED --open--> OPENED
    (new) --break-glass---------------------------------> APPROVED
    OPENED   --revoke--> REVOKED
    PENDING  --deny--> DENIED          PENDING/APPROVED --cancel--> CANCELLED
    PENDING  --expire (not decided in time)--> EXPIRED
    APPROVED --expire (approved, not opened in time)--> EXPIRED

Invariants:
* What was asked (resource, account, duration, reason) is fixed at creation:
  no action changes it.
* A requester never approves or denies their own request; an approver counts
  once; only an eligible approver (decided by the caller from the policy's
  approvers) approves or denies.
* A pending request expires at ``expires_at``; an approved one must be opened
  before ``use_by``. An expiry is applied only when due; an open after
  ``use_by`` is refused.
* The grant's clock starts when it is opened, not when it was requested: the
  request keeps a duration, not an end time.
* Every transition yields exactly one state change, recorded with the request's
  new state in one store transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from gateway.errors import InvalidRequest

__all__ = [
    "ALLOWED",
    "AccessRequest",
    "Actor",
    "Approval",
    "Approve",
    "Cancel",
    "ChangeKind",
    "Deny",
    "Expire",
    "Open",
    "RequestState",
    "Revoke",
    "StateChange",
    "TransitionRefused",
    "apply",
    "new_request",
]

#: a pending request with no decision expires after this long, by default
DEFAULT_PENDING_TTL: Final = timedelta(hours=1)
#: an approved request nobody opened expires after this long, by default
DEFAULT_OPEN_WITHIN: Final = timedelta(minutes=15)


class RequestState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    OPENED = "opened"
    REVOKED = "revoked"

    @property
    def is_final(self) -> bool:
        return not ALLOWED[self]


class ChangeKind(StrEnum):
    """What the audit trail records of a request (one per transition)."""

    REQUESTED = "requested"
    #: one approver's approval; ``detail`` says how many of how many
    APPROVED = "approved"
    DENIED = "denied"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    OPENED = "opened"
    REVOKED = "revoked"
    #: approval skipped by a policy allowing break-glass (recorded apart)
    BREAK_GLASS = "break_glass"


class TransitionRefused(InvalidRequest):
    """The action is not allowed in the request's state, or not to this actor."""


@dataclass(frozen=True)
class Actor:
    """Who acts, as the caller established it."""

    id: str
    name: str
    #: among the request's approvers (the policy's names/@groups, or its project's admins)
    may_approve: bool = False
    #: an admin of the request's project (may cancel another's request)
    is_admin: bool = False


@dataclass(frozen=True)
class Approval:
    by_id: str
    by: str
    at: datetime
    comment: str | None = None


@dataclass(frozen=True)
class AccessRequest:
    id: str
    project: str
    requester_id: str
    requester: str
    resource: str
    account: str
    duration_seconds: int
    reason: str | None
    #: the policy that asked for approval (or allowed break-glass)
    policy_name: str
    approvals_required: int
    #: the policy's approvers (names, @groups); empty: the project's admins
    approvers: tuple[str, ...]
    created_at: datetime
    #: a pending request not decided by then expires
    expires_at: datetime
    #: how long an approved request stays openable
    open_within_seconds: int
    state: RequestState = RequestState.PENDING
    break_glass: bool = False
    approvals: tuple[Approval, ...] = ()
    approved_at: datetime | None = None
    #: an approved request not opened by then expires
    use_by: datetime | None = None
    #: who denied, cancelled, revoked; and why
    decided_by: str | None = None
    decision_note: str | None = None
    #: the grant it opened (for an extension: the grant it extends)
    session_id: str | None = None
    #: an extension of the live grant ``session_id`` by ``duration_seconds``,
    #: not a new grant: once approved the gateway applies it ("opened")
    extends: bool = False
    #: bumped by every transition; the store writes only over the version it read
    version: int = 0

    def approved_by(self, actor_id: str) -> bool:
        return any(a.by_id == actor_id for a in self.approvals)


@dataclass(frozen=True)
class StateChange:
    """One record of the audit trail: what happened to a request, by whom."""

    request_id: str
    kind: ChangeKind
    actor: str
    at: datetime
    state: RequestState
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Approve:
    actor: Actor
    comment: str | None = None


@dataclass(frozen=True)
class Deny:
    actor: Actor
    reason: str


@dataclass(frozen=True)
class Cancel:
    actor: Actor


@dataclass(frozen=True)
class Expire:
    """Applied by the gateway when a deadline has passed."""


@dataclass(frozen=True)
class Open:
    actor: Actor
    session_id: str


@dataclass(frozen=True)
class Revoke:
    actor: Actor
    reason: str | None = None


Action = Approve | Deny | Cancel | Expire | Open | Revoke

#: The actions each state allows; a state allowing none is final.
ALLOWED: Final[dict[RequestState, tuple[type[Action], ...]]] = {
    RequestState.PENDING: (Approve, Deny, Cancel, Expire),
    RequestState.APPROVED: (Cancel, Expire, Open),
    RequestState.OPENED: (Revoke,),
    RequestState.DENIED: (),
    RequestState.CANCELLED: (),
    RequestState.EXPIRED: (),
    RequestState.REVOKED: (),
}

_VERBS: Final = {
    Approve: "approve",
    Deny: "deny",
    Cancel: "cancel",
    Expire: "expire",
    Open: "open",
    Revoke: "revoke",
}


def new_request(
    *,
    id: str,
    project: str,
    requester: Actor,
    resource: str,
    account: str,
    duration_seconds: int,
    reason: str | None,
    policy_name: str,
    approvals_required: int,
    approvers: tuple[str, ...],
    now: datetime,
    pending_ttl: timedelta = DEFAULT_PENDING_TTL,
    open_within: timedelta = DEFAULT_OPEN_WITHIN,
    break_glass: bool = False,
    extends_session: str | None = None,
) -> tuple[AccessRequest, list[StateChange]]:
    """A new request and what the trail records of it: ``requested``, and for
    break-glass ``break_glass`` too (the request is then approved at once).
    With *extends_session* it asks to extend that live grant by
    *duration_seconds*. One that needs no approval (an extension a policy
    allows outright, recorded for the trail) is approved at once."""
    if break_glass and extends_session is not None:
        raise TransitionRefused("break-glass opens access; it does not extend it")
    if break_glass and not (reason and reason.strip()):
        raise TransitionRefused("break-glass access requires a reason")
    request = AccessRequest(
        id=id,
        project=project,
        requester_id=requester.id,
        requester=requester.name,
        resource=resource,
        account=account,
        duration_seconds=duration_seconds,
        reason=reason,
        policy_name=policy_name,
        approvals_required=approvals_required,
        approvers=approvers,
        created_at=now,
        expires_at=now + pending_ttl,
        open_within_seconds=int(open_within.total_seconds()),
        break_glass=break_glass,
        session_id=extends_session,
        extends=extends_session is not None,
    )
    changes = [
        StateChange(
            id,
            ChangeKind.REQUESTED,
            requester.name,
            now,
            RequestState.PENDING if approvals_required or break_glass else RequestState.APPROVED,
            {
                "resource": resource,
                "account": account,
                "duration_seconds": duration_seconds,
                "reason": reason,
                "policy": policy_name,
                "approvals_required": approvals_required,
                "break_glass": break_glass,
                "extends_session": extends_session,
            },
        )
    ]
    if break_glass or not approvals_required:
        request = replace(
            request,
            state=RequestState.APPROVED,
            approved_at=now,
            use_by=now + open_within,
            version=1,
        )
    if break_glass:
        changes.append(
            StateChange(
                id,
                ChangeKind.BREAK_GLASS,
                requester.name,
                now,
                RequestState.APPROVED,
                {"reason": reason, "policy": policy_name},
            )
        )
    return request, changes


def apply(
    request: AccessRequest, action: Action, now: datetime
) -> tuple[AccessRequest, StateChange]:
    """The request after *action*, and the change to record; raises
    :class:`TransitionRefused` when the state or the actor does not allow it."""
    if not isinstance(action, ALLOWED[request.state]):
        raise TransitionRefused(
            f"cannot {_VERBS[type(action)]} request {request.id[:8]}: it is {request.state}",
            hint=_hint(request),
        )
    match action:
        case Approve():
            return _approve(request, action, now)
        case Deny():
            return _deny(request, action, now)
        case Cancel():
            return _cancel(request, action, now)
        case Expire():
            return _expire(request, now)
        case Open():
            return _open(request, action, now)
        case Revoke():
            return _revoke(request, action, now)


def _check_approver(request: AccessRequest, actor: Actor, verb: str) -> None:
    if actor.id == request.requester_id:
        raise TransitionRefused(
            f"{actor.name} asked for request {request.id[:8]} and cannot {verb} it",
            hint="another approver must decide"
            + ("; cancel it with `pam requests cancel`" if verb == "deny" else ""),
        )
    if not actor.may_approve:
        who = ", ".join(request.approvers) or f"the admins of project {request.project}"
        raise TransitionRefused(
            f"{actor.name} is not an approver of request {request.id[:8]}",
            hint=f"its approvers are: {who}",
        )


def _approve(
    request: AccessRequest, action: Approve, now: datetime
) -> tuple[AccessRequest, StateChange]:
    actor = action.actor
    _check_approver(request, actor, "approve")
    if request.approved_by(actor.id):
        raise TransitionRefused(
            f"{actor.name} has already approved request {request.id[:8]}",
            hint="an approver counts once; another approver must approve",
        )
    approvals = (*request.approvals, Approval(actor.id, actor.name, now, action.comment))
    done = len(approvals) >= request.approvals_required
    after = replace(
        request,
        approvals=approvals,
        state=RequestState.APPROVED if done else RequestState.PENDING,
        approved_at=now if done else None,
        use_by=now + timedelta(seconds=request.open_within_seconds) if done else None,
        version=request.version + 1,
    )
    detail = {
        "approvals": len(approvals),
        "approvals_required": request.approvals_required,
        "comment": action.comment,
    }
    return after, StateChange(request.id, ChangeKind.APPROVED, actor.name, now, after.state, detail)


def _deny(request: AccessRequest, action: Deny, now: datetime) -> tuple[AccessRequest, StateChange]:
    _check_approver(request, action.actor, "deny")
    if not action.reason.strip():
        raise TransitionRefused("a denial needs a reason", hint="give one with --reason TEXT")
    return _final(
        request, RequestState.DENIED, ChangeKind.DENIED, action.actor.name, now, action.reason
    )


def _cancel(
    request: AccessRequest, action: Cancel, now: datetime
) -> tuple[AccessRequest, StateChange]:
    actor = action.actor
    if actor.id != request.requester_id and not actor.is_admin:
        raise TransitionRefused(
            f"only {request.requester} or an admin of project {request.project}"
            f" may cancel request {request.id[:8]}"
        )
    return _final(request, RequestState.CANCELLED, ChangeKind.CANCELLED, actor.name, now, None)


def _expire(request: AccessRequest, now: datetime) -> tuple[AccessRequest, StateChange]:
    deadline = request.expires_at if request.state is RequestState.PENDING else request.use_by
    if deadline is None or now < deadline:
        raise TransitionRefused(f"request {request.id[:8]} is not due to expire")
    note = (
        "not decided in time"
        if request.state is RequestState.PENDING
        else "approved but not opened in time"
    )
    return _final(request, RequestState.EXPIRED, ChangeKind.EXPIRED, "pam", now, note)


def _open(request: AccessRequest, action: Open, now: datetime) -> tuple[AccessRequest, StateChange]:
    if action.actor.id != request.requester_id:
        raise TransitionRefused(
            f"request {request.id[:8]} is {request.requester}'s: only they may open it"
        )
    if request.use_by is not None and now >= request.use_by:
        raise TransitionRefused(
            f"request {request.id[:8]} was approved but not opened in time",
            hint="request access again",
        )
    if request.extends and action.session_id != request.session_id:
        raise TransitionRefused(f"request {request.id[:8]} extends another grant")
    after = replace(
        request,
        state=RequestState.OPENED,
        session_id=action.session_id,
        version=request.version + 1,
    )
    change = StateChange(
        request.id,
        ChangeKind.OPENED,
        action.actor.name,
        now,
        after.state,
        {"session_id": action.session_id, "duration_seconds": request.duration_seconds},
    )
    return after, change


def _revoke(
    request: AccessRequest, action: Revoke, now: datetime
) -> tuple[AccessRequest, StateChange]:
    after, change = _final(
        request, RequestState.REVOKED, ChangeKind.REVOKED, action.actor.name, now, action.reason
    )
    return after, replace(change, detail={**change.detail, "session_id": request.session_id})


def _final(
    request: AccessRequest,
    state: RequestState,
    kind: ChangeKind,
    actor: str,
    now: datetime,
    note: str | None,
) -> tuple[AccessRequest, StateChange]:
    after = replace(
        request,
        state=state,
        decided_by=actor,
        decision_note=note,
        version=request.version + 1,
    )
    return after, StateChange(request.id, kind, actor, now, state, {"note": note})


def _hint(request: AccessRequest) -> str | None:
    if request.state is RequestState.APPROVED:
        return "it is approved: its requester opens it with `pam db access --request ID`"
    if request.state.is_final:
        return "request access again"
    return None

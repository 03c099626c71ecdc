"""The access request state machine: every allowed and every refused transition,
and the rules (self-approval, distinct approvers, eligibility, deadlines)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.access.requests import (
    ALLOWED,
    AccessRequest,
    Action,
    Actor,
    Approve,
    Cancel,
    ChangeKind,
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

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
ALICE = Actor("p-alice", "alice")
BOB = Actor("p-bob", "bob", may_approve=True)
CAROL = Actor("p-carol", "carol", may_approve=True)
MALLORY = Actor("p-mallory", "mallory")
ADMIN = Actor("p-root", "root", may_approve=True, is_admin=True)
#: alice may approve others' requests, but never her own
ALICE_APPROVER = replace(ALICE, may_approve=True)


def ask(**given: Any) -> tuple[AccessRequest, list[StateChange]]:
    """new_request for alice on prod/ro, with *given* in place of the defaults."""
    asked: dict[str, Any] = {
        "id": "r" * 32,
        "project": "default",
        "requester": ALICE,
        "resource": "prod",
        "account": "ro",
        "duration_seconds": 3600,
        "reason": "INC-1",
        "policy_name": "needs-approval",
        "approvals_required": 1,
        "approvers": ("@leads",),
        "now": T0,
    }
    return new_request(**(asked | given))


def pending(approvals: int = 1, **changes: object) -> AccessRequest:
    request, records = ask(approvals_required=approvals)
    assert [r.kind for r in records] == [ChangeKind.REQUESTED]
    return replace(request, **changes)  # type: ignore[arg-type]


def in_state(state: RequestState) -> AccessRequest:
    """A request that reached *state* through the machine itself."""
    request = pending()
    if state is RequestState.PENDING:
        return request
    if state is RequestState.DENIED:
        return apply(request, Deny(BOB, "no"), T0)[0]
    if state is RequestState.CANCELLED:
        return apply(request, Cancel(ALICE), T0)[0]
    if state is RequestState.EXPIRED:
        return apply(request, Expire(), T0 + timedelta(hours=1))[0]
    request = apply(request, Approve(BOB), T0)[0]
    if state is RequestState.APPROVED:
        return request
    request = apply(request, Open(ALICE, "s" * 32), T0 + timedelta(minutes=1))[0]
    if state is RequestState.OPENED:
        return request
    assert state is RequestState.REVOKED
    return apply(request, Revoke(ADMIN, "done"), T0 + timedelta(minutes=2))[0]


#: One action of each kind that the rules allow wherever the state does,
#: applied at a time when every deadline it needs has passed (expire) or not.
def action_of(kind: type[Action]) -> tuple[Action, datetime]:
    return {
        Approve: (Approve(CAROL, "ok"), T0 + timedelta(minutes=1)),
        Deny: (Deny(CAROL, "not now"), T0 + timedelta(minutes=1)),
        Cancel: (Cancel(ALICE), T0 + timedelta(minutes=1)),
        Expire: (Expire(), T0 + timedelta(hours=2)),
        Open: (Open(ALICE, "s" * 32), T0 + timedelta(minutes=5)),
        Revoke: (Revoke(ADMIN, "why"), T0 + timedelta(minutes=5)),
    }[kind]


RESULT = {
    (RequestState.PENDING, Approve): RequestState.APPROVED,
    (RequestState.PENDING, Deny): RequestState.DENIED,
    (RequestState.PENDING, Cancel): RequestState.CANCELLED,
    (RequestState.PENDING, Expire): RequestState.EXPIRED,
    (RequestState.APPROVED, Cancel): RequestState.CANCELLED,
    (RequestState.APPROVED, Expire): RequestState.EXPIRED,
    (RequestState.APPROVED, Open): RequestState.OPENED,
    (RequestState.OPENED, Revoke): RequestState.REVOKED,
}
KINDS: list[type[Action]] = [Approve, Deny, Cancel, Expire, Open, Revoke]


def test_the_table_is_what_the_tests_expect() -> None:
    allowed = {(state, kind) for state, kinds in ALLOWED.items() for kind in kinds}
    assert allowed == set(RESULT)


@pytest.mark.parametrize(("state", "kind"), list(RESULT), ids=lambda v: getattr(v, "__name__", v))
def test_every_allowed_transition(state: RequestState, kind: type[Action]) -> None:
    request = in_state(state)
    action, now = action_of(kind)
    after, change = apply(request, action, now)
    assert after.state is RESULT[(state, kind)]
    assert change.state is after.state
    assert change.request_id == request.id
    assert change.at == now
    assert after.version == request.version + 1
    # What was asked never changes.
    for name in ("resource", "account", "duration_seconds", "reason", "requester_id"):
        assert getattr(after, name) == getattr(request, name)


REFUSED = [(state, kind) for state in RequestState for kind in KINDS if (state, kind) not in RESULT]


@pytest.mark.parametrize(("state", "kind"), REFUSED, ids=lambda v: getattr(v, "__name__", v))
def test_every_refused_transition_names_the_state(state: RequestState, kind: type[Action]) -> None:
    request = in_state(state)
    action, now = action_of(kind)
    with pytest.raises(TransitionRefused, match=f"request rrrrrrrr: it is {state}$"):
        apply(request, action, now)


def test_final_states_allow_nothing() -> None:
    final = {s for s in RequestState if s.is_final}
    assert final == {
        RequestState.DENIED,
        RequestState.CANCELLED,
        RequestState.EXPIRED,
        RequestState.REVOKED,
    }


def test_a_requester_never_approves_their_own_request_even_as_an_approver() -> None:
    with pytest.raises(TransitionRefused, match="alice asked for request rrrrrrrr and cannot"):
        apply(pending(), Approve(ALICE_APPROVER), T0)
    with pytest.raises(TransitionRefused, match="cannot deny it"):
        apply(pending(), Deny(ALICE_APPROVER, "no"), T0)


def test_only_an_eligible_approver_decides() -> None:
    with pytest.raises(TransitionRefused, match="mallory is not an approver") as refused:
        apply(pending(), Approve(MALLORY), T0)
    assert refused.value.hint == "its approvers are: @leads"
    with pytest.raises(TransitionRefused, match="mallory is not an approver"):
        apply(pending(), Deny(MALLORY, "no"), T0)


def test_n_distinct_approvers_are_needed() -> None:
    request = pending(approvals=2)
    request, change = apply(request, Approve(BOB, "first"), T0)
    assert request.state is RequestState.PENDING
    assert change.kind is ChangeKind.APPROVED
    assert change.detail == {"approvals": 1, "approvals_required": 2, "comment": "first"}
    with pytest.raises(TransitionRefused, match="bob has already approved"):
        apply(request, Approve(BOB), T0)
    later = T0 + timedelta(minutes=3)
    request, change = apply(request, Approve(CAROL), later)
    assert request.state is RequestState.APPROVED
    assert [a.by for a in request.approvals] == ["bob", "carol"]
    assert request.approved_at == later
    assert request.use_by == later + timedelta(minutes=15)


def test_a_denial_needs_a_reason() -> None:
    with pytest.raises(TransitionRefused, match="a denial needs a reason"):
        apply(pending(), Deny(BOB, "  "), T0)
    denied, change = apply(pending(), Deny(BOB, "not in a change window"), T0)
    assert (denied.decided_by, denied.decision_note) == ("bob", "not in a change window")
    assert change.detail == {"note": "not in a change window"}


def test_only_the_requester_or_an_admin_cancels() -> None:
    with pytest.raises(TransitionRefused, match="only alice or an admin of project default"):
        apply(pending(), Cancel(BOB), T0)
    assert apply(pending(), Cancel(ADMIN), T0)[0].state is RequestState.CANCELLED


def test_a_pending_request_expires_only_when_due() -> None:
    with pytest.raises(TransitionRefused, match="not due to expire"):
        apply(pending(), Expire(), T0 + timedelta(minutes=59))
    expired, change = apply(pending(), Expire(), T0 + timedelta(hours=1))
    assert expired.decision_note == "not decided in time"
    assert change.actor == "pam"


def test_an_approved_request_not_opened_in_time_expires_and_cannot_open() -> None:
    approved = apply(pending(), Approve(BOB), T0)[0]
    use_by = T0 + timedelta(minutes=15)
    with pytest.raises(TransitionRefused, match="not due to expire"):
        apply(approved, Expire(), use_by - timedelta(seconds=1))
    with pytest.raises(TransitionRefused, match="approved but not opened in time"):
        apply(approved, Open(ALICE, "s"), use_by)
    expired = apply(approved, Expire(), use_by)[0]
    assert expired.decision_note == "approved but not opened in time"


def test_only_the_requester_opens_and_the_clock_is_not_fixed_by_the_request() -> None:
    approved = apply(pending(), Approve(BOB), T0)[0]
    with pytest.raises(TransitionRefused, match="only they may open it"):
        apply(approved, Open(BOB, "s"), T0)
    opened, change = apply(approved, Open(ALICE, "s" * 32), T0 + timedelta(minutes=10))
    assert opened.session_id == "s" * 32
    assert change.detail == {"session_id": "s" * 32, "duration_seconds": 3600}


def test_break_glass_is_approved_at_once_and_recorded_apart() -> None:
    request, changes = ask(
        reason="outage INC-9", policy_name="glass", approvals_required=2, break_glass=True
    )
    assert request.state is RequestState.APPROVED
    assert request.break_glass
    assert [c.kind for c in changes] == [ChangeKind.REQUESTED, ChangeKind.BREAK_GLASS]
    assert changes[1].detail == {"reason": "outage INC-9", "policy": "glass"}
    assert apply(request, Open(ALICE, "s"), T0)[0].state is RequestState.OPENED


def test_break_glass_without_a_reason_is_refused() -> None:
    with pytest.raises(TransitionRefused, match="break-glass access requires a reason"):
        ask(reason=" ", policy_name="glass", break_glass=True)


def test_a_refusal_of_an_approved_request_hints_how_to_open_it() -> None:
    approved = apply(pending(), Approve(BOB), T0)[0]
    with pytest.raises(TransitionRefused) as refused:
        apply(approved, Approve(CAROL), T0)
    assert refused.value.hint is not None and "pam db access --request" in refused.value.hint


def _extension(**kwargs: object) -> AccessRequest:
    request, changes = ask(duration_seconds=1800, extends_session="s" * 32, **kwargs)
    assert changes[0].detail["extends_session"] == "s" * 32
    return request


def test_an_extension_is_applied_to_the_grant_it_extends_only() -> None:
    approved = apply(_extension(), Approve(BOB), T0)[0]
    assert approved.extends and approved.session_id == "s" * 32
    with pytest.raises(TransitionRefused, match="extends another grant"):
        apply(approved, Open(ALICE, "t" * 32), T0)
    opened = apply(approved, Open(ALICE, "s" * 32), T0)[0]
    assert opened.state is RequestState.OPENED


def test_break_glass_does_not_extend() -> None:
    with pytest.raises(TransitionRefused, match="does not extend"):
        _extension(break_glass=True)

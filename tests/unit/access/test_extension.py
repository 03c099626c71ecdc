"""Who may extend a live grant (gateway.access.extension): the whole new length
against the caller's policies, the refusal's hint when only the length is the
problem, and the approval a policy asks for."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from gateway.access.authorization import ADMIN_ROLE_POLICY, Allowance, NotAllowed
from gateway.access.extension import authorize_extension, check_extension
from gateway.errors import InvalidRequest
from gateway.identity.policy import Policy
from gateway.identity.principals import Principal, PrincipalKind, Role

ALICE = Principal("p-alice", "alice", PrincipalKind.USER, {"default": Role.MEMBER})
ADMIN = Principal("p-root", "root", PrincipalKind.USER, {"*": Role.ADMIN})
START = datetime(2024, 6, 1, 10, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Session:
    resource_name: str = "prod"
    account_name: str = "ro"
    started_at: datetime = START
    expires_at: datetime = START + timedelta(minutes=30)
    reason: str | None = "INC-7"


def policy(name: str, max_seconds: int, *, approvals: int = 0, reason: bool = False) -> Policy:
    return Policy(
        name,
        "default",
        ("alice",),
        "prod",
        "ro",
        max_seconds,
        require_reason=reason,
        approvals_required=approvals,
    )


def extend(principal: Principal, policies: list[Policy], total_seconds: int) -> str:
    allowance = authorize_extension(
        principal,
        project="default",
        policies=policies,
        session=Session(),  # type: ignore[arg-type]
        total_seconds=total_seconds,
    )
    return allowance.name


def test_an_extension_within_the_policys_maximum_is_allowed_by_it() -> None:
    assert extend(ALICE, [policy("short", 3600, reason=True)], 3600) == "short"


def test_beyond_the_maximum_the_policys_message_stays_and_the_hint_says_why() -> None:
    with pytest.raises(NotAllowed) as refused:
        extend(ALICE, [policy("short", 3600)], 5400)
    assert refused.value.message == "the longest access policy 'short' allows is 1h"
    assert refused.value.hint == (
        "extended, the grant would last 1h30m from its start; extend by less"
    )


def test_a_grant_no_policy_allows_any_more_keeps_the_plain_refusal() -> None:
    with pytest.raises(NotAllowed) as refused:
        extend(ALICE, [], 5400)
    assert refused.value.message == (
        "no policy allows alice to access account 'ro' of resource 'prod'"
    )
    assert refused.value.hint == "ask an administrator for a policy (pam policy add)"


def test_a_policy_that_needs_approval_allows_only_through_a_request() -> None:
    # The policy decides (the gateway then makes an extension request) ...
    assert extend(ALICE, [policy("guarded", 7200, approvals=1)], 3600) == "guarded"
    # ... and an extension applied directly under it is refused.
    guarded = Allowance(policy("guarded", 7200, approvals=1))
    with pytest.raises(InvalidRequest) as refused:
        check_extension(guarded)
    assert refused.value.message == "extending this grant needs approval"
    check_extension(Allowance(policy("plain", 7200)))
    check_extension(Allowance(None))


def test_an_admin_needs_no_policy() -> None:
    assert extend(ADMIN, [], 12 * 3600) == ADMIN_ROLE_POLICY

"""Tests of gateway.identity.policy.decide: deny by default, globs, @groups,
the longest maximum named in a refusal, and the reason rule."""

from __future__ import annotations

import pytest

from gateway.identity.policy import Policy, decide
from gateway.identity.principals import Principal, PrincipalKind, Role

ALICE = Principal("p-alice", "alice", PrincipalKind.USER, {"default": Role.MEMBER})
BOB_DBA = Principal(
    "p-bob", "bob", PrincipalKind.USER, {"default": Role.MEMBER}, frozenset({"dba"})
)


def policy(
    name: str,
    *,
    subjects: tuple[str, ...] = ("alice",),
    resource: str = "prod",
    account: str = "ro",
    max_seconds: int = 3600,
    require_reason: bool = False,
    approvals: int = 0,
    break_glass: bool = False,
    mfa: bool = False,
) -> Policy:
    return Policy(
        name,
        "default",
        subjects,
        resource,
        account,
        max_seconds,
        require_reason,
        approvals_required=approvals,
        break_glass=break_glass,
        require_mfa=mfa,
    )


def ask(
    policies: list[Policy],
    principal: Principal = ALICE,
    *,
    resource: str = "prod",
    account: str = "ro",
    seconds: int = 600,
    reason: str | None = None,
    break_glass: bool = False,
) -> tuple[str | None, str | None]:
    decision = decide(
        policies,
        principal,
        resource=resource,
        account=account,
        duration_seconds=seconds,
        reason=reason,
        break_glass=break_glass,
    )
    return (decision.policy.name if decision.policy else None), decision.refusal


def test_no_policy_refuses_naming_only_what_was_asked() -> None:
    assert ask([]) == (
        None,
        "no policy allows alice to access account 'ro' of resource 'prod'",
    )


@pytest.mark.parametrize(
    ("resource_glob", "account_glob", "resource", "account", "allowed"),
    [
        ("prod", "ro", "prod", "ro", True),
        ("prod", "ro", "prod2", "ro", False),
        ("prod-*", "ro", "prod-eu", "ro", True),
        ("prod-*", "ro", "prod", "ro", False),
        ("prod-*", "ro", "Prod-eu", "ro", False),  # case-sensitive
        ("*", "*", "anything", "any", True),
        ("*", "r?", "x", "rw", True),
        ("*", "ro", "x", "rw", False),
        ("prod-[ab]", "*", "prod-a", "rw", True),
        ("prod-[ab]", "*", "prod-c", "rw", False),
    ],
)
def test_resource_and_account_globs(
    resource_glob: str, account_glob: str, resource: str, account: str, allowed: bool
) -> None:
    rule = policy("p", resource=resource_glob, account=account_glob)
    name, refusal = ask([rule], resource=resource, account=account)
    assert (name == "p") is allowed
    assert (refusal is None) is allowed


def test_subject_group_matches_members_of_the_group_only() -> None:
    rule = policy("dba", subjects=("@dba",))
    assert ask([rule], BOB_DBA) == ("dba", None)
    assert ask([rule], ALICE)[0] is None


def test_a_name_subject_is_not_a_group_and_a_group_is_not_a_name() -> None:
    named_like_group = Principal("p-dba", "dba", PrincipalKind.USER, {"default": Role.MEMBER})
    assert ask([policy("g", subjects=("@dba",))], named_like_group)[0] is None
    assert ask([policy("n", subjects=("dba",))], BOB_DBA)[0] is None


def test_beyond_every_maximum_names_the_longest() -> None:
    rules = [policy("short", max_seconds=1800), policy("long", max_seconds=2 * 3600 + 30 * 60)]
    name, refusal = ask(rules, seconds=3 * 3600)
    assert name is None
    assert refusal == "the longest access policy 'long' allows is 2h30m"


def test_within_a_longer_maximum_is_allowed_by_it() -> None:
    rules = [policy("short", max_seconds=1800), policy("long", max_seconds=7200)]
    assert ask(rules, seconds=3600) == ("long", None)
    assert ask(rules, seconds=7200) == ("long", None)


def test_required_reason_refuses_without_one_and_allows_with_one() -> None:
    rules = [policy("why", require_reason=True)]
    name, refusal = ask(rules)
    assert name is None
    assert refusal == "policy 'why' requires a reason for access"
    assert ask(rules, reason="   ")[0] is None
    assert ask(rules, reason="INC-42") == ("why", None)


def test_a_shorter_policy_without_the_reason_rule_still_allows() -> None:
    rules = [
        policy("long-with-reason", max_seconds=7200, require_reason=True),
        policy("short-no-reason", max_seconds=1800),
    ]
    assert ask(rules, seconds=900) == ("short-no-reason", None)
    # Beyond the short one, only the one that wants a reason is left.
    assert ask(rules, seconds=3600)[1] == "policy 'long-with-reason' requires a reason for access"
    assert ask(rules, seconds=3600, reason="ticket") == ("long-with-reason", None)


def test_a_policy_for_someone_else_does_not_count() -> None:
    assert ask([policy("bobs", subjects=("bob",))])[0] is None


def test_of_the_policies_that_allow_the_one_asking_least_decides() -> None:
    rules = [
        policy("a-two-approvals", approvals=2),
        policy("b-mfa", mfa=True),
        policy("c-one-approval", approvals=1),
    ]
    assert ask(rules) == ("b-mfa", None)
    assert ask(rules[::2]) == ("c-one-approval", None)
    assert ask([policy("z-plain"), policy("a-mfa", mfa=True)]) == ("z-plain", None)


def test_break_glass_counts_only_policies_that_allow_it() -> None:
    rules = [policy("approved", approvals=1), policy("glass", approvals=2, break_glass=True)]
    assert ask(rules, break_glass=True, reason="outage") == ("glass", None)
    assert ask(rules[:1], break_glass=True, reason="outage") == (
        None,
        "no policy that allows this access allows break-glass",
    )


def test_break_glass_needs_a_reason_whatever_the_policy_says() -> None:
    rules = [policy("glass", approvals=1, break_glass=True)]
    assert ask(rules, break_glass=True) == (None, "break-glass access requires a reason")
    assert ask(rules, break_glass=True, reason="  ")[0] is None


def test_break_glass_still_needs_a_covering_policy_and_duration() -> None:
    rules = [policy("glass", approvals=1, break_glass=True, max_seconds=600)]
    assert ask(rules, break_glass=True, reason="x", seconds=601)[1] == (
        "the longest access policy 'glass' allows is 10m"
    )
    assert ask(rules, break_glass=True, reason="x", resource="other")[0] is None

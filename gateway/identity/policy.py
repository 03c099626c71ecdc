"""Access policies: which principals may open which accounts, and for how long.

A policy belongs to a project and names subjects (principal names, or
``@group``), a resource glob and an account glob (``fnmatch``, case-sensitive),
a longest duration and whether a reason is required. It may also ask for
approval (``approvals_required`` distinct approvers among ``approvers``, or the
project's admins when none are named), allow break-glass (access now, without
waiting, with a reason, recorded apart), ask for a second factor once per
grant (``require_mfa``) and cut connections idle for ``idle_timeout_seconds``.

Invariants:
* Deny by default: a member's request is allowed only by a policy of the
  resource's project whose subjects, resource glob and account glob all match.
* A refusal never reveals what exists: "no policy allows" names only what the
  requester asked for, and is the same whether or not the resource exists.
* A request is allowed by any matching policy whose maximum covers the
  duration and whose reason rule is met; beyond every matching policy's
  maximum it is refused naming the largest.
* Policies are grants, and grants add up: of the policies that allow a
  request, the one asking least (fewest approvals, then no second factor, then
  by name) decides, as when a user holds two roles.
* Break-glass is asked for, never inferred: with ``break_glass`` only policies
  that allow it count, and a reason is required whatever the policy says.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from gateway.durations import format_duration
from gateway.identity.principals import Principal

__all__ = ["Decision", "Policy", "decide"]


@dataclass(frozen=True)
class Policy:
    name: str
    project: str
    subjects: tuple[str, ...]
    resource_glob: str
    account_glob: str
    max_duration_seconds: int
    require_reason: bool = False
    #: distinct approvers needed before the grant opens (0: none)
    approvals_required: int = 0
    #: who may approve (names or ``@group``); empty: the project's admins
    approvers: tuple[str, ...] = ()
    #: may a requester skip the approval, with a reason, recorded apart
    break_glass: bool = False
    #: a second factor (TOTP) once per grant
    require_mfa: bool = False
    #: cut a connection with no traffic either way for this long (None: never)
    idle_timeout_seconds: int | None = None

    def covers(self, principal: Principal, resource: str, account: str) -> bool:
        return (
            any(principal.matches_subject(subject) for subject in self.subjects)
            and fnmatchcase(resource, self.resource_glob)
            and fnmatchcase(account, self.account_glob)
        )


@dataclass(frozen=True)
class Decision:
    """A policy's answer: ``policy`` when allowed, else ``refusal`` says why."""

    policy: Policy | None
    refusal: str | None = None
    hint: str | None = None


def decide(
    policies: list[Policy],
    principal: Principal,
    *,
    resource: str,
    account: str,
    duration_seconds: int,
    reason: str | None,
    break_glass: bool = False,
) -> Decision:
    """Which of *policies* (the resource's project's) lets *principal* in;
    with *break_glass*, only one that allows skipping approval."""
    matching = [p for p in policies if p.covers(principal, resource, account)]
    if not matching:
        return Decision(
            None,
            f"no policy allows {principal.name} to access account '{account}'"
            f" of resource '{resource}'",
            "ask an administrator for a policy (pam policy add)",
        )
    long_enough = [p for p in matching if p.max_duration_seconds >= duration_seconds]
    if not long_enough:
        longest = max(matching, key=lambda p: p.max_duration_seconds)
        limit = format_duration(longest.max_duration_seconds)
        return Decision(
            None,
            f"the longest access policy '{longest.name}' allows is {limit}",
            f"ask for --duration {limit} or less",
        )
    has_reason = bool(reason and reason.strip())
    if break_glass:
        return _break_glass(long_enough, has_reason)
    for policy in sorted(long_enough, key=_asks):
        if has_reason or not policy.require_reason:
            return Decision(policy)
    return Decision(
        None,
        f"policy '{long_enough[0].name}' requires a reason for access",
        "give one with --reason TEXT",
    )


def _asks(policy: Policy) -> tuple[int, bool, str]:
    """What a policy asks of a requester, least first."""
    return (policy.approvals_required, policy.require_mfa, policy.name)


def _break_glass(allowing: list[Policy], has_reason: bool) -> Decision:
    glass = [p for p in sorted(allowing, key=_asks) if p.break_glass]
    if not glass:
        return Decision(
            None,
            "no policy that allows this access allows break-glass",
            "request access without --break-glass and wait for approval",
        )
    if not has_reason:
        return Decision(None, "break-glass access requires a reason", "give one with --reason TEXT")
    return Decision(glass[0])

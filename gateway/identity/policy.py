"""Access policies: which principals may open which accounts, and for how long.

A policy belongs to a project and names subjects (principal names, or
``@group``), a resource glob and an account glob (``fnmatch``, case-sensitive),
a longest duration and whether a reason is required.

Invariants:
* Deny by default: a member's request is allowed only by a policy of the
  resource's project whose subjects, resource glob and account glob all match.
* A refusal never reveals what exists: "no policy allows" names only what the
  requester asked for, and is the same whether or not the resource exists.
* A request is allowed by any matching policy whose maximum covers the
  duration and whose reason rule is met; beyond every matching policy's
  maximum it is refused naming the largest.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

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
) -> Decision:
    """Which of *policies* (the resource's project's) lets *principal* in."""
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
        limit = _duration(longest.max_duration_seconds)
        return Decision(
            None,
            f"the longest access policy '{longest.name}' allows is {limit}",
            f"ask for --duration {limit} or less",
        )
    has_reason = bool(reason and reason.strip())
    for policy in sorted(long_enough, key=lambda p: p.name):
        if has_reason or not policy.require_reason:
            return Decision(policy)
    return Decision(
        None,
        f"policy '{long_enough[0].name}' requires a reason for access",
        "give one with --reason TEXT",
    )


def _duration(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = (f"{hours}h" * bool(hours), f"{minutes}m" * bool(minutes), f"{secs}s" * bool(secs))
    return "".join(parts) or "0s"

"""Who may open which grant: roles first, then (for members) policies.

Invariants:
* Deny by default: no role in the resource's project, an auditor, or a member
  no policy covers, is refused.
* A refusal to a non-admin never reveals whether the resource or account
  exists: an unknown resource is refused with the same words as one no policy
  covers.
* An admin needs no policy; the session then records ``role:admin`` as what
  allowed it (a name no policy can have).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from gateway.errors import Forbidden
from gateway.identity.policy import Policy, decide
from gateway.identity.principals import Principal, Role

__all__ = ["ADMIN_ROLE_POLICY", "Allowance", "NotAllowed", "authorize_access", "not_allowed"]

#: What a session opened by an admin records as the policy that allowed it.
ADMIN_ROLE_POLICY: Final = "role:admin"


@dataclass(frozen=True)
class Allowance:
    """What allows a request: a policy, or (``policy`` None) the admin role."""

    policy: Policy | None

    @property
    def name(self) -> str:
        """What the session records as having allowed it."""
        return self.policy.name if self.policy else ADMIN_ROLE_POLICY


class NotAllowed(Forbidden):
    """No policy allows the request (or not as asked): refused as ``no_policy``."""


def not_allowed(principal: Principal, resource: str, account: str) -> Forbidden:
    return NotAllowed(
        f"no policy allows {principal.name} to access account '{account}' of resource '{resource}'",
        hint="ask an administrator for a policy (pam policy add)",
    )


def authorize_access(
    principal: Principal,
    *,
    project: str | None,
    policies: list[Policy],
    resource: str,
    account: str,
    duration_seconds: int,
    reason: str | None,
    break_glass: bool = False,
) -> Allowance:
    """What allows this request (a policy, or the admin role); raises
    :class:`Forbidden` naming why not. *project* is the resource's, None when
    the resource does not exist (the caller answers admins)."""
    role = None if project is None else principal.role_in(project)
    if role is Role.ADMIN:
        return Allowance(None)
    if role is Role.AUDITOR:
        raise Forbidden(
            f"{principal.name} is an auditor: auditors read sessions and the trail"
            " but cannot open access"
        )
    if role is not Role.MEMBER:
        raise not_allowed(principal, resource, account)
    decision = decide(
        policies,
        principal,
        resource=resource,
        account=account,
        duration_seconds=duration_seconds,
        reason=reason,
        break_glass=break_glass,
    )
    if decision.policy is None:
        raise NotAllowed(decision.refusal or "refused", hint=decision.hint)
    return Allowance(decision.policy)

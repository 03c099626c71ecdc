"""Who may extend a live grant, and by how much.

An extension is authorised like a new grant of the whole new duration (from the
grant's start to its new expiry), by the caller's role or policies
(:func:`~gateway.access.authorization.authorize_access`); a refusal only because
of that duration says so. Where the deciding policy asks for approval, the
gateway makes an extension request instead (approved like a grant request);
:func:`check_extension` refuses an extension applied directly under such a
policy.
"""

from __future__ import annotations

import math

from gateway.access.authorization import Allowance, NotAllowed, authorize_access
from gateway.access.ports import SessionRecord
from gateway.durations import format_duration
from gateway.errors import InvalidRequest
from gateway.identity.policy import Policy
from gateway.identity.principals import Principal

__all__ = ["authorize_extension", "check_extension"]


def authorize_extension(
    principal: Principal,
    *,
    project: str | None,
    policies: list[Policy],
    session: SessionRecord,
    total_seconds: int,
) -> Allowance:
    """What allows *principal* to make *session* last *total_seconds* from its
    start; raises :class:`~gateway.errors.Forbidden` or :class:`InvalidRequest`."""

    def allowance_for(seconds: int) -> Allowance:
        return authorize_access(
            principal,
            project=project,
            policies=policies,
            resource=session.resource_name,
            account=session.account_name,
            duration_seconds=seconds,
            reason=session.reason,
        )

    try:
        allowance = allowance_for(total_seconds)
    except NotAllowed as refused:
        granted = math.ceil((session.expires_at - session.started_at).total_seconds())
        try:
            allowance_for(granted)
        except NotAllowed:
            raise refused from None
        # The grant as it stands is allowed: the new duration is what is refused.
        raise NotAllowed(
            refused.message,
            hint=f"extended, the grant would last {format_duration(total_seconds)} from its"
            " start; extend by less",
        ) from None
    return allowance


def check_extension(allowance: Allowance) -> None:
    """Raise :class:`InvalidRequest` when what allows the extension cannot
    allow it without more (an approval): such an extension goes through an
    extension request instead."""
    policy = allowance.policy
    if policy is not None and policy.approvals_required > 0:
        raise InvalidRequest(
            "extending this grant needs approval",
            hint=f"policy '{policy.name}' requires approval; `pam grant extend` asks for it",
        )

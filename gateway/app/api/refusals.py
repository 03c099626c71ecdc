"""Refused API calls on record: who, from where and why, for every 401 and 403.

The error handler (:mod:`gateway.app.api.deps`) calls :func:`record_api_refusal`
for an :class:`~gateway.errors.Unauthenticated` or
:class:`~gateway.errors.Forbidden` answer; the refusal goes to the gateway's
:class:`~gateway.audit.refusals.RefusalRecorder`, which summarises floods.

Invariants: the token itself is never recorded or logged: a presented token is
looked up by its SHA-256 only to name whose it was and why it no longer counts
(``expired_token``, ``revoked_token``, ``disabled_user``); a token never issued
is ``bad_token`` with nobody named.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import Request

from gateway.access.authorization import NotAllowed
from gateway.app.gateway import Gateway
from gateway.errors import Forbidden, GatewayError, Unauthenticated
from gateway.identity.hashing import token_digest
from gateway.identity.mfa import MfaNotEnrolled, MfaRefused, SecondFactorError
from gateway.refusal import Refusal, RefusalPlace, RefusalReason

__all__ = ["record_api_refusal"]

#: the API's and the web console's sign-in forms
_LOGIN_PATHS = ("/v1/login", "/ui/login")
_BEARER = "bearer "
#: the web console's session cookie (gateway.app.web.security.SESSION_COOKIE)
_WEB_SESSION_COOKIE = "__Host-pam_session"
#: a token's standing (gateway.store.refusals) -> the refusal's reason
_STANDING = {
    "disabled": RefusalReason.DISABLED_USER,
    "revoked": RefusalReason.REVOKED_TOKEN,
    "expired": RefusalReason.EXPIRED_TOKEN,
    # A live token refused: the local token from another host.
    "live": RefusalReason.LOCAL_TOKEN_REMOTE,
}


async def record_api_refusal(request: Request, exc: GatewayError) -> None:
    """Put a 401/403 answer on record (other errors are not refusals)."""
    service: Gateway = request.app.state.service
    if isinstance(exc, (SecondFactorError, MfaNotEnrolled)):
        # A known caller, or a name signing in whose password was right.
        refused_code = isinstance(exc, MfaRefused)
        reason = RefusalReason.BAD_MFA_CODE if refused_code else RefusalReason.MFA_REQUIRED
        principal = getattr(request.state, "principal", None)
        who = principal.name if principal else getattr(request.state, "login_name", None)
    elif isinstance(exc, Unauthenticated):
        reason, who = await _unauthenticated(request, service)
    elif isinstance(exc, Forbidden):
        reason = RefusalReason.NO_POLICY if isinstance(exc, NotAllowed) else RefusalReason.FORBIDDEN
        principal = getattr(request.state, "principal", None)
        who = principal.name if principal is not None else None
    else:
        return
    service.refusals.refused(
        Refusal(
            RefusalPlace.API,
            reason,
            f"{request.method} {request.url.path}: {exc.message}",
            request.client.host if request.client else "unknown",
            who=who,
            event="api_refused",
        )
    )


async def _unauthenticated(request: Request, service: Gateway) -> tuple[RefusalReason, str | None]:
    if request.url.path in _LOGIN_PATHS:
        # Only a name that is a principal's is recorded: an unknown one may be a
        # password typed into the name field.
        name = getattr(request.state, "login_name", None)
        known = name is not None and await service.db(service.store.has_principal, name)
        return RefusalReason.BAD_PASSWORD, name if known else None
    header = request.headers.get("authorization", "")
    token = header[len(_BEARER) :].strip() if header.lower().startswith(_BEARER) else ""
    token = token or request.cookies.get(_WEB_SESSION_COOKIE, "")
    if not token:
        return RefusalReason.NO_TOKEN, None
    standing = await service.db(
        service.store.token_standing, token_digest(token), now=datetime.now(UTC)
    )
    if standing is None:
        return RefusalReason.BAD_TOKEN, None
    name, state = standing
    return _STANDING.get(state, RefusalReason.BAD_TOKEN), name

"""The console's browser-facing rules: its cookies, CSRF, and the headers every
page carries.

* **Signing in** gives the browser the same kind of session token `pam login`
  gives the CLI (:meth:`~gateway.identity.service.IdentityService.login`), in
  one cookie, ``__Host-pam_session``: ``Secure``, ``HttpOnly``,
  ``SameSite=Strict``, ``Path=/``, no ``Domain``, and living no longer than the
  token. Signing out revokes the token; disabling the user ends it as it ends
  the CLI's.
* **CSRF**: every state-changing request carries :func:`csrf_token`, an HMAC of
  the fixed label :data:`_CSRF_LABEL` keyed by the session token. A page from
  this gateway knows it (it is rendered into forms and into ``hx-headers``);
  another site cannot compute it without the cookie, which it cannot read. It
  needs no server-side state, so it holds across restarts and gateways. The
  browser's ``Origin`` and ``Sec-Fetch-Site``, when present, must name this
  gateway too. The login form, which has no session yet, is guarded by a
  random double-submit cookie (``__Host-pam_login``).
* **Headers** (:class:`SecurityHeaders`): a strict Content-Security-Policy
  (scripts, styles and connections from this gateway only, no inline script
  or style, no framing), ``nosniff``, no referrer sent to other sites, and ``no-store`` on every
  page (static files may be cached: they change only with the package).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE: Final = "__Host-pam_session"
LOGIN_COOKIE: Final = "__Host-pam_login"
#: The single sign-on attempt's poll handle while the browser is at the provider.
SSO_COOKIE: Final = "__Host-pam_sso"
CSRF_FIELD: Final = "csrf_token"
CSRF_HEADER: Final = "x-csrf-token"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

_CSRF_LABEL: Final = b"pam web console csrf v1"

CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    )
)
_HEADERS: Final = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: under no-referrer a browser sends
    # ``Origin: null`` with its form posts, and the origin check needs it.
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=()"),
)


def csrf_token(session_token: str) -> str:
    """The CSRF token of the browser session holding *session_token*."""
    digest = hmac.new(session_token.encode(), _CSRF_LABEL, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def csrf_matches(session_token: str, submitted: str | None) -> bool:
    return bool(submitted) and hmac.compare_digest(
        csrf_token(session_token).encode(), (submitted or "").encode()
    )


def new_login_nonce() -> str:
    return secrets.token_urlsafe(32)


def same_origin(request: Request) -> bool:
    """What the browser says of where a request came from, when it says it, names
    this gateway (a request without either header, from a non-browser, passes:
    the token check still applies)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return origin == f"{request.url.scheme}://{request.url.netloc}"


def set_cookie(
    response: Response, name: str, value: str, *, max_age: int | None, same_site: str = "strict"
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=None if max_age is None else max(0, max_age),
        path="/",
        secure=True,
        httponly=True,
        samesite=same_site,  # type: ignore[arg-type]  # starlette's Literal
    )


def clear_cookie(response: Response, name: str, *, same_site: str = "strict") -> None:
    response.delete_cookie(name, path="/", secure=True, httponly=True, samesite=same_site)  # type: ignore[arg-type]


class SecurityHeaders:
    """Adds the console's headers to every response of the app it wraps."""

    def __init__(self, app: ASGIApp, *, cacheable_prefixes: Iterable[str] = ()) -> None:
        self.app = app
        self.cacheable = tuple(cacheable_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        cacheable = any(path.startswith(prefix) for prefix in self.cacheable)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if cacheable or k.lower() != b"cache-control"
                ]
                headers.extend(_HEADERS)
                if not cacheable:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)

"""An HTTP client that is a signed-in console browser, for the route-level tests:
the session cookie, and the CSRF token the console's own pages would put in a form."""

from __future__ import annotations

import httpx
from conftest import Console

from gateway.app.web.security import CSRF_FIELD, SESSION_COOKIE, csrf_token


def browser_of(console: Console, user: str) -> httpx.Client:
    """*user*'s console session, over HTTP (no redirect followed)."""
    return console.http(cookies={SESSION_COOKIE: console.token_of(user)})


def form(console: Console, user: str, **fields: str) -> dict[str, str]:
    """*fields* and the CSRF token of *user*'s session."""
    return {CSRF_FIELD: csrf_token(console.token_of(user)), **fields}

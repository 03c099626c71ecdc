"""Helpers of the console's tests: an HTTP client that is a signed-in console
browser (the session cookie, and the CSRF token the console's own pages would
put in a form), and a user's authenticator app."""

from __future__ import annotations

import base64
import time

import httpx
from conftest import Console
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from gateway.app.web.security import CSRF_FIELD, SESSION_COOKIE, csrf_token


def browser_of(console: Console, user: str) -> httpx.Client:
    """*user*'s console session, over HTTP (no redirect followed)."""
    return console.http(cookies={SESSION_COOKIE: console.token_of(user)})


def form(console: Console, user: str, **fields: str) -> dict[str, str]:
    """*fields* and the CSRF token of *user*'s session."""
    return {CSRF_FIELD: csrf_token(console.token_of(user)), **fields}


class Authenticator:
    """An authenticator app: a fresh code for each use, never one reused."""

    def __init__(self, secret: str) -> None:
        key = base64.b32decode(secret + "=" * (-len(secret) % 8))
        self._totp = TOTP(key, 6, SHA1(), 30)  # noqa: S303 (RFC 6238's HMAC, as the apps)
        self._step = int(time.time() // 30)

    @classmethod
    def enrol(cls, api: httpx.Client) -> Authenticator:
        """The second factor of the user *api* is signed in as, enrolled and on."""
        enrolled = api.post("/v1/mfa/enroll")
        assert enrolled.status_code == 201, enrolled.text
        app = cls(enrolled.json()["secret"])
        assert api.post("/v1/mfa/confirm", json={"code": app.code()}).status_code == 200
        return app

    def code(self) -> str:
        code = self._totp.generate(self._step * 30).decode()
        self._step += 1  # the gateway accepts one step ahead; this one is then spent
        return code

    def wrong(self) -> str:
        now = time.time()
        near = {self._totp.generate(now + k * 30).decode() for k in range(-3, 4)}
        return next(c for c in ("000000", "111111", "222222", "333333") if c not in near)

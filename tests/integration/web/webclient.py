"""Helpers of the console's tests: a user's authenticator app, and grants opened
and used through the console's own terminal routes (a signed-in client of the
console is :meth:`conftest.Console.web_client`)."""

from __future__ import annotations

import base64
import re
import time
from typing import Any

import httpx
from conftest import Console
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP


def open_grant(client: httpx.Client, account: str = "scram", **extra: Any) -> str:
    """A browser grant's session id, opened through the console's form route."""
    answer = client.post(
        "/ui/terminal/open",
        data={"resource": "prod", "account": account, "duration_minutes": "30", **extra},
    )
    assert answer.status_code == 303, answer.text
    found = re.fullmatch(r"/ui/(?:terminal|explorer)/([0-9a-f]+)", answer.headers["location"])
    assert found, answer.headers["location"]
    return found.group(1)


def trail(console: Console, session_id: str) -> list[dict[str, Any]]:
    """The statements the audit trail holds for *session_id*, as the CLI shows them."""
    statements: list[dict[str, Any]] = console.gw.cli_json("sessions", "show", session_id, "--all")[
        "statements"
    ]
    return statements


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

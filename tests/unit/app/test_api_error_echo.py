"""The API's answer to a body it cannot take names the field and the rule, never
what was sent: a password, a client secret, a code or a poll handle that fails
validation (too long, wrong type, broken JSON) is not echoed back.

The error handler (:func:`gateway.app.api.deps.install_error_handlers`) is the one
place this is decided, so it is tested here with the API's own input models.
"""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from gateway.app.api.deps import install_error_handlers
from gateway.app.api.models import LoginIn, MfaCodeIn, SsoConfigIn, SsoPollIn

SECRET = "SEKRIT-b7Qx2mZ"


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/login")
    async def login(body: LoginIn) -> None: ...

    @app.post("/sso")
    async def sso(body: SsoConfigIn) -> None: ...

    @app.post("/code")
    async def code(body: MfaCodeIn) -> None: ...

    @app.post("/poll")
    async def poll(body: SsoPollIn) -> None: ...

    return app


CASES = [
    # too long: the otp and the code have a length limit
    ("/login", f'{{"user":"a","password":"{SECRET}","otp":"{SECRET * 2}"}}', "otp"),
    ("/code", f'{{"code":"{SECRET * 2}"}}', "code"),
    ("/poll", f'{{"handle":"{SECRET * 20}"}}', "handle"),
    # a password typed into the name field (too long for a name)
    ("/login", f'{{"user":"{SECRET * 5}","password":"x"}}', "user"),
    # the wrong type around a secret
    ("/sso", f'{{"issuer":"x","client_id":"y","client_secret":["{SECRET}"]}}', "client_secret"),
    ("/sso", f'{{"issuer":"x","client_id":"y","client_secret":{{"v":"{SECRET}"}}}}', "client"),
    # broken JSON right after the secret
    ("/login", f'{{"user":"a","password":"{SECRET}"', "JSON"),
    ("/login", SECRET, "JSON"),
    ("/login", f'["{SECRET}"]', "object"),
]


@pytest.mark.parametrize(("path", "body", "names"), CASES)
async def test_a_refused_body_is_not_echoed(path: str, body: str, names: str) -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        answer = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "InvalidRequest"
    assert names in error["message"]  # it still says what was wrong
    assert SECRET not in answer.text

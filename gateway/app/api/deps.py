"""What the routers share: the service they act on, the token check, the error format.

Every route needs ``Authorization: Bearer <token>``; the daemon keeps only the
token's SHA-256 and compares with ``hmac.compare_digest``. Errors are JSON
``{"error": {"type", "message", "hint"}}`` with a fitting status code.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.app.gateway import Gateway
from gateway.config import hash_token
from gateway.errors import AlreadyExists, ConfigError, GatewayError, InvalidRequest, NotFound

_STATUS: list[tuple[type[GatewayError], int]] = [
    (NotFound, 404),
    (AlreadyExists, 409),
    (InvalidRequest, 400),
    (ConfigError, 400),
]

_bearer = HTTPBearer(auto_error=False)


class UnauthorizedError(Exception):
    """The request had no token or the wrong one."""


def get_service(request: Request) -> Gateway:
    service: Gateway = request.app.state.service
    return service


Service = Annotated[Gateway, Depends(get_service)]


def authorize(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    presented = credentials.credentials if credentials else ""
    if not hmac.compare_digest(hash_token(presented), request.app.state.token_sha256):
        raise UnauthorizedError


def aware(moment: datetime | None) -> datetime | None:
    """Query times without a zone are UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def error(status: int, kind: str, message: str, hint: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"type": kind, "message": message, "hint": hint}}
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
        # Unknown paths and methods answer in the API's own error format too.
        assert isinstance(exc, StarletteHTTPException)
        kind = "NotFound" if exc.status_code == 404 else "HTTPError"
        return error(exc.status_code, kind, f"no such API endpoint or object ({exc.detail})")

    @app.exception_handler(UnauthorizedError)
    async def _unauthorized(_request: Request, _exc: Exception) -> JSONResponse:
        return error(401, "unauthorized", "missing or wrong API token")

    @app.exception_handler(GatewayError)
    async def _gateway_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
        return error(status, type(exc).__name__, exc.message, exc.hint)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, "InvalidRequest", f"{where}: {first.get('msg', 'invalid request')}")

"""What the routers share: the service they act on, the caller, the error format.

Every route but the health check needs ``Authorization: Bearer <token>``: the
caller is the principal the token belongs to (:data:`Caller`), looked up by the
token's SHA-256; nothing a request body says about who is asking counts.
Role checks are dependencies (:data:`GlobalAdmin`) or, where the project comes
from the object, helpers (:func:`require_admin_of`). Errors are JSON
``{"error": {"type", "message", "hint"}}`` (and ``code`` where a client acts on
it: ``mfa_required``) with a fitting status code (401 for
an unknown caller, 403 for a known one that may not); every 401 and 403 is
put on record (:mod:`gateway.app.api.refusals`).
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.app.api.refusals import record_api_refusal
from gateway.app.gateway import Gateway
from gateway.errors import (
    AlreadyExists,
    ConfigError,
    Forbidden,
    GatewayError,
    InvalidRequest,
    NotFound,
    Unauthenticated,
)
from gateway.identity.principals import Principal

_STATUS: list[tuple[type[GatewayError], int]] = [
    (Unauthenticated, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (AlreadyExists, 409),
    (InvalidRequest, 400),
    (ConfigError, 400),
]

_bearer = HTTPBearer(auto_error=False)


def get_service(request: Request) -> Gateway:
    service: Gateway = request.app.state.service
    return service


Service = Annotated[Gateway, Depends(get_service)]


def client_addr(request: Request) -> str:
    return request.client.host if request.client else ""


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    service: Gateway = request.app.state.service
    principal = await service.identity.authenticate(
        credentials.credentials if credentials else "",
        loopback=is_loopback(client_addr(request)),
    )
    request.state.principal = principal
    return principal


Caller = Annotated[Principal, Depends(current_principal)]


def require_global_admin(caller: Caller) -> Principal:
    """*caller*, when an admin of every project (what :data:`GlobalAdmin` checks)."""
    if not caller.is_admin():
        raise Forbidden(f"{caller.name} is not an administrator of every project")
    return caller


#: The caller, who must be an admin of every project (users, tokens).
GlobalAdmin = Annotated[Principal, Depends(require_global_admin)]


def require_admin_of(caller: Principal, project: str) -> None:
    if not caller.is_admin(project):
        raise Forbidden(f"{caller.name} is not an administrator of project '{project}'")


def aware(moment: datetime | None) -> datetime | None:
    """Query times without a zone are UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def error(
    status: int, kind: str, message: str, hint: str | None = None, code: str | None = None
) -> JSONResponse:
    body: dict[str, str | None] = {"type": kind, "message": message, "hint": hint}
    if code is not None:
        body["code"] = code  # what a client acts on (``mfa_required``: ask, retry)
    return JSONResponse(status_code=status, content={"error": body})


def status_of(exc: GatewayError) -> int:
    """The HTTP status an error is answered with."""
    return next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
        # Unknown paths and methods answer in the API's own error format too.
        assert isinstance(exc, StarletteHTTPException)
        kind = "NotFound" if exc.status_code == 404 else "HTTPError"
        return error(exc.status_code, kind, f"no such API endpoint or object ({exc.detail})")

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        status = status_of(exc)
        if status in (401, 403):
            # Every refused call is on record: who, from where, why.
            await record_api_refusal(request, exc)
        return error(status, type(exc).__name__, exc.message, exc.hint, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, "InvalidRequest", f"{where}: {first.get('msg', 'invalid request')}")

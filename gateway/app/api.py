"""The control API: HTTP/JSON over FastAPI, served by uvicorn inside the daemon.

Every route needs ``Authorization: Bearer <token>``; the daemon keeps only the
token's SHA-256 and compares with ``hmac.compare_digest``. Errors are JSON
``{"error": {"type", "message", "hint"}}`` with a fitting status code. Passwords
travel only inward (add, rotate) and are never part of a response.

Bound to loopback by default. A daemon on another host (a later issue) will put
TLS in front of this same API.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Annotated, Any

import structlog
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import __version__
from gateway.access.service import GatewayService, VerifyResult
from gateway.audit.chain import ChainProblem
from gateway.config import hash_token
from gateway.errors import (
    AlreadyExists,
    ConfigError,
    GatewayError,
    InvalidRequest,
    NotFound,
)
from gateway.store import AccessSession, Account, ConnectionRecord, Resource, SslMode
from gateway.store.models import AuditRecord

log = structlog.get_logger(__name__)


class ResourceIn(BaseModel):
    name: str
    host: str
    port: int = 5432
    database: str
    ssl_mode: SslMode = "verify-full"
    ca_cert: str | None = None


class AccountIn(BaseModel):
    name: str
    username: str
    password: SecretStr


class RotateIn(BaseModel):
    password: SecretStr


class AccessIn(BaseModel):
    resource: str
    account: str
    duration_seconds: int = Field(gt=0)
    port: int | None = None
    requester: str = Field(min_length=1, max_length=256)


class AccessEndIn(BaseModel):
    detail: str | None = Field(default=None, max_length=500)


class SessionDetail(BaseModel):
    session: AccessSession
    connections: list[ConnectionRecord]
    live_connections: int
    statements: int


class AuditVerifyOut(BaseModel):
    ok: bool
    session: str | None
    problems: list[ChainProblem]


def _aware(moment: datetime | None) -> datetime | None:
    """Query times without a zone are UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


class VerifyOut(BaseModel):
    ok: bool
    resource: str
    account: str
    address: str
    ssl_mode: str
    latency_ms: float | None = None
    server_version: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    auth_method: str | None = None
    error_kind: str | None = None
    error_sqlstate: str | None = None
    error: str | None = None
    hint: str | None = None

    @classmethod
    def of(cls, result: VerifyResult) -> VerifyOut:
        return cls.model_validate(result, from_attributes=True)


class Health(BaseModel):
    status: str
    version: str
    server_time: datetime


_STATUS: list[tuple[type[GatewayError], int]] = [
    (NotFound, 404),
    (AlreadyExists, 409),
    (InvalidRequest, 400),
    (ConfigError, 400),
]


_bearer = HTTPBearer(auto_error=False)


def _error(status: int, kind: str, message: str, hint: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"type": kind, "message": message, "hint": hint}}
    )


def create_app(service: GatewayService, token_sha256: str) -> FastAPI:
    app = FastAPI(
        title="pam gateway control API",
        version=__version__,
        docs_url=None,
        redirect_slashes=False,
    )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
        # Unknown paths and methods answer in the API's own error format too.
        assert isinstance(exc, StarletteHTTPException)
        kind = "NotFound" if exc.status_code == 404 else "HTTPError"
        return _error(exc.status_code, kind, f"no such API endpoint or object ({exc.detail})")

    def authorize(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        presented = credentials.credentials if credentials else ""
        if not hmac.compare_digest(hash_token(presented), token_sha256):
            raise _UnauthorizedError

    @app.exception_handler(_UnauthorizedError)
    async def _unauthorized(_request: Request, _exc: Exception) -> JSONResponse:
        return _error(401, "unauthorized", "missing or wrong API token")

    @app.exception_handler(GatewayError)
    async def _gateway_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
        return _error(status, type(exc).__name__, exc.message, exc.hint)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, "InvalidRequest", f"{where}: {first.get('msg', 'invalid request')}")

    auth = [Depends(authorize)]

    @app.get("/v1/health", dependencies=auth)
    async def health() -> Health:
        return Health(status="ok", version=__version__, server_time=datetime.now(UTC))

    # resources
    @app.post("/v1/resources", dependencies=auth, status_code=201)
    async def add_resource(body: ResourceIn) -> Resource:
        return await service.db(
            service.store.add_resource,
            body.name,
            body.host,
            body.port,
            body.database,
            ssl_mode=body.ssl_mode,
            ca_cert=body.ca_cert,
        )

    @app.get("/v1/resources", dependencies=auth)
    async def list_resources() -> list[Resource]:
        return await service.db(service.store.list_resources)

    @app.get("/v1/resources/{name}", dependencies=auth)
    async def get_resource(name: str) -> Resource:
        return await service.db(service.store.get_resource, name)

    @app.delete("/v1/resources/{name}", dependencies=auth, status_code=204)
    async def remove_resource(name: str) -> None:
        await service.db(service.store.remove_resource, name)
        await service.refresh_secrets()

    @app.post("/v1/resources/{name}/verify", dependencies=auth)
    async def verify(name: str, account: str | None = None) -> list[VerifyOut]:
        return [VerifyOut.of(r) for r in await service.verify(name, account)]

    # accounts
    @app.post("/v1/resources/{resource}/accounts", dependencies=auth, status_code=201)
    async def add_account(resource: str, body: AccountIn) -> Account:
        account = await service.db(
            service.store.add_account,
            resource,
            body.name,
            body.username,
            body.password.get_secret_value(),
        )
        await service.refresh_secrets()
        return account

    @app.get("/v1/accounts", dependencies=auth)
    async def list_accounts(resource: str | None = None) -> list[Account]:
        return await service.db(service.store.list_accounts, resource)

    @app.post("/v1/resources/{resource}/accounts/{name}/rotate", dependencies=auth)
    async def rotate(resource: str, name: str, body: RotateIn) -> Account:
        account = await service.db(
            service.store.rotate_password, resource, name, body.password.get_secret_value()
        )
        await service.refresh_secrets()
        return account

    @app.delete("/v1/resources/{resource}/accounts/{name}", dependencies=auth, status_code=204)
    async def remove_account(resource: str, name: str) -> None:
        await service.db(service.store.remove_account, resource, name)
        await service.refresh_secrets()

    # access sessions
    @app.post("/v1/access", dependencies=auth, status_code=201)
    async def open_access(body: AccessIn) -> AccessSession:
        return await service.open_access(
            requester=body.requester,
            resource=body.resource,
            account=body.account,
            duration_seconds=body.duration_seconds,
            port=body.port,
        )

    @app.post("/v1/access/{session_id}/heartbeat", dependencies=auth)
    async def heartbeat(session_id: str) -> AccessSession:
        return await service.heartbeat(session_id)

    @app.post("/v1/access/{session_id}/end", dependencies=auth)
    async def end_access(session_id: str, body: AccessEndIn | None = None) -> AccessSession:
        return await service.close_access(session_id, detail=body.detail if body else None)

    @app.get("/v1/sessions", dependencies=auth)
    async def list_sessions(
        active: bool | None = None,
        limit: int = Query(default=100, ge=1, le=10_000),
        resource: str | None = None,
        account: str | None = None,
        requester: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[AccessSession]:
        return await service.db(
            service.store.list_sessions,
            active=active,
            limit=limit,
            resource=resource,
            account=account,
            requester=requester,
            since=_aware(since),
            until=_aware(until),
        )

    @app.get("/v1/sessions/{session_id}/audit", dependencies=auth)
    async def session_audit(
        session_id: str,
        after_seq: int = Query(default=0, ge=0),
        limit: int = Query(default=1000, ge=1, le=10_000),
        kind: Annotated[list[str] | None, Query()] = None,
    ) -> list[AuditRecord]:
        if service.audit_writer is not None:
            # Show what relays have already seen, not only what the last batch wrote.
            await service.audit_writer.drain(timeout=5)
        return await service.db(
            service.store.list_audit, session_id, after_seq=after_seq, limit=limit, kinds=kind
        )

    @app.get("/v1/audit/search", dependencies=auth)
    async def search_audit(
        q: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        resource: str | None = None,
        account: str | None = None,
        requester: str | None = None,
        session: str | None = None,
        status: str | None = None,
        limit: int = Query(default=100, ge=1, le=10_000),
    ) -> list[AuditRecord]:
        if service.audit_writer is not None:
            await service.audit_writer.drain(timeout=5)
        return await service.db(
            service.store.search_audit,
            q,
            since=_aware(since),
            until=_aware(until),
            resource=resource,
            account=account,
            requester=requester,
            session_id=session,
            status=status,
            limit=limit,
        )

    @app.post("/v1/audit/verify", dependencies=auth)
    async def verify_audit(session: str | None = None) -> AuditVerifyOut:
        if service.audit_writer is not None:
            await service.audit_writer.drain(timeout=5)
        problems = await service.db(service.store.verify_audit, session)
        return AuditVerifyOut(ok=not problems, session=session, problems=problems)

    @app.get("/v1/sessions/{session_id}", dependencies=auth)
    async def show_session(session_id: str) -> SessionDetail:
        session = await service.db(service.store.get_session, session_id)
        connections = await service.db(service.store.list_connections, session.id)
        if service.audit_writer is not None:
            await service.audit_writer.drain(timeout=5)
        statements = await service.db(service.store.count_audit, session.id, "statement")
        return SessionDetail(
            session=session,
            connections=connections,
            live_connections=service.live_connection_count(session.id),
            statements=statements,
        )

    return app


class _UnauthorizedError(Exception):
    pass

"""Signing in and out, who am I, users and machine tokens.

``POST /v1/login`` is the one route that answers without a token: it takes a
user's name and password (and a second-factor code, ``otp``, from a user who
enrolled one: without it the right password is answered 401 with the error
``code`` ``mfa_required``) and returns a session token (shown once). Users and
machine tokens are managed by admins of every project.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.app.api.deps import Caller, GlobalAdmin, Service, client_addr
from gateway.app.api.models import (
    LoginIn,
    MachineTokenIn,
    PasswordIn,
    PrincipalOut,
    TokenOut,
    UserIn,
    WhoamiOut,
)
from gateway.identity.service import IssuedToken

login_router = APIRouter(prefix="/v1")
router = APIRouter(prefix="/v1")
_bearer = HTTPBearer(auto_error=False)


def _token(issued: IssuedToken) -> TokenOut:
    return TokenOut(
        token=issued.token,
        token_id=issued.token_id,
        user=issued.principal,
        expires_at=issued.expires_at,
    )


@login_router.post("/login", status_code=201)
async def login(body: LoginIn, service: Service, request: Request) -> TokenOut:
    request.state.login_name = body.user  # who tried, for the refusal record
    issued = await service.identity.login(
        body.user,
        body.password.get_secret_value(),
        source=client_addr(request),
        otp=body.otp.get_secret_value() if body.otp else None,
    )
    return _token(issued)


@router.post("/logout", status_code=204)
async def logout(
    _caller: Caller,
    service: Service,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if credentials is not None:
        await service.identity.logout(credentials.credentials)


@router.get("/whoami")
async def whoami(caller: Caller, service: Service) -> WhoamiOut:
    return WhoamiOut(
        id=caller.id,
        name=caller.name,
        kind=caller.kind.value,
        roles={project: role.value for project, role in caller.roles.items()},
        groups=sorted(caller.groups),
        token_id=caller.token_id,
        mfa_enabled=await service.mfa.is_enabled(caller.id),
    )


@router.post("/users", status_code=201)
async def add_user(body: UserIn, _admin: GlobalAdmin, service: Service) -> PrincipalOut:
    user = await service.identity.add_user(
        body.name,
        role=body.role,
        project=body.project,
        groups=tuple(body.groups),
        password=body.password.get_secret_value() if body.password else None,
    )
    return PrincipalOut.of(user)


@router.get("/users")
async def list_users(_admin: GlobalAdmin, service: Service) -> list[PrincipalOut]:
    return [PrincipalOut.of(p) for p in await service.identity.list_principals()]


@router.post("/users/{name}/password", status_code=204)
async def set_password(name: str, body: PasswordIn, _admin: GlobalAdmin, service: Service) -> None:
    await service.identity.set_password(name, body.password.get_secret_value())


@router.post("/users/{name}/disable")
async def disable_user(name: str, _admin: GlobalAdmin, service: Service) -> PrincipalOut:
    return PrincipalOut.of(await service.identity.disable(name))


@router.delete("/users/{name}", status_code=204)
async def remove_user(name: str, _admin: GlobalAdmin, service: Service) -> None:
    await service.identity.remove(name)


@router.post("/tokens", status_code=201)
async def create_token(body: MachineTokenIn, _admin: GlobalAdmin, service: Service) -> TokenOut:
    issued = await service.identity.create_machine_token(
        body.name, role=body.role, project=body.project, ttl=timedelta(seconds=body.ttl_seconds)
    )
    return _token(issued)

"""Access grants: open, keep alive (heartbeat) and end, for `pam db access`.

The grant is the caller's: who asked is the authenticated principal, never a
field of the request. Only its owner (or an admin of its project) may keep a
grant alive or end it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.app.api.deps import Caller, Service, client_addr
from gateway.app.api.models import AccessEndIn, AccessIn, SessionOut
from gateway.errors import NotFound
from gateway.identity.principals import Principal

router = APIRouter(prefix="/v1/access")


@router.post("", status_code=201)
async def open_access(
    body: AccessIn, caller: Caller, service: Service, request: Request
) -> SessionOut:
    session = await service.open_access(
        caller,
        resource=body.resource,
        account=body.account,
        duration_seconds=body.duration_seconds,
        port=body.port,
        reason=body.reason,
        api_client_addr=client_addr(request),
        reported_host=body.client_host,
    )
    return SessionOut.of(session)


async def _own(session_id: str, caller: Principal, service: Service) -> str:
    """The session's id, when *caller* may hold or end it."""
    session = await service.db(service.store.get_session, session_id)
    if session.principal_id != caller.id and not caller.is_admin(session.project or ""):
        raise NotFound(f"session '{session_id}' not found")
    return session.id


@router.post("/{session_id}/heartbeat")
async def heartbeat(session_id: str, caller: Caller, service: Service) -> SessionOut:
    return SessionOut.of(await service.heartbeat(await _own(session_id, caller, service)))


@router.post("/{session_id}/end")
async def end_access(
    session_id: str, caller: Caller, service: Service, body: AccessEndIn | None = None
) -> SessionOut:
    session = await service.close_access(
        await _own(session_id, caller, service), detail=body.detail if body else None
    )
    return SessionOut.of(session)

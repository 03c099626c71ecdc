"""Access grants: open, keep alive (heartbeat) and end, for `pam db access`.

The grant is the caller's: who asked is the authenticated principal, never a
field of the request. Where the policy asks for a second factor, the request
carries a current code (``otp``); without one the answer is 401 with the error
``code`` ``mfa_required``, and the CLI asks once and retries. Only its owner
(or an admin of its project) may keep a grant alive, extend it or end it.

A grant's port is open only to the OS user of the process that asked for it,
when that process runs on this host: its uid comes from the kernel's socket
table for this request's own connection (:mod:`gateway.net.peercred`), never
from anything in the request.
"""

from __future__ import annotations

import asyncio
import ipaddress

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.access.requests import AccessRequest
from gateway.app.api.deps import Caller, Service, client_addr
from gateway.app.api.models import (
    AccessEndIn,
    AccessIn,
    AccessOut,
    AccessPendingOut,
    CertificateOut,
    ExtendIn,
    RevokeIn,
    SessionOut,
)
from gateway.app.api.routers.requests import request_out
from gateway.errors import InvalidRequest, NotFound
from gateway.identity.principals import DEFAULT_PROJECT, Principal
from gateway.net import peercred

router = APIRouter(prefix="/v1/access")


@router.post("", status_code=201, response_model=AccessOut)
async def open_access(
    body: AccessIn, caller: Caller, service: Service, request: Request
) -> AccessOut | JSONResponse:
    """A grant (201), or, when a policy asks for approval, the request to wait
    on (202, :class:`AccessPendingOut`)."""
    session = await service.open_access(
        caller,
        resource=body.resource,
        account=body.account,
        duration_seconds=body.duration_seconds,
        port=body.port,
        reason=body.reason,
        api_client_addr=client_addr(request),
        reported_host=body.client_host,
        owner_uid=await api_client_uid(request),
        socket_dir=body.socket_dir,
        csr=body.csr,
        request_id=body.request_id,
        break_glass=body.break_glass,
        otp=body.otp.get_secret_value() if body.otp else None,
    )
    if isinstance(session, AccessRequest):
        pending = AccessPendingOut(request=request_out(session, caller))
        return JSONResponse(pending.model_dump(mode="json"), status_code=202)
    out = AccessOut.of(session).model_copy(
        update={"expiry_notice_seconds": service.grants.expiry_notice_seconds}
    )
    offer = await service.tunnel_offer(session.id)
    if offer is not None:
        cert, ca, port = offer
        out = out.model_copy(
            update={"certificate": cert.decode(), "ca_cert_pem": ca.decode(), "tunnel_port": port}
        )
    return out


async def _own(session_id: str, caller: Principal, service: Service) -> str:
    """The session's id, when *caller* may hold or end it."""
    session = await service.db(service.store.get_session, session_id)
    if session.principal_id != caller.id and not caller.is_admin(
        session.project or DEFAULT_PROJECT
    ):
        raise NotFound(f"session '{session_id}' not found")
    return session.id


async def api_client_uid(request: Request) -> int | None:
    """The OS user of the process that sent ``request`` when it runs on this host;
    None for a client elsewhere (or where the kernel does not say: no /proc)."""
    client, server = request.scope.get("client"), request.scope.get("server")
    if not client or not server or not peercred.is_available():
        return None
    try:
        is_loopback = ipaddress.ip_address(client[0].partition("%")[0]).is_loopback
        peer, ours = (client[0], int(client[1])), (server[0], int(server[1]))
    except (ValueError, TypeError):  # not an IP connection (a test client, a Unix socket)
        return None
    uid = await asyncio.to_thread(peercred.tcp_peer_owner, peer, ours)
    if uid is None and is_loopback:
        # A local caller whose socket the kernel does not show: do not open a
        # port to every local user in its place.
        raise InvalidRequest(
            "pam could not find which OS user runs this `pam db access`, so it cannot open"
            " a port only that user may use",
            hint="try again; the gateway's log has the details",
        )
    return uid


@router.post("/{session_id}/heartbeat")
async def heartbeat(session_id: str, caller: Caller, service: Service) -> SessionOut:
    return SessionOut.of(await service.heartbeat(await _own(session_id, caller, service)))


@router.post("/{session_id}/revoke")
async def revoke_access(
    session_id: str, body: RevokeIn, caller: Caller, service: Service
) -> SessionOut:
    """End a live grant now (its owner, or an admin of its project)."""
    session = await service.revoke(
        await _own(session_id, caller, service), by=caller, reason=body.reason
    )
    return SessionOut.of(session)


@router.post("/{session_id}/extend", response_model=SessionOut)
async def extend_access(
    session_id: str, body: ExtendIn, caller: Caller, service: Service
) -> SessionOut | JSONResponse:
    """Move a live grant's expiry later (its owner, or an admin of its project);
    the caller's role or policies must allow the whole new duration. Where a
    policy asks for approval: 202 with the extension request to wait on."""
    session = await service.extend_access(
        caller, await _own(session_id, caller, service), by_seconds=body.by_seconds
    )
    if isinstance(session, AccessRequest):
        pending = AccessPendingOut(request=request_out(session, caller))
        return JSONResponse(pending.model_dump(mode="json"), status_code=202)
    return SessionOut.of(session)


@router.get("/{session_id}/certificate")
async def access_certificate(session_id: str, caller: Caller, service: Service) -> CertificateOut:
    """A tunnel grant's client certificate as it stands (an extension re-issues
    it), and this gateway's tunnel port: a CLI that failed over here asks this
    (the grant is taken over from the gateway that held it)."""
    offer = await service.tunnel_offer(await _own(session_id, caller, service))
    if offer is None:
        raise NotFound(f"session '{session_id}' has no live tunnel certificate")
    cert, _ca, port = offer
    return CertificateOut(certificate=cert.decode(), tunnel_port=port)


@router.post("/{session_id}/end")
async def end_access(
    session_id: str, caller: Caller, service: Service, body: AccessEndIn | None = None
) -> SessionOut:
    session = await service.close_access(
        await _own(session_id, caller, service), detail=body.detail if body else None
    )
    return SessionOut.of(session)

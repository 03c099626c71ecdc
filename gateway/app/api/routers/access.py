"""Access grants: open, keep alive (heartbeat) and end, for `pam db access`."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.app.api.deps import Service
from gateway.app.api.models import AccessEndIn, AccessIn, AccessOut, SessionOut

router = APIRouter(prefix="/v1/access")


@router.post("", status_code=201)
async def open_access(body: AccessIn, service: Service) -> AccessOut:
    session = await service.open_access(
        requester=body.requester,
        resource=body.resource,
        account=body.account,
        duration_seconds=body.duration_seconds,
        port=body.port,
        csr=body.csr,
    )
    out = AccessOut.of(session)
    offer = service.tunnel_offer(session.id)
    if offer is not None:
        cert, ca, port = offer
        out = out.model_copy(
            update={"certificate": cert.decode(), "ca_cert_pem": ca.decode(), "tunnel_port": port}
        )
    return out


@router.post("/{session_id}/heartbeat")
async def heartbeat(session_id: str, service: Service) -> SessionOut:
    return SessionOut.of(await service.heartbeat(session_id))


@router.post("/{session_id}/end")
async def end_access(
    session_id: str, service: Service, body: AccessEndIn | None = None
) -> SessionOut:
    session = await service.close_access(session_id, detail=body.detail if body else None)
    return SessionOut.of(session)

"""Liveness of the daemon, for the CLI and for operators."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request

from gateway import __version__
from gateway.app.api.models import Health

router = APIRouter(prefix="/v1")


@router.get("/health")
async def health(request: Request) -> Health:
    """Open to anyone (no token): a load balancer's or a CLI's liveness check."""
    return Health(
        status="ok",
        version=__version__,
        server_time=datetime.now(UTC),
        gateway_id=request.app.state.service.settings.gateway_id,
    )

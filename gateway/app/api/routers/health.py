"""Liveness of the daemon, for the CLI and for operators."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter

from gateway import __version__
from gateway.app.api.models import Health

router = APIRouter(prefix="/v1")


@router.get("/health")
async def health() -> Health:
    return Health(status="ok", version=__version__, server_time=datetime.now(UTC))

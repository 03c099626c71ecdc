"""Liveness, readiness and metrics of the daemon, for the CLI, probes and Prometheus.

* ``/v1/health``: the CLI's liveness check (version, server time, gateway id).
* ``/v1/gateways``: the fleet's control API URLs, for a signed-in CLI to fail
  over to (not open: it names internal addresses).
* ``/healthz``: 200 while the process serves HTTP at all (a liveness probe).
* ``/readyz``: 200 when the store answers, the presence lease is fresh and the
  audit trail is writable, else 503 naming each failed check
  (:mod:`gateway.app.readiness`).
* ``/metrics``: the Prometheus text format (:mod:`gateway.app.metrics`).

The first three are open (no token) and say nothing secret. ``/metrics`` is
open to loopback callers; any other caller needs the bearer token of an admin
or auditor of every project (Prometheus's ``authorization.credentials_file``),
since the counts describe the whole gateway's use.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway import __version__
from gateway.app.api.deps import Caller, Service, client_addr, current_principal, is_loopback
from gateway.app.api.models import Health
from gateway.app.metrics import CONTENT_TYPE
from gateway.app.readiness import report
from gateway.errors import Forbidden
from gateway.identity.principals import ALL_PROJECTS, Role

router = APIRouter(prefix="/v1")
#: the probes' and Prometheus's routes, at the root as they expect them
probes = APIRouter()

_bearer = HTTPBearer(auto_error=False)
_METRICS_ROLES = frozenset({Role.ADMIN, Role.AUDITOR})


@router.get("/health")
async def health(request: Request) -> Health:
    """Open to anyone (no token): a load balancer's or a CLI's liveness check."""
    return Health(
        status="ok",
        version=__version__,
        server_time=datetime.now(UTC),
        gateway_id=request.app.state.service.settings.gateway_id,
    )


@router.get("/gateways")
async def gateways(_caller: Caller, service: Service) -> list[str]:
    """The control API URLs of the gateways of this fleet present now (sharing
    the store): where a signed-in CLI may fail over to (``pam login`` keeps them)."""
    return await service.db(service.store.fleet_urls)


@probes.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving: always 200 (a liveness probe)."""
    return {"status": "ok"}


@probes.get("/readyz")
async def readyz(service: Service) -> JSONResponse:
    """200 when ready to serve, else 503 naming each failed check."""
    body = report(await service.readiness.checks())
    return JSONResponse(body, status_code=503 if body["failed"] else 200)


# An async route: it runs on the event loop, which owns the state the gauges read.
@probes.get("/metrics")
async def metrics(
    request: Request,
    service: Service,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Response:
    """The Prometheus text format: open on loopback, else an admin's or auditor's token."""
    if not is_loopback(client_addr(request)):
        caller = await current_principal(request, credentials)
        if caller.role_in(ALL_PROJECTS) not in _METRICS_ROLES:
            raise Forbidden(
                f"{caller.name} may not read the metrics",
                hint="an admin or auditor of every project may; so may anyone on the gateway host",
            )
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)

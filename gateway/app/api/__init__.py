"""The control API: HTTP/JSON over FastAPI, served by uvicorn inside the daemon.

One router per area (``routers/``), API models of its own (``models.py``), and the
caller check and error format every route shares (``deps.py``). Every route but
``/v1/health``, ``/healthz``, ``/readyz``, ``/metrics`` (open on loopback),
``/v1/login`` and single sign-on's (``/v1/sso``: start, poll,
callback, device) needs ``Authorization: Bearer <token>``; the
OpenAPI document and docs pages are not served. Errors are JSON
``{"error": {"type", "message", "hint"}}`` with a fitting status code. Passwords
travel only inward (add, rotate) and are never part of a response.

Bound to loopback by default. A daemon on another host (a later issue) will put
TLS in front of this same API.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI

from gateway import __version__
from gateway.app.api.deps import current_principal, install_error_handlers
from gateway.app.api.routers import (
    access,
    health,
    identity,
    mfa,
    policies,
    projects,
    refusals,
    requests,
    resources,
    review,
    sso,
    webhooks,
)
from gateway.app.gateway import Gateway

__all__ = ["create_app"]


def create_app(service: Gateway) -> FastAPI:
    app = FastAPI(
        title="pam gateway control API",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    app.state.service = service
    install_error_handlers(app)
    # Open: liveness, and signing in (which is how a caller gets a token).
    app.include_router(health.router)
    app.include_router(health.probes)
    app.include_router(identity.login_router)
    app.include_router(sso.public_router)
    for module in (
        resources,
        access,
        requests,
        review,
        identity,
        policies,
        refusals,
        sso,
        webhooks,
        mfa,
        projects,
    ):
        app.include_router(module.router, dependencies=[Depends(current_principal)])
    return app

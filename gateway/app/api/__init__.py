"""The control API: HTTP/JSON over FastAPI, served by uvicorn inside the daemon.

One router per area (``routers/``), API models of its own (``models.py``), and the
token check and error format every route shares (``deps.py``). Every route needs
``Authorization: Bearer <token>``. Errors are JSON
``{"error": {"type", "message", "hint"}}`` with a fitting status code. Passwords
travel only inward (add, rotate) and are never part of a response.

Bound to loopback by default. A daemon on another host (a later issue) will put
TLS in front of this same API.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI

from gateway import __version__
from gateway.app.api.deps import authorize, install_error_handlers
from gateway.app.api.routers import access, health, resources, review
from gateway.app.gateway import Gateway

__all__ = ["create_app"]


def create_app(service: Gateway, token_sha256: str) -> FastAPI:
    app = FastAPI(
        title="pam gateway control API",
        version=__version__,
        docs_url=None,
        redirect_slashes=False,
        dependencies=[Depends(authorize)],
    )
    app.state.service = service
    app.state.token_sha256 = token_sha256
    install_error_handlers(app)
    for module in (health, resources, access, review):
        app.include_router(module.router)
    return app

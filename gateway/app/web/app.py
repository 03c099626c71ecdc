"""The console's ASGI app: its routers, static files, error pages and headers."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import RedirectResponse, Response

from gateway import __version__
from gateway.app.api.deps import status_of
from gateway.app.api.refusals import record_api_refusal
from gateway.app.gateway import Gateway
from gateway.app.web.deps import STATIC_DIR, LoginRequired, is_htmx, render, ui
from gateway.app.web.grants import BrowserGrants
from gateway.app.web.routes import ROUTERS
from gateway.app.web.security import SecurityHeaders
from gateway.errors import GatewayError

__all__ = ["create_web_app"]


def create_web_app(service: Gateway) -> FastAPI:
    web = FastAPI(
        title="pam web console",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    web.state.service = service
    # When the daemon starts stopping: open event streams (live timelines) end,
    # and the grants the console holds are closed, so that neither holds the
    # HTTP server's graceful stop open.
    closing = asyncio.Event()
    web.state.closing = closing
    web.state.grants = BrowserGrants(service)

    async def close_streams() -> None:
        closing.set()

    service.stop_hooks.extend((close_streams, web.state.grants.shutdown))
    web.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for router in ROUTERS:
        web.include_router(router)
    _install_error_pages(web)
    web.add_middleware(SecurityHeaders, cacheable_prefixes=(ui("/static/"),))
    return web


def _error_page(
    request: Request, status: int, kind: str, message: str, hint: str | None = None
) -> Response:
    """The error page (for htmx, the fragment it swaps in) with *status*."""
    return render(
        request,
        "error_fragment.html" if is_htmx(request) else "error.html",
        status_code=status,
        kind=kind,
        message=message,
        hint=hint,
        status=status,
    )


def _install_error_pages(web: FastAPI) -> None:
    @web.exception_handler(LoginRequired)
    async def _login(request: Request, _exc: Exception) -> Response:
        target = ui("/login")
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method == "GET" and here != target:
            target += "?next=" + quote(here, safe="")
        if is_htmx(request):
            return Response(status_code=401, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)

    @web.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        status = status_of(exc)
        if status in (401, 403):
            await record_api_refusal(request, exc)
        return _error_page(request, status, type(exc).__name__, exc.message, exc.hint)

    @web.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return _error_page(request, 404, "NotFound", "no such page")
        return _error_page(request, exc.status_code, "HTTPError", str(exc.detail))

    @web.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return _error_page(
            request, 400, "InvalidRequest", f"{where}: {first.get('msg', 'invalid input')}"
        )

"""What the console's routes share: the service, the signed-in caller, the page
renderer and the errors pages show.

A route takes :data:`WebCaller` to need a signed-in user: without a valid
session cookie a page request is sent to the login form (an htmx request gets
``HX-Redirect``), and a state-changing request (any method but GET/HEAD) must
carry the session's CSRF token (form field ``csrf_token`` or header
``X-CSRF-Token``) and come from this gateway's own pages
(:mod:`gateway.app.web.security`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.responses import HTMLResponse

from gateway.app.api.deps import Service, client_addr, get_service, is_loopback
from gateway.app.web.security import (
    CSRF_FIELD,
    CSRF_HEADER,
    SAFE_METHODS,
    SESSION_COOKIE,
    csrf_matches,
    csrf_token,
    same_origin,
)
from gateway.audit.review import type_name
from gateway.durations import format_duration
from gateway.errors import Forbidden, Unauthenticated
from gateway.identity.principals import ALL_PROJECTS, Principal, Role

__all__ = [
    "PREFIX",
    "STATIC_DIR",
    "CsrfRefused",
    "LoginRequired",
    "Service",
    "WebCaller",
    "client_addr",
    "get_service",
    "is_htmx",
    "reads_admin_pages",
    "render",
    "templates",
    "ui",
]

#: Where the console is mounted on the control API's address.
PREFIX: Final = "/ui"
STATIC_DIR: Final = Path(__file__).parent / "static"


class LoginRequired(Exception):
    """No valid session cookie: the browser is sent to the login form."""


class CsrfRefused(Forbidden):
    def __init__(self) -> None:
        super().__init__(
            "this form was not sent by a page of this gateway's console (its CSRF token is"
            " missing or wrong, or it came from another site)",
            hint="reload the page and try again",
        )


def ui(path: str = "/") -> str:
    """The absolute path of a console page."""
    return PREFIX + (path if path.startswith("/") else "/" + path)


def is_htmx(request: Request) -> bool:
    """Whether htmx sent *request* (it then wants a fragment, not a page)."""
    return request.headers.get("hx-request") == "true"


def reads_admin_pages(principal: Principal | None) -> bool:
    """Whether *principal* has admin pages to read (an admin or auditor of some project)."""
    return principal is not None and any(
        role in (Role.ADMIN, Role.AUDITOR) for role in principal.roles.values()
    )


def _role_name(principal: Principal | None, project: str = ALL_PROJECTS) -> str:
    role = principal.role_in(project) if principal else None
    return role.value if isinstance(role, Role) else ""


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("gateway.app.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["ui"] = ui
    env.filters["duration"] = lambda seconds: format_duration(int(seconds or 0))
    env.filters["type_name"] = type_name
    env.filters["when"] = lambda moment: moment.strftime("%Y-%m-%d %H:%M:%S") if moment else ""
    return env


templates: Final = Jinja2Templates(env=_environment())


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """*template* rendered with the caller (``me``), its CSRF token (``csrf``)
    and *context*."""
    principal: Principal | None = getattr(request.state, "principal", None)
    token: str | None = getattr(request.state, "web_token", None)
    return templates.TemplateResponse(
        request,
        template,
        {
            "me": principal,
            "is_global_admin": bool(principal and principal.is_admin()),
            "global_role": _role_name(principal),
            "reads_admin_pages": reads_admin_pages(principal),
            "csrf": csrf_token(token) if token else "",
            "csrf_field": CSRF_FIELD,
            "section": "",  # the nav item to mark current
            **context,
        },
        status_code=status_code,
    )


async def _submitted_csrf(request: Request) -> str | None:
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


async def web_caller(request: Request, service: Service) -> Principal:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise LoginRequired
    try:
        principal = await service.identity.authenticate(
            token, loopback=is_loopback(client_addr(request))
        )
    except Unauthenticated:
        raise LoginRequired from None
    request.state.principal = principal
    request.state.web_token = token
    if request.method not in SAFE_METHODS and (
        not same_origin(request) or not csrf_matches(token, await _submitted_csrf(request))
    ):
        raise CsrfRefused
    return principal


#: The signed-in user of a console request (state changes: CSRF checked).
WebCaller = Annotated[Principal, Depends(web_caller)]

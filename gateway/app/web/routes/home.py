"""The console's front page: who is signed in, in which role, and where to go."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse

from gateway.app.web.deps import WebCaller, render

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def home(request: Request, caller: WebCaller) -> HTMLResponse:
    roles = sorted((project, role.value) for project, role in caller.roles.items())
    return render(request, "home.html", roles=roles)

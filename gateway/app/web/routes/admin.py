"""The console's admin pages: resources (with a verify button and their
accounts' rotation state, a rotate-now button), users (a disable button) and
policies (a remove button).

Who may do what is the JSON API's: each read and change here is its route
function (:mod:`gateway.app.api.routers`), called with the signed-in caller,
so an auditor reads what the API shows an auditor and is refused (403) what
the API refuses. On top of that the pages are for admins and auditors: a
caller who is neither anywhere (a member) gets 403 on every one of them.

Invariants: no page shows a password or secret (the API's output models carry
none); every change is a form POST (CSRF-checked by :data:`WebCaller`) answered
with a redirect, or, from htmx, with the fragment it replaces.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from gateway.app.api.deps import require_global_admin
from gateway.app.api.routers import identity as identity_api
from gateway.app.api.routers import policies as policies_api
from gateway.app.api.routers import resources as resources_api
from gateway.app.web.deps import Service, WebCaller, is_htmx, reads_admin_pages, render, ui
from gateway.credentials.verify import VerifyResult
from gateway.errors import Forbidden
from gateway.identity.principals import Principal

router = APIRouter(prefix="/admin")


def _admin_area(caller: Principal) -> Principal:
    """*caller*, when an admin or auditor of some project; else 403."""
    if not reads_admin_pages(caller):
        raise Forbidden(
            f"{caller.name} is neither an admin nor an auditor of any project",
            hint="the admin pages are for admins and auditors",
        )
    return caller


# --- resources and their accounts -------------------------------------------------------


@router.get("/resources", response_class=HTMLResponse)
async def resources_page(request: Request, caller: WebCaller, service: Service) -> HTMLResponse:
    _admin_area(caller)
    found = [
        r
        for r in await resources_api.list_resources(caller, service)
        if caller.reads_all_sessions(r.project)
    ]
    return render(
        request, "admin/resources.html", section="admin", sub="resources", resources=found
    )


@router.post("/resources/{name}/verify", response_class=HTMLResponse)
async def verify_resource(
    request: Request, name: str, caller: WebCaller, service: Service
) -> HTMLResponse:
    """What ``pam resource verify`` does: sign in with each account, and how long it took."""
    _admin_area(caller)
    results = await resources_api.verify(name, caller, service)
    if is_htmx(request):
        return render(request, "admin/_verify.html", results=results)
    return await _resource_page(request, name, caller, service, results=results)


@router.get("/resources/{name}", response_class=HTMLResponse)
async def resource_page(
    request: Request, name: str, caller: WebCaller, service: Service
) -> HTMLResponse:
    _admin_area(caller)
    return await _resource_page(request, name, caller, service)


async def _resource_page(
    request: Request,
    name: str,
    caller: Principal,
    service: Service,
    *,
    results: list[VerifyResult] | None = None,
) -> HTMLResponse:
    resource = await resources_api.get_resource(name, caller, service)
    accounts = await resources_api.list_accounts(caller, service, resource=name)
    return render(
        request,
        "admin/resource.html",
        section="admin",
        sub="resources",
        resource=resource,
        accounts=accounts,
        is_admin=caller.is_admin(resource.project),
        results=results,
        rotated=request.query_params.get("rotated", ""),
    )


@router.post("/resources/{resource}/accounts/{account}/rotate")
async def rotate_account(
    resource: str, account: str, caller: WebCaller, service: Service
) -> Response:
    """What ``pam account rotate`` does: a new generated password nobody sees;
    how it went is on the account's row (and its rotation record)."""
    _admin_area(caller)
    await resources_api.rotate_now(resource, account, caller, service)
    return RedirectResponse(
        ui(f"/admin/resources/{resource}?rotated={account}#account-{account}"), status_code=303
    )


# --- users ---------------------------------------------------------------------------------


@router.get("/users", response_class=HTMLResponse)
async def users_page(request: Request, caller: WebCaller, service: Service) -> HTMLResponse:
    _admin_area(caller)
    users = await identity_api.list_users(require_global_admin(caller), service)
    return render(request, "admin/users.html", section="admin", sub="users", users=users)


@router.post("/users/{name}/disable")
async def disable_user(name: str, caller: WebCaller, service: Service) -> Response:
    _admin_area(caller)
    await identity_api.disable_user(name, require_global_admin(caller), service)
    return RedirectResponse(ui("/admin/users"), status_code=303)


# --- policies ------------------------------------------------------------------------------


@router.get("/policies", response_class=HTMLResponse)
async def policies_page(request: Request, caller: WebCaller, service: Service) -> HTMLResponse:
    _admin_area(caller)
    found = await policies_api.list_policies(caller, service)
    admin_of = {p.project for p in found if caller.is_admin(p.project)}
    return render(
        request,
        "admin/policies.html",
        section="admin",
        sub="policies",
        policies=found,
        admin_of=admin_of,
    )


@router.post("/policies/{name}/remove")
async def remove_policy(name: str, caller: WebCaller, service: Service) -> Response:
    _admin_area(caller)
    await policies_api.remove_policy(name, caller, service)
    return RedirectResponse(ui("/admin/policies"), status_code=303)

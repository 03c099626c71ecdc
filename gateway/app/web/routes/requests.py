"""Access requests in the console: what waits for the caller's decision, the
caller's own, their history, one request with its trail, and the approve,
deny and cancel forms.

Every read and decision is the JSON API's own route function
(:mod:`gateway.app.api.routers.requests`) or the service call it makes, so who
sees a request (its requester, its approvers, the admins and auditors of its
project; to anyone else it is "not found"), who may decide it and when a
second-factor code is needed are decided in one place.

Invariants: a refused decision shows the request again with one line saying
why (a request the caller may not see stays a 404); a decision is answered
with a redirect to the request's page (reloading it sends nothing again).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated, Final, Literal

from fastapi import APIRouter, Form, Query, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from gateway.access.requests import RequestState
from gateway.app.api.deps import status_of
from gateway.app.api.refusals import record_api_refusal
from gateway.app.api.routers import requests as api
from gateway.app.web.deps import Service, WebCaller, render, ui
from gateway.errors import GatewayError, NotFound
from gateway.identity.principals import Principal

router = APIRouter(prefix="/requests")

#: requests one history page shows
PAGE_SIZE: Final = 25
#: what the history tab lists: every state but those still waiting to be decided
HISTORY_STATES: Final = tuple(
    s for s in RequestState if s not in (RequestState.PENDING, RequestState.APPROVED)
)
#: the most requests the history reads to find a page (the store's order: newest first)
_HISTORY_READ_LIMIT: Final = 1000


@router.get("", response_class=HTMLResponse)
async def requests_page(
    request: Request,
    caller: WebCaller,
    service: Service,
    tab: Literal["pending", "history"] = "pending",
    page: Annotated[int, Query(ge=0, le=_HISTORY_READ_LIMIT // PAGE_SIZE - 1)] = 0,
) -> HTMLResponse:
    if tab == "history":
        return await _history(request, caller, service, page)
    to_decide = await api.list_requests(caller, service, pending=True, limit=1000)
    mine = [
        r
        for r in await api.list_requests(caller, service, mine=True, limit=1000)
        if r.state in (RequestState.PENDING, RequestState.APPROVED)
    ]
    return render(
        request,
        "requests/list.html",
        section="requests",
        tab=tab,
        to_decide=to_decide,
        mine=mine,
    )


async def _history(
    request: Request, caller: Principal, service: Service, page: int
) -> HTMLResponse:
    found = await service.requests.listing(
        caller,
        mine=False,
        pending=False,
        states=HISTORY_STATES,
        limit=min(_HISTORY_READ_LIMIT, (page + 1) * PAGE_SIZE + 1),
    )
    shown = found[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
    return render(
        request,
        "requests/list.html",
        section="requests",
        tab="history",
        history=[api.request_out(r, caller) for r in shown],
        page=page,
        has_next=len(found) > (page + 1) * PAGE_SIZE,
    )


@router.get("/{request_id}", response_class=HTMLResponse)
async def request_page(
    request: Request, request_id: str, caller: WebCaller, service: Service
) -> HTMLResponse:
    return await _request_page(request, request_id, caller, service)


async def _request_page(
    request: Request,
    request_id: str,
    caller: Principal,
    service: Service,
    *,
    problem: GatewayError | None = None,
) -> HTMLResponse:
    shown = await api.show_request(request_id, caller, service)
    trail = await api.request_trail(request_id, caller, service)
    return render(
        request,
        "requests/detail.html",
        status_code=status_of(problem) if problem else 200,
        section="requests",
        req=shown,
        trail=trail,
        needs_code=shown.can_decide and await service.mfa.approval_needs_mfa(shown.project),
        may_cancel=shown.requester == caller.name
        and shown.state in (RequestState.PENDING, RequestState.APPROVED),
        problem=problem,
        done=request.query_params.get("done", ""),
    )


async def _decided(
    request: Request,
    request_id: str,
    caller: Principal,
    service: Service,
    done: str,
    action: Awaitable[object],
) -> Response:
    """Run *action*; on success back to the request's page, else that page
    with why (what the API would answer, and on record as its refusals are)."""
    try:
        await action
    except NotFound:
        raise
    except GatewayError as exc:
        if status_of(exc) in (401, 403):
            await record_api_refusal(request, exc)
        return await _request_page(request, request_id, caller, service, problem=exc)
    return RedirectResponse(ui(f"/requests/{request_id}?done={done}"), status_code=303)


@router.post("/{request_id}/approve")
async def approve(
    request: Request,
    request_id: str,
    caller: WebCaller,
    service: Service,
    comment: Annotated[str, Form(max_length=2000)] = "",
    code: Annotated[str, Form(max_length=16)] = "",
) -> Response:
    decision = service.approve(caller, request_id, comment.strip() or None, code.strip() or None)
    return await _decided(request, request_id, caller, service, "approved", decision)


@router.post("/{request_id}/deny")
async def deny(
    request: Request,
    request_id: str,
    caller: WebCaller,
    service: Service,
    reason: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    decision = service.requests.deny(caller, request_id, reason)
    return await _decided(request, request_id, caller, service, "denied", decision)


@router.post("/{request_id}/cancel")
async def cancel(
    request: Request, request_id: str, caller: WebCaller, service: Service
) -> Response:
    decision = service.requests.cancel(caller, request_id)
    return await _decided(request, request_id, caller, service, "cancelled", decision)

"""The SQL terminal (``/ui/terminal``), and opening, waiting for and closing the
browser's grants that it and the data explorer use (docs/web.md).

Who may use it: any signed-in user, for the access their role or a policy
allows them; a grant is opened exactly as ``pam db access`` opens one
(:mod:`gateway.app.web.grants`), so approval, second factor, expiry and the
audit trail apply. A browser grant is its opener's alone: another user's id is
"not found".

Invariants: a statement runs read-only unless the form says otherwise
(:mod:`gateway.app.web.statements`); what the page shows of a result or an
error is text, escaped by the templates; the Cancel button cancels the run of
the same grant that is in flight, from another request.
"""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import APIRouter, Form, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from gateway.access.requests import AccessRequest, RequestState
from gateway.app.web.deps import Service, WebCaller, client_addr, render, ui
from gateway.app.web.grants import BrowserGrant, Grants, Problem, WorkFailed
from gateway.app.web.statements import MAX_TIMEOUT_SECONDS, ROW_CAP, Outcome, Run, run_statement
from gateway.errors import InvalidRequest

router = APIRouter(prefix="/terminal")

#: The pages a browser grant can be opened for.
_PAGES: Final = ("terminal", "explorer")
#: How often a page waiting for approval asks again.
POLL_SECONDS: Final = 2


def page_of(then: str, grant: BrowserGrant) -> str:
    return ui(f"/{then if then in _PAGES else 'terminal'}/{grant.id}")


def grant_list(
    request: Request, caller: WebCaller, grants: Grants, *, section: str
) -> HTMLResponse:
    """The caller's browser grants and the form that opens one (both pages' index)."""
    return render(
        request,
        "terminal/index.html",
        section=section,
        grants=grants.of(caller),
        then=section,
    )


@router.get("", response_class=HTMLResponse)
async def terminal_index(request: Request, caller: WebCaller, grants: Grants) -> HTMLResponse:
    return grant_list(request, caller, grants, section="terminal")


@router.post("/open")
async def open_grant(
    request: Request,
    caller: WebCaller,
    grants: Grants,
    resource: Annotated[str, Form(min_length=1, max_length=200)],
    account: Annotated[str, Form(min_length=1, max_length=200)],
    duration_minutes: Annotated[int, Form(ge=1, le=7 * 24 * 60)],
    reason: Annotated[str, Form(max_length=2000)] = "",
    code: Annotated[str, Form(max_length=20)] = "",
    then: Annotated[str, Form(max_length=20)] = "terminal",
) -> Response:
    """Open a grant for the caller; its page, or the request to wait on."""
    opened = await grants.open(
        caller,
        client_addr=client_addr(request),
        resource=resource.strip(),
        account=account.strip(),
        duration_seconds=duration_minutes * 60,
        reason=reason.strip() or None,
        otp=code.strip() or None,
    )
    if isinstance(opened, AccessRequest):
        return _pending(request, opened, then)
    return RedirectResponse(page_of(then, opened), status_code=303)


def _pending(request: Request, pending: AccessRequest, then: str) -> HTMLResponse:
    then = then if then in _PAGES else "terminal"
    return render(
        request,
        "terminal/pending.html",
        section=then,
        pending=pending,
        then=then,
        poll_seconds=POLL_SECONDS,
    )


@router.post("/requests/{request_id}/open")
async def open_approved(
    request: Request,
    request_id: str,
    caller: WebCaller,
    service: Service,
    grants: Grants,
    then: Annotated[str, Form(max_length=20)] = "terminal",
) -> Response:
    """The waiting page's poll: still pending (the same page again), approved
    (the grant is opened and the browser sent to it), or decided otherwise."""
    asked = await service.requests.visible(caller, request_id)
    if asked.requester_id != caller.id:
        raise InvalidRequest(f"request {asked.id[:8]} is not yours to open")
    if asked.state is RequestState.PENDING:
        return _pending(request, asked, then)
    if asked.state is not RequestState.APPROVED:
        raise InvalidRequest(
            f"request {asked.id[:8]} is {asked.state.value}"
            + (f": {asked.decision_note}" if asked.decision_note else ""),
            hint="request access again",
        )
    opened = await grants.open(caller, client_addr=client_addr(request), request_id=asked.id)
    assert isinstance(opened, BrowserGrant)  # an approved request opens a grant
    target = page_of(then, opened)
    return Response(status_code=200, headers={"HX-Redirect": target})


@router.get("/{session_id}", response_class=HTMLResponse)
async def terminal_page(
    request: Request, session_id: str, caller: WebCaller, grants: Grants
) -> HTMLResponse:
    grant = grants.get(caller, session_id)
    grant.touch()
    return render(
        request,
        "terminal/page.html",
        section="terminal",
        grant=grant,
        row_cap=ROW_CAP,
        max_timeout=MAX_TIMEOUT_SECONDS,
    )


@router.get("/{session_id}/status", response_class=HTMLResponse)
async def grant_status(
    request: Request, session_id: str, caller: WebCaller, grants: Grants
) -> HTMLResponse:
    """The grant's state, polled by its pages (not counted as activity)."""
    return render(request, "terminal/status.html", grant=grants.get(caller, session_id))


@router.post("/{session_id}/run", response_class=HTMLResponse)
async def run(
    request: Request,
    session_id: str,
    caller: WebCaller,
    grants: Grants,
    sql: Annotated[str, Form(min_length=1, max_length=100_000)],
    timeout_seconds: Annotated[int, Form(ge=1, le=MAX_TIMEOUT_SECONDS)] = 30,
    offset: Annotated[int, Form(ge=0)] = 0,
    read_only: Annotated[str, Form(max_length=10)] = "",
    from_form: Annotated[str, Form(max_length=10)] = "",
) -> HTMLResponse:
    """Run one statement; its result (or error) as a fragment.

    ``read_only`` is a ticked checkbox; a request that does not come from the
    page's form (no ``from_form``) is read-only whatever it says."""
    grant = grants.get(caller, session_id)
    asked = Run(
        sql=sql,
        read_only=bool(read_only) or not from_form,
        timeout_seconds=timeout_seconds,
        offset=offset if (bool(read_only) or not from_form) else 0,
    )
    outcome: Outcome | None = None
    problem: Problem | None = None
    try:
        outcome = await grants.run(grant, lambda connection: run_statement(connection, asked))
    except WorkFailed as failed:
        problem = failed.problem
    return render(
        request,
        "terminal/result.html",
        grant=grant,
        run=asked,
        outcome=outcome,
        problem=problem,
        row_cap=ROW_CAP,
    )


@router.post("/{session_id}/cancel", response_class=HTMLResponse)
async def cancel(
    request: Request, session_id: str, caller: WebCaller, grants: Grants
) -> HTMLResponse:
    sent = grants.cancel(grants.get(caller, session_id))
    return render(request, "terminal/cancelled.html", sent=sent)


@router.post("/{session_id}/close")
async def close(session_id: str, caller: WebCaller, grants: Grants) -> Response:
    """End the grant (and the console's connections through it)."""
    await grants.close(
        grants.get(caller, session_id), detail=f"closed by {caller.name} in the web console"
    )
    return RedirectResponse(ui("/terminal"), status_code=303)

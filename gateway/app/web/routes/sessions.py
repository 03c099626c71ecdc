"""The console's Sessions pages: the session list, search and export, one
session's facts, connections and statement timeline (live over server-sent
events), its chain check, and terminating it (docs/web.md, "Sessions").

Role: pages over the same reads as the JSON API's review routes. Who may read
which session, the drain before a read and the streamed export are
:mod:`gateway.app.api.review_access`'s; paging, the session cursor and the
classification of tool queries are :mod:`gateway.audit.review`'s; filters are
the store's (:meth:`~gateway.store.Store.list_sessions`), never applied here.

Invariants:

* A session the caller may not read is "not found" on every route, the stream
  and the export included, as in the API.
* Terminating takes an admin of the session's project: auditors and members
  get 403 and nothing ends (the form is not even shown to them).
* Every filter is a GET parameter, so a filtered list is a bookmark.
* Text from the trail (SQL, parameters, errors) reaches a page only through
  the templates' escaping, the live stream's fragments included.
* The live stream ends when the session ends (after a last event naming how),
  when the client goes away, and when the console closes
  (a stop hook of the daemon, :mod:`gateway.app.web.app`), so the daemon never
  waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, Form, Query, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from gateway.app.api.review_access import (
    audit_trail,
    drain,
    export_response,
    may_terminate,
    session_list,
    visibility,
    visible_session,
    whole_trail_reader,
)
from gateway.app.web.deps import Service, WebCaller, is_htmx, render, templates, ui
from gateway.audit import review
from gateway.audit.review import STATEMENT, ExportEncoder, SessionCursor, is_catalogue_query
from gateway.errors import Forbidden, InvalidRequest
from gateway.identity.principals import ALL_PROJECTS
from gateway.store import AccessSession, AuditRecord, ChainProblem
from gateway.store.models import SESSION_END_REASONS

router = APIRouter(prefix="/sessions")

#: Sessions per page of the list (``size`` may ask for up to MAX_LIST_PAGE).
LIST_PAGE: Final = 50
MAX_LIST_PAGE: Final = 500
#: Statements per page of a timeline.
TIMELINE_PAGE: Final = 100
#: Search hits shown.
SEARCH_LIMIT: Final = 200
#: How often the live stream looks for new statements.
POLL_SECONDS: Final = 0.5
#: How long the live stream waits for the audit writer each time (it also
#: bounds how late it notices the console closing).
_STREAM_DRAIN_SECONDS: Final = 0.5
#: Statements read per poll of the live stream.
_STREAM_BATCH: Final = 200
_STATUSES: Final = {"live": True, "ended": False}
_ERRORS: Final = {"yes": True, "no": False}


def _text(value: str | None) -> str | None:
    """A form field: empty means "not given"."""
    value = (value or "").strip()
    return value or None


def _when(name: str, value: str | None) -> datetime | None:
    """A time from a filter field (``datetime-local``: UTC when it has no zone)."""
    text = _text(value)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"{name}: {text!r} is not a date or time (2024-06-01T14:30)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _filters(request: Request, *, leave_out: str | None = None) -> dict[str, str]:
    """The page's query parameters that filter (not blank, not *leave_out*), for its links."""
    return {k: v for k, v in request.query_params.items() if k != leave_out and v.strip() != ""}


def _choice(name: str, value: str | None, choices: dict[str, bool]) -> bool | None:
    text = _text(value)
    if text is None:
        return None
    if text not in choices:
        raise InvalidRequest(f"{name}: use one of {', '.join(choices)}")
    return choices[text]


# --- the list ------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
async def session_list_page(
    request: Request,
    caller: WebCaller,
    service: Service,
    user: str | None = None,
    resource: str | None = None,
    account: str | None = None,
    project: str | None = None,
    since: str | None = None,
    until: str | None = None,
    status: str | None = None,
    end_reason: str | None = None,
    errors: str | None = None,
    cursor: str | None = None,
    size: int = Query(default=LIST_PAGE, ge=1, le=MAX_LIST_PAGE),
) -> HTMLResponse:
    reason = _text(end_reason)
    if reason is not None and reason not in SESSION_END_REASONS:
        raise InvalidRequest(f"end_reason: use one of {', '.join(sorted(SESSION_END_REASONS))}")
    token = _text(cursor)
    after = None if token is None else SessionCursor.decode(token)
    found = await service.db(
        service.store.list_sessions,
        limit=size + 1,
        requester=_text(user),
        resource=_text(resource),
        account=_text(account),
        project=_text(project),
        since=_when("since", since),
        until=_when("until", until),
        active=_choice("status", status, _STATUSES),
        end_reason=reason,
        has_errors=_choice("errors", errors, _ERRORS),
        before=None if after is None else (after.started_at, after.session_id),
        visible_to=visibility(caller),
    )
    sessions, more = found[:size], len(found) > size
    counts = await service.db(service.store.session_counts, [s.id for s in sessions])
    filters = _filters(request, leave_out="cursor")
    next_cursor = SessionCursor(sessions[-1].started_at, sessions[-1].id).encode() if more else None
    return render(
        request,
        "sessions/list.html",
        section="sessions",
        sessions=sessions,
        counts=counts,
        filters=filters,
        next_cursor=next_cursor,
        first_page=after is None,
        end_reasons=sorted(SESSION_END_REASONS),
        reads_all=caller.reads_all_sessions(ALL_PROJECTS),
        now=datetime.now(UTC),
    )


@router.get("/search", response_class=HTMLResponse)
async def search_page(
    request: Request,
    caller: WebCaller,
    service: Service,
    q: str | None = None,
    since: str | None = None,
    until: str | None = None,
    status: str | None = None,
) -> HTMLResponse:
    """Statements across every session whose SQL holds *q* (the API's search)."""
    whole_trail_reader(caller)
    text = _text(q)
    records: Sequence[AuditRecord] = []
    if text is not None:
        await drain(service)
        records = await service.db(
            service.store.search_audit,
            text,
            since=_when("since", since),
            until=_when("until", until),
            status=_text(status),
            limit=SEARCH_LIMIT,
        )
    return render(
        request,
        "sessions/search.html",
        section="sessions",
        q=text or "",
        records=records,
        limit=SEARCH_LIMIT,
        filters=_filters(request),
    )


def _attachment(name: str, fmt: str) -> dict[str, str]:
    """Save, do not show: the export is a file (its format already checked)."""
    return {"Content-Disposition": f'attachment; filename="{name}.{fmt}"'}


@router.get("/export")
async def export_window(
    caller: WebCaller,
    service: Service,
    format: str = "jsonl",
    since: str | None = None,
    until: str | None = None,
) -> Response:
    """Every record of the sessions started in ``[since, until)`` (the API's window export)."""
    whole_trail_reader(caller)
    encoder = ExportEncoder(format)
    ids = await service.db(
        review.session_ids_oldest_first,
        session_list(service),
        since=_when("since", since),
        until=_when("until", until),
    )
    return await export_response(service, encoder, ids, _attachment("pam-audit", format))


# --- one session ---------------------------------------------------------------------


@router.get("/{session_id}", response_class=HTMLResponse)
async def session_page(
    request: Request,
    session_id: str,
    caller: WebCaller,
    service: Service,
    page: int = Query(default=0, ge=0),
    hide_tools: bool = False,
) -> HTMLResponse:
    """The session's facts, connections and a page of its timeline (the last
    page by default, which a live session extends over server-sent events)."""
    session = await visible_session(service, caller, session_id)
    connections = await service.db(service.store.list_connections, session.id)
    await drain(service)
    total = await service.db(service.store.count_audit, session.id, STATEMENT)
    pages = max(1, -(-total // TIMELINE_PAGE))
    view = review.paging(total, min(page or pages, pages), TIMELINE_PAGE)
    assert view.page is not None
    found = await service.db(
        review.statement_page, audit_trail(service), session.id, view.page, TIMELINE_PAGE
    )
    shown, hidden = _shown(found.records, hide_tools)
    last_seq = found.records[-1].seq if found.records else 0
    return render(
        request,
        "sessions/detail.html",
        section="sessions",
        s=session,
        connections=connections,
        labels=_labels(connections),
        live_connections=service.live_connection_count(session.id),
        records=shown,
        hidden=hidden,
        total=total,
        view=view,
        hide_tools=hide_tools,
        # Live updates extend the newest page only.
        stream=session.ended_at is None and view.page == view.pages,
        after_seq=last_seq,
        may_terminate=session.ended_at is None and may_terminate(caller, session),
    )


def _labels(connections: Sequence[Any]) -> dict[str, str]:
    """``#1``, ``#2``, ... by start order (the CLI's numbering)."""
    return {c.id: f"#{n}" for n, c in enumerate(connections, start=1)}


def _shown(records: Sequence[AuditRecord], hide_tools: bool) -> tuple[list[AuditRecord], int]:
    if not hide_tools:
        return list(records), 0
    kept = [r for r in records if not is_catalogue_query(r.sql)]
    return kept, len(records) - len(kept)


@router.get("/{session_id}/export")
async def export_session(
    session_id: str, caller: WebCaller, service: Service, format: str = "jsonl"
) -> Response:
    """Every record of the session as JSON lines or CSV (the API's export)."""
    encoder = ExportEncoder(format)
    session = await visible_session(service, caller, session_id)
    return await export_response(
        service, encoder, [session.id], _attachment(f"pam-session-{session.id[:12]}", format)
    )


# --- verifying -----------------------------------------------------------------------


async def _chain_problems(service: Service, session_id: str) -> list[ChainProblem]:
    await drain(service)
    return await service.db(service.store.verify_audit, session_id)


@router.get("/{session_id}/verified", response_class=HTMLResponse)
async def verify_badge(
    request: Request, session_id: str, caller: WebCaller, service: Service
) -> HTMLResponse:
    """The list's badge: the session's chain checked (loaded as the row is shown)."""
    session = await visible_session(service, caller, session_id)
    problems = await _chain_problems(service, session.id)
    return render(request, "sessions/_badge.html", problems=problems, detailed=False)


@router.post("/{session_id}/verify", response_class=HTMLResponse)
async def verify_session(
    request: Request, session_id: str, caller: WebCaller, service: Service
) -> HTMLResponse:
    """The Verify button: the session's chain checked, and its first problem."""
    session = await visible_session(service, caller, session_id)
    problems = await _chain_problems(service, session.id)
    return render(request, "sessions/_badge.html", problems=problems, detailed=True)


# --- terminating ---------------------------------------------------------------------


@router.post("/{session_id}/terminate")
async def terminate_session(
    request: Request,
    session_id: str,
    caller: WebCaller,
    service: Service,
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """End a live session now: its grant is revoked, every live connection gets
    FATAL naming who and why (an admin of its project)."""
    session = await visible_session(service, caller, session_id)
    if not may_terminate(caller, session):
        raise Forbidden(
            f"{caller.name} may not terminate sessions of project '{session.project or 'default'}'",
            hint="terminating a session takes an admin of its project",
        )
    ended = await service.revoke(session.id, by=caller, reason=_text(reason))
    if is_htmx(request):
        return render(request, "sessions/_terminated.html", s=ended)
    return RedirectResponse(ui(f"/sessions/{session.id}"), status_code=303)


# --- the live stream -----------------------------------------------------------------


def _event(name: str, html: str) -> str:
    """One server-sent event carrying an HTML fragment (one ``data:`` line per line)."""
    lines = html.strip().splitlines() or [""]
    return f"event: {name}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"


@router.get("/{session_id}/stream")
async def session_stream(
    request: Request,
    session_id: str,
    caller: WebCaller,
    service: Service,
    after_seq: int = Query(default=0, ge=0),
    hide_tools: bool = False,
) -> StreamingResponse:
    """New statements of a live session as ``statement`` events (a table row
    each), then one ``ended`` event when it ends."""
    session = await visible_session(service, caller, session_id)
    closing: asyncio.Event = request.app.state.closing
    return StreamingResponse(
        _live(request, service, session, after_seq, hide_tools, closing),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _live(
    request: Request,
    service: Service,
    session: AccessSession,
    after_seq: int,
    hide_tools: bool,
    closing: asyncio.Event,
) -> AsyncIterator[str]:
    row = templates.env.get_template("sessions/_statement.html")
    ended = templates.env.get_template("sessions/_ended.html")
    labels: dict[str, str] = {}
    while not closing.is_set() and not await request.is_disconnected():
        current = await service.db(service.store.get_session, session.id)
        # Read after learning whether it ended: what was recorded before the
        # end is sent before the end is.
        await drain(service, _STREAM_DRAIN_SECONDS)
        records = await service.db(
            service.store.list_audit,
            session.id,
            after_seq=after_seq,
            limit=_STREAM_BATCH,
            kinds=[STATEMENT],
        )
        if records and any(r.connection_id not in labels for r in records):
            connections = await service.db(service.store.list_connections, session.id)
            labels = _labels(connections)
        for record in _shown(records, hide_tools)[0]:
            yield _event("statement", row.render(r=record, labels=labels))
        after_seq = records[-1].seq if records else after_seq
        if len(records) == _STREAM_BATCH:
            continue  # more waiting: read on before sleeping
        if current.ended_at is not None:
            yield _event("ended", ended.render(s=current))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), POLL_SECONDS)

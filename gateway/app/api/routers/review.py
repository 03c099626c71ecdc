"""Review: sessions, their connections and audit trails, search and verification.

Paging is :mod:`gateway.audit.review`'s (over the store as its ``AuditTrail``
port): a page is read by a keyed cursor, so page 766 costs what page 1 costs,
and the answer carries the cursor of the next page. An export streams
(``/v1/sessions/{id}/export``, ``/v1/audit/export``): one page is read, encoded
and sent before the next is read. Every store read runs on the store's thread
(``service.db``), never on the event loop.

Who sees what is :mod:`gateway.app.api.review_access`'s (shared with the web
console): admins and auditors read every session of their projects; anyone
reads the sessions they opened themselves (a session someone may not see is
"not found", as one that does not exist). Searching, exporting a window and
verifying the whole trail take an admin or auditor of every project.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from gateway.app.api.deps import Caller, Service, aware
from gateway.app.api.models import (
    AuditPageOut,
    AuditRecordOut,
    AuditVerifyOut,
    ConnectionOut,
    ProblemOut,
    SessionDetail,
    SessionOut,
)
from gateway.app.api.review_access import (
    audit_trail,
    drain,
    export_response,
    session_list,
    visibility,
    visible_session,
    whole_trail_reader,
)
from gateway.audit import review
from gateway.audit.review import (
    API_MAX_PAGE,
    DEFAULT_PAGE_SIZE,
    STATEMENT,
    Cursor,
    ExportEncoder,
)

router = APIRouter(prefix="/v1")


@router.get("/sessions")
async def list_sessions(
    service: Service,
    caller: Caller,
    active: bool | None = None,
    limit: int = Query(default=100, ge=1, le=10_000),
    resource: str | None = None,
    account: str | None = None,
    requester: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[SessionOut]:
    sessions = await service.db(
        service.store.list_sessions,
        active=active,
        limit=limit,
        resource=resource,
        account=account,
        requester=requester,
        since=aware(since),
        until=aware(until),
        visible_to=visibility(caller),
    )
    return [SessionOut.of(s) for s in sessions]


@router.get("/sessions/{session_id}")
async def show_session(session_id: str, service: Service, caller: Caller) -> SessionDetail:
    session = await visible_session(service, caller, session_id)
    connections = await service.db(service.store.list_connections, session.id)
    await drain(service)
    statements = await service.db(service.store.count_audit, session.id, "statement")
    return SessionDetail(
        session=SessionOut.of(session),
        connections=[ConnectionOut.of(c) for c in connections],
        live_connections=service.live_connection_count(session.id),
        statements=statements,
    )


@router.get("/sessions/{session_id}/audit")
async def session_audit(
    session_id: str,
    service: Service,
    caller: Caller,
    after_seq: int = Query(default=0, ge=0),
    limit: int = Query(default=1000, ge=1, le=10_000),
    kind: Annotated[list[str] | None, Query()] = None,
) -> list[AuditRecordOut]:
    session_id = (await visible_session(service, caller, session_id)).id
    await drain(service)
    records = await service.db(
        service.store.list_audit, session_id, after_seq=after_seq, limit=limit, kinds=kind
    )
    return [AuditRecordOut.of(r) for r in records]


@router.get("/sessions/{session_id}/statements")
async def statement_page(
    session_id: str,
    service: Service,
    caller: Caller,
    page: int = Query(default=1, ge=1),
    page_size: int = Query(default=DEFAULT_PAGE_SIZE, ge=1, le=API_MAX_PAGE),
    cursor: str | None = None,
) -> AuditPageOut:
    """A page of the session's statements: page *page*, or the page after *cursor*."""
    full_id = (await visible_session(service, caller, session_id)).id
    return await _page(service, full_id, STATEMENT, page, page_size, cursor)


@router.get("/sessions/{session_id}/trail")
async def trail_page(
    session_id: str,
    service: Service,
    caller: Caller,
    page: int = Query(default=1, ge=1),
    page_size: int = Query(default=1000, ge=1, le=API_MAX_PAGE),
    cursor: str | None = None,
) -> AuditPageOut:
    """A page of every record of the session (its seq range), or the page after *cursor*."""
    full_id = (await visible_session(service, caller, session_id)).id
    return await _page(service, full_id, None, page, page_size, cursor)


async def _page(
    service: Service,
    full_id: str,
    kind: str | None,
    page: int,
    page_size: int,
    cursor: str | None,
) -> AuditPageOut:
    """A page of the session *full_id* (already resolved by :func:`visible_session`)."""
    trail = audit_trail(service)
    await drain(service)
    total = await service.db(service.store.count_audit, full_id, kind)
    kinds = None if kind is None else (kind,)
    if cursor is not None:
        after = Cursor.decode(cursor, full_id).after_seq
        view = review.paging(total, None, page_size)
        found = await service.db(
            review.read_page, trail, full_id, after_seq=after, limit=page_size, kinds=kinds
        )
    else:
        view = review.paging(
            total, page, page_size, what="records" if kind is None else "statements"
        )
        read = review.record_page if kind is None else review.statement_page
        found = await service.db(read, trail, full_id, page, page_size)
    return AuditPageOut(
        session_id=full_id,
        kind=kind,
        total=total,
        page=view.page,
        pages=view.pages,
        page_size=page_size,
        records=[AuditRecordOut.of(r) for r in found.records],
        next_cursor=None if found.next_cursor is None else found.next_cursor.encode(),
    )


@router.get("/sessions/{session_id}/export")
async def export_session(
    session_id: str,
    service: Service,
    caller: Caller,
    fmt: str = Query(default="jsonl", alias="format"),
) -> StreamingResponse:
    """Every record of the session, in seq order, as JSON lines or CSV, streamed."""
    encoder = ExportEncoder(fmt)
    full_id = (await visible_session(service, caller, session_id)).id
    return await export_response(service, encoder, [full_id])


@router.get("/audit/export")
async def export_window(
    service: Service,
    caller: Caller,
    fmt: str = Query(default="jsonl", alias="format"),
    since: datetime | None = None,
    until: datetime | None = None,
) -> StreamingResponse:
    """Every record of each session started in ``[since, until)``, oldest session first."""
    whole_trail_reader(caller)
    encoder = ExportEncoder(fmt)
    ids = await service.db(
        review.session_ids_oldest_first,
        session_list(service),
        since=aware(since),
        until=aware(until),
    )
    return await export_response(service, encoder, ids)


@router.get("/audit/search")
async def search_audit(
    service: Service,
    caller: Caller,
    q: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    resource: str | None = None,
    account: str | None = None,
    requester: str | None = None,
    session: str | None = None,
    status: str | None = None,
    limit: int = Query(default=100, ge=1, le=10_000),
) -> list[AuditRecordOut]:
    whole_trail_reader(caller)
    await drain(service)
    records = await service.db(
        service.store.search_audit,
        q,
        since=aware(since),
        until=aware(until),
        resource=resource,
        account=account,
        requester=requester,
        session_id=session,
        status=status,
        limit=limit,
    )
    return [AuditRecordOut.of(r) for r in records]


@router.post("/audit/verify")
async def verify_audit(
    service: Service, caller: Caller, session: str | None = None
) -> AuditVerifyOut:
    whole_trail_reader(caller)
    await drain(service)
    checked = 1 if session else await service.db(review.count_sessions, session_list(service))
    problems = await service.db(service.store.verify_audit, session)
    if session is None:  # the whole trail: the access requests' and rotations' records too
        problems += await service.db(service.store.verify_access_trail)
        problems += await service.db(service.store.verify_rotation_record)
    return AuditVerifyOut(
        ok=not problems,
        session=session,
        problems=[ProblemOut.of(p) for p in problems],
        sessions_checked=checked,
    )

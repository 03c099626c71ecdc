"""Review: sessions, their connections and audit trails, search and verification.

Paging is :mod:`gateway.audit.review`'s (over the store as its ``AuditTrail``
port): a page is read by a keyed cursor, so page 766 costs what page 1 costs,
and the answer carries the cursor of the next page. An export streams
(``/v1/sessions/{id}/export``, ``/v1/audit/export``): one page is read, encoded
and sent before the next is read. Every store read runs on the store's thread
(``service.db``), never on the event loop.

Who sees what: admins and auditors read every session of their projects;
anyone reads the sessions they opened themselves (a session someone may not
see is "not found", as one that does not exist). Searching, exporting a window
and verifying the whole trail take an admin or auditor of every project.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

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
from gateway.audit import review
from gateway.audit.review import (
    API_MAX_PAGE,
    DEFAULT_PAGE_SIZE,
    EXPORT_PAGE,
    EXPORT_SESSIONS_HEADER,
    STATEMENT,
    AuditTrail,
    Cursor,
    ExportEncoder,
    Page,
    SessionList,
)
from gateway.errors import Forbidden, NotFound
from gateway.identity.principals import ALL_PROJECTS, DEFAULT_PROJECT, Principal

router = APIRouter(prefix="/v1")

#: How long a read waits for statements the relays have seen to reach the store.
_DRAIN_SECONDS = 5


async def _drain(service: Service) -> None:
    if service.audit_writer is not None:
        # Show what relays have already seen, not only what the last batch wrote.
        await service.audit_writer.drain(timeout=_DRAIN_SECONDS)


async def _visible_session(service: Service, caller: Principal, session_id: str) -> str:
    """The full id of a session *caller* may read."""
    try:
        session = await service.db(service.store.get_session, session_id)
    except NotFound:
        raise NotFound(f"session '{session_id}' not found") from None
    own = session.principal_id is not None and session.principal_id == caller.id
    if not own and not caller.reads_all_sessions(session.project or DEFAULT_PROJECT):
        raise NotFound(f"session '{session_id}' not found")
    return session.id


def _whole_trail_reader(caller: Principal) -> None:
    if not caller.reads_all_sessions(ALL_PROJECTS):
        raise Forbidden(
            f"{caller.name} may not read the whole trail",
            hint="searching, exporting a window and verifying every session take"
            " an admin or auditor of every project; read one session with `pam sessions show`",
        )


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
        visible_to=None if caller.reads_all_sessions(ALL_PROJECTS) else _visibility(caller),
    )
    return [SessionOut.of(s) for s in sessions]


def _visibility(caller: Principal) -> tuple[str, frozenset[str]]:
    """(principal id, projects whose every session it reads)."""
    return caller.id, frozenset(p for p in caller.projects if caller.reads_all_sessions(p))


@router.get("/sessions/{session_id}")
async def show_session(session_id: str, service: Service, caller: Caller) -> SessionDetail:
    session_id = await _visible_session(service, caller, session_id)
    session = await service.db(service.store.get_session, session_id)
    connections = await service.db(service.store.list_connections, session.id)
    await _drain(service)
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
    session_id = await _visible_session(service, caller, session_id)
    await _drain(service)
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
    session_id = await _visible_session(service, caller, session_id)
    return await _page(service, session_id, STATEMENT, page, page_size, cursor)


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
    session_id = await _visible_session(service, caller, session_id)
    return await _page(service, session_id, None, page, page_size, cursor)


def _trail(service: Service) -> AuditTrail[Any]:
    # Typed, so mypy checks that the store implements the review port.
    trail: AuditTrail[Any] = service.store
    return trail


def _sessions(service: Service) -> SessionList[Any]:
    # Typed, so mypy checks that the store implements the session walk's port.
    sessions: SessionList[Any] = service.store
    return sessions


async def _page(
    service: Service,
    session_id: str,
    kind: str | None,
    page: int,
    page_size: int,
    cursor: str | None,
) -> AuditPageOut:
    trail = _trail(service)
    full_id = (await service.db(service.store.get_session, session_id)).id
    await _drain(service)
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
    full_id = await _visible_session(service, caller, session_id)
    return await _export(service, encoder, [full_id])


@router.get("/audit/export")
async def export_window(
    service: Service,
    caller: Caller,
    fmt: str = Query(default="jsonl", alias="format"),
    since: datetime | None = None,
    until: datetime | None = None,
) -> StreamingResponse:
    """Every record of each session started in ``[since, until)``, oldest session first."""
    _whole_trail_reader(caller)
    encoder = ExportEncoder(fmt)
    ids = await service.db(
        review.session_ids_oldest_first, _sessions(service), since=aware(since), until=aware(until)
    )
    return await _export(service, encoder, ids)


async def _export(service: Service, encoder: ExportEncoder, ids: list[str]) -> StreamingResponse:
    # Everything that can be refused (format, session, window) is settled before
    # the first byte: after it, a failure can only cut the stream short.
    await _drain(service)
    trail = _trail(service)

    async def read(session_id: str, after_seq: int) -> Page[Any]:
        return await service.db(
            review.read_page, trail, session_id, after_seq=after_seq, limit=EXPORT_PAGE
        )

    def as_json(record: Any) -> dict[str, Any]:
        return AuditRecordOut.of(record).model_dump(mode="json")

    return StreamingResponse(
        review.export_stream(encoder, ids, read, as_json),
        media_type=encoder.media_type,
        headers={EXPORT_SESSIONS_HEADER: str(len(ids))},
    )


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
    _whole_trail_reader(caller)
    await _drain(service)
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
    _whole_trail_reader(caller)
    await _drain(service)
    checked = 1 if session else await service.db(review.count_sessions, _sessions(service))
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

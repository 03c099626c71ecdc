"""Who may read which session, and the reads every review surface shares: the
JSON API (:mod:`gateway.app.api.routers.review`) and the web console's session
pages (:mod:`gateway.app.web.routes.sessions`) both call these, so the rules
and the export stream exist once.

Invariants:

* Admins and auditors read every session of their projects; anyone reads the
  sessions they opened themselves. A session someone may not read is "not
  found", as one that does not exist (:func:`visible_session`).
* Searching, exporting a window and verifying the whole trail take an admin or
  auditor of every project (:func:`whole_trail_reader`).
* Ending someone's session from a review page takes an admin of its project
  (:func:`may_terminate`).
* A read first asks the audit writer for what the relays have already seen
  (:func:`drain`, bounded), so a page shows the statements just run.
* An export streams (:func:`export_response`): everything that can be refused
  is settled before the first byte.
"""

from __future__ import annotations

from typing import Any, Final

from fastapi.responses import StreamingResponse

from gateway.app.api.models import AuditRecordOut
from gateway.app.gateway import Gateway
from gateway.audit import review
from gateway.audit.review import (
    EXPORT_PAGE,
    EXPORT_SESSIONS_HEADER,
    AuditTrail,
    ExportEncoder,
    Page,
    SessionList,
)
from gateway.errors import Forbidden, NotFound
from gateway.identity.principals import ALL_PROJECTS, DEFAULT_PROJECT, Principal
from gateway.store import AccessSession

__all__ = [
    "DRAIN_SECONDS",
    "audit_trail",
    "drain",
    "export_response",
    "may_terminate",
    "session_list",
    "visibility",
    "visible_session",
    "whole_trail_reader",
]

#: How long a read waits for statements the relays have seen to reach the store.
DRAIN_SECONDS: Final = 5.0


async def drain(service: Gateway, timeout: float = DRAIN_SECONDS) -> None:
    if service.audit_writer is not None:
        # Show what relays have already seen, not only what the last batch wrote.
        await service.audit_writer.drain(timeout=timeout)


async def visible_session(service: Gateway, caller: Principal, session_id: str) -> AccessSession:
    """The session (id or unique prefix) if *caller* may read it."""
    try:
        session = await service.db(service.store.get_session, session_id)
    except NotFound:
        raise NotFound(f"session '{session_id}' not found") from None
    own = session.principal_id is not None and session.principal_id == caller.id
    if not own and not caller.reads_all_sessions(session.project or DEFAULT_PROJECT):
        raise NotFound(f"session '{session_id}' not found")
    return session


def visibility(caller: Principal) -> tuple[str, frozenset[str]] | None:
    """The store's ``visible_to`` for *caller*: None when it reads every session,
    else (principal id, projects whose every session it reads)."""
    if caller.reads_all_sessions(ALL_PROJECTS):
        return None
    return caller.id, frozenset(p for p in caller.projects if caller.reads_all_sessions(p))


def whole_trail_reader(caller: Principal) -> None:
    if not caller.reads_all_sessions(ALL_PROJECTS):
        raise Forbidden(
            f"{caller.name} may not read the whole trail",
            hint="searching, exporting a window and verifying every session take"
            " an admin or auditor of every project; read one session with `pam sessions show`",
        )


def may_terminate(caller: Principal, session: AccessSession) -> bool:
    """Whether *caller* may end *session* from a review page (an admin of its project)."""
    return caller.is_admin(session.project or DEFAULT_PROJECT)


def audit_trail(service: Gateway) -> AuditTrail[Any]:
    # Typed, so mypy checks that the store implements the review port.
    trail: AuditTrail[Any] = service.store
    return trail


def session_list(service: Gateway) -> SessionList[Any]:
    # Typed, so mypy checks that the store implements the session walk's port.
    sessions: SessionList[Any] = service.store
    return sessions


async def export_response(
    service: Gateway, encoder: ExportEncoder, ids: list[str], headers: dict[str, str] | None = None
) -> StreamingResponse:
    """Every record of the sessions *ids*, in seq order, as the encoder's format, streamed."""
    # Everything that can be refused (format, session, window) is settled before
    # the first byte: after it, a failure can only cut the stream short.
    await drain(service)
    trail = audit_trail(service)

    async def read(session_id: str, after_seq: int) -> Page[Any]:
        return await service.db(
            review.read_page, trail, session_id, after_seq=after_seq, limit=EXPORT_PAGE
        )

    def as_json(record: Any) -> dict[str, Any]:
        return AuditRecordOut.of(record).model_dump(mode="json")

    return StreamingResponse(
        review.export_stream(encoder, ids, read, as_json),
        media_type=encoder.media_type,
        headers={EXPORT_SESSIONS_HEADER: str(len(ids)), **(headers or {})},
    )

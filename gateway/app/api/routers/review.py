"""Review: sessions, their connections and audit trails, search and verification."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from gateway.app.api.deps import Service, aware
from gateway.app.api.models import (
    AuditRecordOut,
    AuditVerifyOut,
    ConnectionOut,
    ProblemOut,
    SessionDetail,
    SessionOut,
)

router = APIRouter(prefix="/v1")

#: How long a read waits for statements the relays have seen to reach the store.
_DRAIN_SECONDS = 5


async def _drain(service: Service) -> None:
    if service.audit_writer is not None:
        # Show what relays have already seen, not only what the last batch wrote.
        await service.audit_writer.drain(timeout=_DRAIN_SECONDS)


@router.get("/sessions")
async def list_sessions(
    service: Service,
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
    )
    return [SessionOut.of(s) for s in sessions]


@router.get("/sessions/{session_id}")
async def show_session(session_id: str, service: Service) -> SessionDetail:
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
    after_seq: int = Query(default=0, ge=0),
    limit: int = Query(default=1000, ge=1, le=10_000),
    kind: Annotated[list[str] | None, Query()] = None,
) -> list[AuditRecordOut]:
    await _drain(service)
    records = await service.db(
        service.store.list_audit, session_id, after_seq=after_seq, limit=limit, kinds=kind
    )
    return [AuditRecordOut.of(r) for r in records]


@router.get("/audit/search")
async def search_audit(
    service: Service,
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
async def verify_audit(service: Service, session: str | None = None) -> AuditVerifyOut:
    await _drain(service)
    problems = await service.db(service.store.verify_audit, session)
    return AuditVerifyOut(
        ok=not problems, session=session, problems=[ProblemOut.of(p) for p in problems]
    )

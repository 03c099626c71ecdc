"""``GET /v1/audit/refusals``: the refusal record, newest first.

For admins and auditors of every project: a refusal may name any project's
users, grants and addresses.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from gateway.app.api.deps import Caller, Service, aware
from gateway.app.api.models import RefusalOut
from gateway.errors import Forbidden
from gateway.identity.principals import ALL_PROJECTS
from gateway.store.refusals import MAX_REFUSALS_PAGE

router = APIRouter(prefix="/v1")


@router.get("/audit/refusals")
async def list_refusals(
    service: Service,
    caller: Caller,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_REFUSALS_PAGE)] = 1000,
) -> list[RefusalOut]:
    if not caller.reads_all_sessions(ALL_PROJECTS):
        raise Forbidden(
            f"{caller.name} may not read the refusal record",
            hint="it takes an admin or auditor of every project",
        )
    # What the current interval has counted so far is on record first.
    await service.refusals.flush()
    entries = await service.db(service.store.refusals, since=aware(since), limit=limit)
    return [RefusalOut.of(entry) for entry in entries]

"""Access requests: list, show, approve, deny and cancel.

A request is created by ``POST /v1/access`` when a policy asks for approval.
Who sees one: its requester, its approvers, and the admins and auditors of its
project; to anyone else it does not exist (404, as an unknown id).
"""

from __future__ import annotations

from fastapi import APIRouter, Query

from gateway.access.approvals import actor_for
from gateway.access.requests import AccessRequest, RequestState
from gateway.app.api.deps import Caller, Service
from gateway.app.api.models import ApproveIn, DenyIn, RequestOut, TrailRecordOut
from gateway.identity.principals import Principal

router = APIRouter(prefix="/v1/requests")


def request_out(request: AccessRequest, caller: Principal) -> RequestOut:
    actor = actor_for(caller, request)
    can_decide = (
        request.state is RequestState.PENDING
        and actor.may_approve
        and actor.id != request.requester_id
        and not request.approved_by(actor.id)
    )
    return RequestOut.of(request).model_copy(update={"can_decide": can_decide})


@router.get("")
async def list_requests(
    caller: Caller,
    service: Service,
    mine: bool = False,
    pending: bool = False,
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[RequestOut]:
    """What the caller may see; ``mine``: its own; ``pending``: those it may decide."""
    found = await service.requests.listing(caller, mine=mine, pending=pending, limit=limit)
    return [request_out(r, caller) for r in found]


@router.get("/{request_id}")
async def show_request(request_id: str, caller: Caller, service: Service) -> RequestOut:
    return request_out(await service.requests.visible(caller, request_id), caller)


@router.get("/{request_id}/trail")
async def request_trail(request_id: str, caller: Caller, service: Service) -> list[TrailRecordOut]:
    """What happened to the request, from the access trail, oldest first."""
    request = await service.requests.visible(caller, request_id)
    records = await service.db(service.store.access_trail, request_id=request.id)
    return [TrailRecordOut.of(r) for r in records]


@router.post("/{request_id}/approve")
async def approve(request_id: str, body: ApproveIn, caller: Caller, service: Service) -> RequestOut:
    otp = body.otp.get_secret_value() if body.otp else None
    return request_out(await service.approve(caller, request_id, body.comment, otp), caller)


@router.post("/{request_id}/deny")
async def deny(request_id: str, body: DenyIn, caller: Caller, service: Service) -> RequestOut:
    return request_out(await service.requests.deny(caller, request_id, body.reason), caller)


@router.post("/{request_id}/cancel")
async def cancel(request_id: str, caller: Caller, service: Service) -> RequestOut:
    return request_out(await service.requests.cancel(caller, request_id), caller)

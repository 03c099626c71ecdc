"""Webhooks: admins of a project add, list, remove and test its webhooks, and
see each one's deliveries.

A webhook's secret is in the answer to its creation only. A caller who may not
read a project's sessions is told a webhook of it does not exist (as for
policies); one who reads them but is not its admin is refused.
"""

from __future__ import annotations

from fastapi import APIRouter, Query

from gateway.app.api.deps import Caller, Service, require_admin_of
from gateway.app.api.models import DeliveryOut, WebhookCreatedOut, WebhookIn, WebhookOut
from gateway.errors import Forbidden, NotFound
from gateway.identity.principals import Principal, Role
from gateway.notify.ports import Webhook

router = APIRouter(prefix="/v1/webhooks")


async def _administered(webhook_id: str, caller: Principal, service: Service) -> Webhook:
    """The webhook *webhook_id* names, when *caller* administers its project."""
    webhook = await service.webhooks.get(webhook_id)
    if not caller.reads_all_sessions(webhook.project):
        raise NotFound(f"webhook '{webhook_id}' not found")
    require_admin_of(caller, webhook.project)
    return webhook


@router.post("", status_code=201)
async def add_webhook(body: WebhookIn, caller: Caller, service: Service) -> WebhookCreatedOut:
    require_admin_of(caller, body.project)
    webhook, secret = await service.webhooks.add(
        project=body.project, url=body.url, events=body.events, created_by=caller.name
    )
    return WebhookCreatedOut(**WebhookOut.of(webhook).model_dump(), secret=secret)


@router.get("")
async def list_webhooks(caller: Caller, service: Service) -> list[WebhookOut]:
    """The webhooks of every project the caller administers."""
    if Role.ADMIN not in caller.roles.values():
        raise Forbidden(f"{caller.name} is not an administrator of any project")
    return [WebhookOut.of(w) for w in await service.webhooks.all() if caller.is_admin(w.project)]


@router.delete("/{webhook_id}", status_code=204)
async def remove_webhook(webhook_id: str, caller: Caller, service: Service) -> None:
    webhook = await _administered(webhook_id, caller, service)
    await service.webhooks.remove(webhook.id)


@router.post("/{webhook_id}/test", status_code=202)
async def test_webhook(webhook_id: str, caller: Caller, service: Service) -> DeliveryOut:
    """Send ``webhook.test`` to this webhook now; the answer is the pending delivery."""
    webhook = await _administered(webhook_id, caller, service)
    return DeliveryOut.of(await service.webhooks.test(webhook.id, requested_by=caller.name))


@router.get("/{webhook_id}/deliveries")
async def list_deliveries(
    webhook_id: str,
    caller: Caller,
    service: Service,
    limit: int = Query(default=50, ge=1, le=1000),
) -> list[DeliveryOut]:
    """The webhook's deliveries, newest first."""
    webhook = await _administered(webhook_id, caller, service)
    return [DeliveryOut.of(d) for d in await service.webhooks.deliveries(webhook.id, limit=limit)]

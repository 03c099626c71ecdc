"""Access policies: admins of a project add, list and remove its policies."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.app.api.deps import Caller, Service, require_admin_of
from gateway.app.api.models import PolicyIn, PolicyOut
from gateway.errors import NotFound
from gateway.identity.policy import Policy

router = APIRouter(prefix="/v1")


@router.post("/policies", status_code=201)
async def add_policy(body: PolicyIn, caller: Caller, service: Service) -> PolicyOut:
    require_admin_of(caller, body.project)
    policy = await service.identity.add_policy(
        Policy(
            name=body.name,
            project=body.project,
            subjects=tuple(body.subjects),
            resource_glob=body.resource,
            account_glob=body.account,
            max_duration_seconds=body.max_duration_seconds,
            require_reason=body.require_reason,
            approvals_required=body.approvals_required,
            approvers=tuple(body.approvers),
            break_glass=body.break_glass,
            require_mfa=body.require_mfa,
            idle_timeout_seconds=body.idle_timeout_seconds,
        )
    )
    return PolicyOut.of(policy)


@router.get("/policies")
async def list_policies(caller: Caller, service: Service) -> list[PolicyOut]:
    """The policies of every project the caller administers or audits."""
    return [
        PolicyOut.of(p)
        for p in await service.identity.policies()
        if caller.reads_all_sessions(p.project)
    ]


@router.delete("/policies/{name}", status_code=204)
async def remove_policy(name: str, caller: Caller, service: Service) -> None:
    found = [p for p in await service.identity.policies() if p.name == name]
    if not found or not caller.reads_all_sessions(found[0].project):
        raise NotFound(f"no policy named '{name}'")
    require_admin_of(caller, found[0].project)
    await service.identity.remove_policy(name)

"""Resources (upstream databases) and their accounts: admin operations.

A resource belongs to a project; changing it or its accounts takes an admin of
that project. Listing shows what the caller has a role in; a resource of a
project the caller has no role in is "not found", as one that does not exist.
"""

from __future__ import annotations

from fastapi import APIRouter

from gateway.app.api.deps import Caller, Service, require_admin_of
from gateway.app.api.models import AccountIn, AccountOut, ResourceIn, ResourceOut, RotateIn
from gateway.credentials.verify import VerifyResult
from gateway.errors import NotFound
from gateway.identity.principals import Principal

router = APIRouter(prefix="/v1")


async def _visible(service: Service, caller: Principal, name: str) -> str:
    """The project of resource *name*, if the caller has a role there."""
    try:
        project: str = (await service.db(service.store.get_resource, name)).project
    except NotFound:
        project = ""
    if not project or caller.role_in(project) is None:
        raise NotFound(f"resource '{name}' not found")
    return project


async def _administered(service: Service, caller: Principal, name: str) -> None:
    require_admin_of(caller, await _visible(service, caller, name))


@router.post("/resources", status_code=201)
async def add_resource(body: ResourceIn, caller: Caller, service: Service) -> ResourceOut:
    require_admin_of(caller, body.project)
    resource = await service.db(
        service.store.add_resource,
        body.name,
        body.host,
        body.port,
        body.database,
        ssl_mode=body.ssl_mode,
        ca_cert=body.ca_cert,
        project=body.project,
    )
    return ResourceOut.of(resource)


@router.get("/resources")
async def list_resources(caller: Caller, service: Service) -> list[ResourceOut]:
    return [
        ResourceOut.of(r)
        for r in await service.db(service.store.list_resources)
        if caller.role_in(r.project) is not None
    ]


@router.get("/resources/{name}")
async def get_resource(name: str, caller: Caller, service: Service) -> ResourceOut:
    await _visible(service, caller, name)
    return ResourceOut.of(await service.db(service.store.get_resource, name))


@router.delete("/resources/{name}", status_code=204)
async def remove_resource(name: str, caller: Caller, service: Service) -> None:
    await _administered(service, caller, name)
    await service.db(service.store.remove_resource, name)
    await service.refresh_secrets()


@router.post("/resources/{name}/verify")
async def verify(
    name: str, caller: Caller, service: Service, account: str | None = None
) -> list[VerifyResult]:
    await _administered(service, caller, name)
    return await service.verify(name, account)


@router.post("/resources/{resource}/accounts", status_code=201)
async def add_account(
    resource: str, body: AccountIn, caller: Caller, service: Service
) -> AccountOut:
    await _administered(service, caller, resource)
    account = await service.db(
        service.store.add_account,
        resource,
        body.name,
        body.username,
        body.password.get_secret_value(),
    )
    await service.refresh_secrets()
    return AccountOut.of(account)


@router.get("/accounts")
async def list_accounts(
    caller: Caller, service: Service, resource: str | None = None
) -> list[AccountOut]:
    if resource is not None:
        await _visible(service, caller, resource)
    projects = {r.name: r.project for r in await service.db(service.store.list_resources)}
    return [
        AccountOut.of(a)
        for a in await service.db(service.store.list_accounts, resource)
        if caller.role_in(projects.get(a.resource_name, "")) is not None
    ]


@router.post("/resources/{resource}/accounts/{name}/rotate")
async def rotate(
    resource: str, name: str, body: RotateIn, caller: Caller, service: Service
) -> AccountOut:
    await _administered(service, caller, resource)
    account = await service.db(
        service.store.rotate_password, resource, name, body.password.get_secret_value()
    )
    await service.refresh_secrets()
    return AccountOut.of(account)


@router.delete("/resources/{resource}/accounts/{name}", status_code=204)
async def remove_account(resource: str, name: str, caller: Caller, service: Service) -> None:
    await _administered(service, caller, resource)
    await service.db(service.store.remove_account, resource, name)
    await service.refresh_secrets()

"""Resources (upstream databases) and their accounts: admin operations."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.app.api.deps import Service
from gateway.app.api.models import AccountIn, AccountOut, ResourceIn, ResourceOut, RotateIn
from gateway.credentials.verify import VerifyResult

router = APIRouter(prefix="/v1")


@router.post("/resources", status_code=201)
async def add_resource(body: ResourceIn, service: Service) -> ResourceOut:
    resource = await service.db(
        service.store.add_resource,
        body.name,
        body.host,
        body.port,
        body.database,
        ssl_mode=body.ssl_mode,
        ca_cert=body.ca_cert,
    )
    return ResourceOut.of(resource)


@router.get("/resources")
async def list_resources(service: Service) -> list[ResourceOut]:
    return [ResourceOut.of(r) for r in await service.db(service.store.list_resources)]


@router.get("/resources/{name}")
async def get_resource(name: str, service: Service) -> ResourceOut:
    return ResourceOut.of(await service.db(service.store.get_resource, name))


@router.delete("/resources/{name}", status_code=204)
async def remove_resource(name: str, service: Service) -> None:
    await service.db(service.store.remove_resource, name)
    await service.refresh_secrets()


@router.post("/resources/{name}/verify")
async def verify(name: str, service: Service, account: str | None = None) -> list[VerifyResult]:
    return await service.verify(name, account)


@router.post("/resources/{resource}/accounts", status_code=201)
async def add_account(resource: str, body: AccountIn, service: Service) -> AccountOut:
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
async def list_accounts(service: Service, resource: str | None = None) -> list[AccountOut]:
    return [AccountOut.of(a) for a in await service.db(service.store.list_accounts, resource)]


@router.post("/resources/{resource}/accounts/{name}/rotate")
async def rotate(resource: str, name: str, body: RotateIn, service: Service) -> AccountOut:
    account = await service.db(
        service.store.rotate_password, resource, name, body.password.get_secret_value()
    )
    await service.refresh_secrets()
    return AccountOut.of(account)


@router.delete("/resources/{resource}/accounts/{name}", status_code=204)
async def remove_account(resource: str, name: str, service: Service) -> None:
    await service.db(service.store.remove_account, resource, name)
    await service.refresh_secrets()

"""Resources (upstream databases) and their accounts: admin operations.

A resource belongs to a project; changing it or its accounts takes an admin of
that project. Listing shows what the caller has a role in; a resource of a
project the caller has no role in is "not found", as one that does not exist.
"""

from __future__ import annotations

from fastapi import APIRouter

from gateway.app.api.deps import Caller, Service, require_admin_of
from gateway.app.api.models import (
    AccountAddOut,
    AccountIn,
    AccountOut,
    EphemeralAccountIn,
    GrantRoleOut,
    ResourceIn,
    ResourceOut,
    RotateIn,
    RotationOut,
    RotationRoleIn,
    ScheduleIn,
)
from gateway.credentials.rotation import RotationResult
from gateway.credentials.verify import VerifyResult
from gateway.errors import InvalidRequest, NotFound
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
    await service.ephemeral.refuse_if_unfinished(name, f"remove resource {name}")
    await service.db(service.store.remove_resource, name)
    await service.refresh_secrets()


@router.post("/resources/{name}/verify")
async def verify(
    name: str, caller: Caller, service: Service, account: str | None = None
) -> list[VerifyResult]:
    await _administered(service, caller, name)
    return await service.verify(name, account)


@router.put("/resources/{name}/rotation")
async def set_rotation_role(
    name: str, body: RotationRoleIn, caller: Caller, service: Service
) -> ResourceOut:
    """The role that changes this resource's accounts' passwords (checked by
    signing in with it unless ``verify`` is false), and who gets what a grant's
    own role owned (``reassign_to``: checked to exist and be the rotation
    role's to give to; None: the rotation role itself)."""
    await _administered(service, caller, name)
    password = body.password.get_secret_value()
    if body.reassign_to is not None and body.verify:
        await service.ephemeral.check_owner(name, (body.username, password), body.reassign_to)
    await service.rotations.set_rotation_role(name, body.username, password, verify=body.verify)
    resource = await service.db(service.store.set_reassign_owner, name, body.reassign_to)
    return ResourceOut.of(resource)


@router.delete("/resources/{name}/rotation")
async def clear_rotation_role(name: str, caller: Caller, service: Service) -> ResourceOut:
    """Forget the rotation role: each account changes its own password."""
    await _administered(service, caller, name)
    await service.ephemeral.refuse_if_unfinished(name, f"clear the rotation role of {name}")
    return ResourceOut.of(await service.db(service.store.clear_rotation_credential, name))


@router.post("/resources/{resource}/accounts", status_code=201)
async def add_account(
    resource: str, body: AccountIn, caller: Caller, service: Service
) -> AccountAddOut:
    """Add an account once its password signs in upstream (unless ``verify`` is
    false); a ``managed`` one is rotated right away."""
    await _administered(service, caller, resource)
    account, rotation = await service.rotations.add_account(
        resource,
        body.name,
        body.username,
        body.password.get_secret_value(),
        verify=body.verify,
        managed=body.managed,
        started_by=f"{caller.name} (account add --managed)",
    )
    return AccountAddOut.model_validate(
        {
            **AccountOut.of(account).model_dump(),
            "rotation": None if rotation is None else RotationOut.of(rotation),
        }
    )


@router.post("/resources/{resource}/ephemeral-accounts", status_code=201)
async def add_ephemeral_account(
    resource: str, body: EphemeralAccountIn, caller: Caller, service: Service
) -> AccountOut:
    """Add an account with no password: each grant signs in as a role of its
    own, made in ``template_role`` by the resource's rotation role (checked by
    signing in and trying it, undone, unless ``verify`` is false)."""
    await _administered(service, caller, resource)
    account = await service.ephemeral.add_account(
        resource,
        body.name,
        body.template_role,
        body.cleanup_after_seconds,
        verify=body.verify,
    )
    return AccountOut.of(account)


@router.get("/resources/{name}/roles")
async def grant_roles(name: str, caller: Caller, service: Service) -> list[GrantRoleOut]:
    """The database roles pam made for grants on this resource and has not
    dropped yet (live grants' too), oldest first. Never a password."""
    await _visible(service, caller, name)
    return [GrantRoleOut.of(r) for r in await service.ephemeral.unfinished(name)]


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
    """Store a typed password (one the upstream already has) once it signs in."""
    await _administered(service, caller, resource)
    if (await service.db(service.store.get_account, resource, name)).template_role:
        raise InvalidRequest(
            f"{resource}/{name} is ephemeral: it has no password; each grant signs in as a"
            " role of its own"
        )
    account = await service.rotations.store_password(
        resource,
        name,
        body.password.get_secret_value(),
        verify=body.verify,
        started_by=caller.name,
    )
    return AccountOut.of(account)


@router.post("/resources/{resource}/accounts/{name}/rotations")
async def rotate_now(resource: str, name: str, caller: Caller, service: Service) -> RotationOut:
    """Rotate now to a generated password nobody sees; a failure is a result
    (``ok`` false), and every outcome is on the rotation record."""
    await _administered(service, caller, resource)
    result: RotationResult = await service.rotate(resource, name, started_by=caller.name)
    return RotationOut.of(result)


@router.put("/resources/{resource}/accounts/{name}/schedule")
async def set_schedule(
    resource: str, name: str, body: ScheduleIn, caller: Caller, service: Service
) -> AccountOut:
    """Rotate the account every ``every_seconds`` (first one interval from now),
    or stop (null); a managed account's too."""
    await _administered(service, caller, resource)
    account = await service.schedules.set_schedule(resource, name, body.every_seconds)
    return AccountOut.of(account)


@router.get("/resources/{resource}/accounts/{name}/rotations")
async def rotation_history(
    resource: str, name: str, caller: Caller, service: Service, limit: int = 20
) -> list[RotationOut]:
    """The account's rotation record, newest first (never a password)."""
    await _visible(service, caller, resource)
    await service.db(service.store.get_account, resource, name)
    entries = await service.db(service.store.rotations, resource, name, limit=limit)
    return [RotationOut.of(RotationResult.of(e)) for e in entries]


@router.delete("/resources/{resource}/accounts/{name}", status_code=204)
async def remove_account(resource: str, name: str, caller: Caller, service: Service) -> None:
    await _administered(service, caller, resource)
    await service.db(service.store.remove_account, resource, name)
    await service.refresh_secrets()

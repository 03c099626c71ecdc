"""Project settings: what a project asks beyond its policies.

An admin of the project (or of every project) sets them; its admins and
auditors read them. A project nobody configured answers the defaults.
"""

from __future__ import annotations

from fastapi import APIRouter

from gateway.app.api.deps import Caller, Service, require_admin_of
from gateway.app.api.models import ProjectOut, ProjectSettingsIn
from gateway.errors import Forbidden

router = APIRouter(prefix="/v1/projects")


@router.get("/{project}")
async def show_project(project: str, caller: Caller, service: Service) -> ProjectOut:
    if not caller.reads_all_sessions(project):
        raise Forbidden(f"{caller.name} is not an administrator or auditor of project '{project}'")
    return ProjectOut.of(await service.mfa.project_settings(project))


@router.put("/{project}")
async def set_project(
    project: str, body: ProjectSettingsIn, caller: Caller, service: Service
) -> ProjectOut:
    require_admin_of(caller, project)
    settings = await service.mfa.set_project_settings(
        project, approval_mfa=body.approval_mfa, by=caller.name
    )
    return ProjectOut.of(settings)

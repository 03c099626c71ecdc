"""Per-project settings (:class:`~gateway.identity.projects.ProjectSettings`).

Invariants: a project with no row has the defaults; setting writes the whole
row in one transaction, with who set it and when. ``*`` is not a project.
"""

from __future__ import annotations

from sqlalchemy import select

from gateway.identity.projects import ProjectSettings
from gateway.store.engine import StoreBase
from gateway.store.schema import project_settings
from gateway.store.validation import check_name

__all__ = ["ProjectStore"]


class ProjectStore(StoreBase):
    """Project settings."""

    def project_settings(self, project: str) -> ProjectSettings:
        check_name("project", project)
        with self._transaction(write=False) as conn:
            row = conn.execute(
                select(project_settings).where(project_settings.c.project == project)
            ).first()
        if row is None:
            return ProjectSettings(project)
        return ProjectSettings(
            project,
            approval_mfa=bool(row.approval_mfa),
            updated_at=row.updated_at,
            updated_by=row.updated_by,
        )

    def set_project_settings(self, settings: ProjectSettings) -> ProjectSettings:
        check_name("project", settings.project)
        values = {
            "approval_mfa": int(settings.approval_mfa),
            "updated_at": self._now(),
            "updated_by": settings.updated_by,
        }
        where = project_settings.c.project == settings.project
        with self._transaction(write=True) as conn:
            found = conn.execute(select(project_settings.c.project).where(where)).first()
            if found is None:
                conn.execute(project_settings.insert().values(project=settings.project, **values))
            else:
                conn.execute(project_settings.update().where(where).values(values))
        return self.project_settings(settings.project)

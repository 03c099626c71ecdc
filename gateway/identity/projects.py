"""Per-project settings: what a project asks beyond its policies.

Projects have no table of their own (they are names on resources, roles and
policies); a project's settings exist once an admin sets one, and a project
nobody configured has the defaults.

Invariant: the defaults ask nothing more (approvals need no second factor).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["ProjectSettings"]


@dataclass(frozen=True)
class ProjectSettings:
    project: str
    #: approving a request of this project needs the approver's second factor
    approval_mfa: bool = False
    updated_at: datetime | None = None
    updated_by: str | None = None

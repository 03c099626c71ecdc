"""Principals and their roles, and what each role may do.

A principal is a person (``user``) or automation (``machine``, created with its
token). It holds one role per project, or one for every project (``*``):

* ``admin``: everything in its projects (resources, accounts, users, policies,
  every session and the trail; access without a policy);
* ``auditor``: reads sessions, the trail and verify; never opens access;
* ``member``: opens access only as a policy allows, and sees only its own
  sessions.

Invariant: deny by default. A principal with no role in a project may do
nothing there, and the checks here answer ``False`` for anything unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final

__all__ = [
    "ALL_PROJECTS",
    "DEFAULT_PROJECT",
    "GroupMapping",
    "Principal",
    "PrincipalInfo",
    "PrincipalKind",
    "Role",
    "SsoProvider",
    "SsoSignIn",
    "TokenInfo",
]

#: The project of a role that holds in every project.
ALL_PROJECTS: Final = "*"
DEFAULT_PROJECT: Final = "default"


class Role(StrEnum):
    ADMIN = "admin"
    AUDITOR = "auditor"
    MEMBER = "member"


class PrincipalKind(StrEnum):
    USER = "user"
    MACHINE = "machine"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    id: str
    name: str
    kind: PrincipalKind
    #: project -> role; ``*`` for every project
    roles: dict[str, Role] = field(default_factory=dict)
    groups: frozenset[str] = frozenset()
    #: the token this request came with (its id, never the token)
    token_id: str | None = None

    def role_in(self, project: str) -> Role | None:
        return self.roles.get(project) or self.roles.get(ALL_PROJECTS)

    def is_admin(self, project: str = ALL_PROJECTS) -> bool:
        """Admin of *project* (by default: of every project)."""
        return self.role_in(project) is Role.ADMIN

    def reads_all_sessions(self, project: str) -> bool:
        """May read every session of *project* (admins and auditors)."""
        return self.role_in(project) in (Role.ADMIN, Role.AUDITOR)

    def may_request_access(self, project: str) -> bool:
        """May ask for access in *project* at all (a member still needs a policy)."""
        return self.role_in(project) in (Role.ADMIN, Role.MEMBER)

    @property
    def projects(self) -> frozenset[str]:
        return frozenset(self.roles)

    def matches_subject(self, subject: str) -> bool:
        """A policy subject: a principal's name, or ``@group``."""
        if subject.startswith("@"):
            return subject[1:] in self.groups
        return subject == self.name


@dataclass(frozen=True)
class PrincipalInfo:
    """A principal as listed (no password hash)."""

    id: str
    name: str
    kind: str
    roles: dict[str, str]
    groups: tuple[str, ...]
    has_password: bool
    created_at: datetime
    disabled_at: datetime | None
    #: a second factor is on (gateway.identity.mfa)
    mfa_enabled: bool = False


@dataclass(frozen=True)
class TokenInfo:
    id: str
    principal_id: str
    kind: str
    expires_at: datetime | None


@dataclass(frozen=True)
class SsoProvider:
    """The gateway's OpenID Connect client registration, without its secret."""

    issuer: str
    client_id: str
    groups_claim: str
    #: space-separated, as sent to the provider
    scopes: str
    #: the public base of the callback URL (``<base>/v1/sso/callback``); None: the
    #: address the CLI reached the gateway at
    redirect_base: str | None
    updated_at: datetime


@dataclass(frozen=True)
class GroupMapping:
    """A value of the groups claim, the pam group its holders join, and the
    project (if any) whose ``member`` role they get."""

    claim_value: str
    group: str
    project: str | None


@dataclass(frozen=True)
class SsoSignIn:
    """A principal as a sign-in left it."""

    principal_id: str
    name: str
    #: every group it has now (an admin's and the sign-in's)
    groups: tuple[str, ...]
    #: the projects the mapping made it a member of at this sign-in
    member_of: tuple[str, ...]
    created: bool

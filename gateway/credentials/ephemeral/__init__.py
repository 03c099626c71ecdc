"""A database role per grant (issue 15 point 7; docs/credentials.md).

* :mod:`~gateway.credentials.ephemeral.sql`: role names and statements (pure);
* :mod:`~gateway.credentials.ephemeral.ports`: the store port and the values;
* :mod:`~gateway.credentials.ephemeral.admin`: sessions as the rotation role;
* :mod:`~gateway.credentials.ephemeral.roles`: :class:`EphemeralRoles`, the
  check when an account is added and the role made when a grant opens;
* :mod:`~gateway.credentials.ephemeral.janitor`: disabling and dropping after
  the grant, retries, what a crash left.
"""

from __future__ import annotations

from gateway.credentials.ephemeral.ports import (
    EphemeralRole,
    EphemeralRoleStore,
    EphemeralSettings,
    GrantSession,
    RoleOutcome,
)
from gateway.credentials.ephemeral.roles import EphemeralRoles
from gateway.credentials.ephemeral.sql import DEFAULT_MARKER_ROLE, ephemeral_role_name

__all__ = [
    "DEFAULT_MARKER_ROLE",
    "EphemeralRole",
    "EphemeralRoleStore",
    "EphemeralRoles",
    "EphemeralSettings",
    "GrantSession",
    "RoleOutcome",
    "ephemeral_role_name",
]

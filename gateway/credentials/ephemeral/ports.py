"""What grant roles need from the outside, and the values they pass around.

:class:`EphemeralRoleStore` is implemented by ``gateway.store.Store``
(``gateway.store.ephemeral``); :class:`GrantSession` and
:class:`EphemeralAccount` are read-only views of the store's records.
:class:`EphemeralRole` is a row of ``ephemeral_roles``: a grant's role that pam
has not finished with. Nothing here holds a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from gateway.credentials.ephemeral.sql import DEFAULT_MARKER_ROLE
from gateway.credentials.ports import ResourceRecord

__all__ = [
    "EphemeralAccount",
    "EphemeralRole",
    "EphemeralRoleStore",
    "EphemeralSettings",
    "GrantSession",
    "RoleOutcome",
]

#: ``dropped``: pam dropped it; ``gone``: it was not there (never created, or
#: dropped by hand); ``not_managed``: the role of that name is not pam's for
#: this grant (not a member of the marker role, or its comment names another
#: grant), so pam left it alone
RoleOutcome = Literal["dropped", "gone", "not_managed"]


class GrantSession(Protocol):
    """The parts of an access session a grant's role is made from."""

    @property
    def id(self) -> str: ...
    @property
    def resource_name(self) -> str: ...
    @property
    def account_name(self) -> str: ...
    @property
    def username(self) -> str: ...
    @property
    def expires_at(self) -> datetime: ...


class EphemeralAccount(Protocol):
    """An account as the store keeps it; ephemeral when it has a template role."""

    @property
    def name(self) -> str: ...
    @property
    def template_role(self) -> str | None: ...
    @property
    def cleanup_after_seconds(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class EphemeralRole:
    """A grant's role that pam has not finished with (a row of ``ephemeral_roles``)."""

    id: str
    role: str
    resource: str
    account: str
    session_id: str
    created_at: datetime
    #: None: dropped at the grant's end; else this long after it
    cleanup_after_seconds: int | None
    #: when its grant's session ended (None while it is live)
    session_ended_at: datetime | None
    #: when it was made NOLOGIN and its backends ended
    disabled_at: datetime | None = None
    drop_after: datetime | None = None
    attempts: int = 0
    next_attempt_at: datetime | None = None
    last_error: str | None = None

    def due_at(self) -> datetime | None:
        """When it may be dropped: its grant's end plus ``cleanup_after``."""
        if self.session_ended_at is None:
            return None
        return self.session_ended_at + timedelta(seconds=self.cleanup_after_seconds or 0)


class EphemeralRoleStore(Protocol):
    """The store operations of grant roles (``gateway.store.ephemeral`` documents each)."""

    def get_resource(self, name: str) -> ResourceRecord: ...

    def get_account(self, resource: str, name: str) -> EphemeralAccount: ...

    def reveal_rotation_credential(self, resource: str) -> tuple[str, str] | None: ...

    def reassign_owner(self, resource: str) -> str | None: ...

    def add_ephemeral_account(
        self, resource: str, name: str, template_role: str, cleanup_after_seconds: int | None
    ) -> Any: ...

    def record_ephemeral_role(
        self,
        role: str,
        *,
        resource: str,
        account: str,
        session_id: str,
        cleanup_after_seconds: int | None,
    ) -> EphemeralRole: ...

    def ephemeral_roles_due(self, now: datetime) -> list[EphemeralRole]: ...

    def unfinished_ephemeral_roles(self, resource: str | None = None) -> list[EphemeralRole]: ...

    def ephemeral_role_disabled(
        self, row_id: str, *, at: datetime, drop_after: datetime
    ) -> None: ...

    def ephemeral_role_finished(
        self, row_id: str, *, outcome: RoleOutcome, at: datetime
    ) -> None: ...

    def ephemeral_role_failed(self, row_id: str, *, error: str, retry_at: datetime) -> None: ...


@dataclass(frozen=True, slots=True)
class EphemeralSettings:
    """The gateway settings grant roles use (``ephemeral_*`` in gateway.json)."""

    connect_timeout: float
    password_length: int
    password_alphabet: str
    #: the role every grant role is a member of; pam drops no role that is not
    marker_role: str = DEFAULT_MARKER_ROLE
    #: VALID UNTIL is the grant's end plus this (the server's clock may differ)
    valid_until_margin_seconds: float = 60.0
    janitor_interval_seconds: float = 30.0
    retry_first_delay_seconds: float = 5.0
    retry_max_delay_seconds: float = 600.0
    #: names this gateway in each role's COMMENT (for recovery by hand)
    gateway_id: str = ""

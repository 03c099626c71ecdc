"""What the credentials package needs from the outside, as ports.

:class:`AccountStore` is the store operations the target cache, the masking list
and verify use, :class:`RotationStore` those of rotation; ``gateway.store.Store``
implements both structurally (nothing here imports the store: the composition
root in ``gateway.app`` hands it over).
:class:`StoreThread` runs a blocking store call off the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from gateway.credentials.records import (
    PendingRotation,
    RotationEntry,
    RotationMethod,
    RotationOutcome,
    RotationVia,
)
from gateway.net.upstream import SslMode

T = TypeVar("T")


class ResourceRecord(Protocol):
    """An upstream database as the store keeps it (read-only here)."""

    @property
    def name(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def database(self) -> str: ...
    @property
    def ssl_mode(self) -> SslMode: ...
    @property
    def ca_cert(self) -> str | None: ...


class AccountRecord(Protocol):
    """An upstream login as the store keeps it; it never holds the password."""

    @property
    def resource_name(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def username(self) -> str: ...

    @property
    def managed(self) -> bool: ...

    @property
    def template_role(self) -> str | None:
        """Set for an ephemeral account (no password; a role per grant)."""
        ...


class AccountStore(Protocol):
    def get_resource(self, name: str) -> ResourceRecord: ...

    def get_account(self, resource: str, name: str) -> AccountRecord: ...

    def list_accounts(self, resource: str | None = None) -> Sequence[AccountRecord]: ...

    def reveal_password(self, resource: str, name: str) -> str:
        """The decrypted password."""
        ...

    def reveal_pending_password(
        self, resource: str, account: str, rotation_id: str | None = None
    ) -> str | None:
        """The new password of a rotation in flight (stored, not yet promoted), if
        any (of rotation *rotation_id*, when given)."""
        ...


class RotationStore(AccountStore, Protocol):
    """The store operations of rotation and of storing a checked password
    (``gateway.store.rotations`` documents each)."""

    def add_account(
        self, resource: str, name: str, username: str, password: str, *, managed: bool = False
    ) -> AccountRecord: ...

    def reveal_rotation_credential(self, resource: str) -> tuple[str, str] | None: ...

    def set_rotation_credential(self, resource: str, username: str, password: str) -> Any: ...

    def begin_rotation(
        self,
        resource: str,
        account: str,
        password: str,
        *,
        rotation_id: str,
        via: RotationVia,
        started_by: str,
        gateway_id: str | None = None,
    ) -> PendingRotation: ...

    def pending_rotations(self) -> list[PendingRotation]: ...

    def finish_rotation(
        self,
        resource: str,
        account: str,
        rotation_id: str,
        *,
        promote: bool,
        outcome: RotationOutcome,
        detail: str | None = None,
    ) -> RotationEntry: ...

    def record_rotation(
        self,
        resource: str,
        account: str,
        *,
        rotation_id: str,
        method: RotationMethod,
        via: RotationVia | None,
        started_by: str,
        started_at: datetime,
        outcome: RotationOutcome,
        detail: str | None = None,
        gateway_id: str | None = None,
    ) -> RotationEntry: ...

    def store_typed_password(
        self,
        resource: str,
        account: str,
        password: str,
        *,
        rotation_id: str,
        started_by: str,
        gateway_id: str | None = None,
    ) -> AccountRecord: ...


class StoreThread(Protocol):
    """Runs a blocking store call on the store's own thread."""

    async def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...

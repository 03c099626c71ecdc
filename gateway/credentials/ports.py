"""What the credentials package needs from the outside, as ports.

:class:`AccountStore` is the store operations the target cache, the masking list
and verify use; ``gateway.store.Store`` implements it structurally (nothing here
imports the store: the composition root in ``gateway.app`` hands it over).
:class:`StoreThread` runs a blocking store call off the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

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


class AccountStore(Protocol):
    def get_resource(self, name: str) -> ResourceRecord: ...

    def get_account(self, resource: str, name: str) -> AccountRecord: ...

    def list_accounts(self, resource: str | None = None) -> Sequence[AccountRecord]: ...

    def reveal_password(self, resource: str, name: str) -> str:
        """The decrypted password (the only call that returns one)."""
        ...


class StoreThread(Protocol):
    """Runs a blocking store call on the store's own thread."""

    async def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...

"""What the audit package needs from the outside, as ports.

:class:`AuditStore` is the one store operation the in-process writer uses;
``gateway.store.Store`` implements it structurally (the audit package never
imports the store: the composition root in ``gateway.app`` hands it over).
:class:`StoreThread` runs a blocking store call off the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from gateway.audit.records import EventRow

T = TypeVar("T")


class AuditStore(Protocol):
    def append_audit_rows(
        self,
        rows: Sequence[EventRow],
        *,
        substitute_invalid: bool = False,
        numbered: list[tuple[int, int]] | None = None,
    ) -> int: ...


class StoreThread(Protocol):
    """Runs a blocking store call on the store's own thread."""

    async def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...

"""What the notify package needs from the outside, and the records that cross.

:class:`WebhookStore` is the store operations the notifier and the webhook
service use; ``gateway.store.Store`` implements it structurally (nothing here
imports the store: the composition root in ``gateway.app`` hands it over). The
records are declared here, with the port, and the store builds them.
:class:`StoreThread` runs a blocking store call off the event loop.

Invariants:

* A webhook's secret leaves the store in two places only: the answer to
  :meth:`WebhookStore.add_webhook`'s caller, who generated it, and
  :class:`DueDelivery` (to sign with). Neither prints it (``repr=False``).
* A delivery is ``pending`` until an attempt gets a 2xx answer (``delivered``)
  or the last attempt fails (``failed``); it never goes back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, TypeVar

__all__ = [
    "Delivery",
    "DeliveryState",
    "DueDelivery",
    "OutboxEvent",
    "StoreThread",
    "Webhook",
    "WebhookStore",
]

T = TypeVar("T")


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    #: every attempt failed; kept, and listed, until its webhook is removed
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Webhook:
    id: str
    project: str
    url: str
    #: event names, or ``("*",)``
    events: tuple[str, ...]
    created_at: datetime
    created_by: str | None


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event to write a delivery of, per subscribed webhook of its project
    (or, with ``webhook_id``, to that one webhook only)."""

    project: str
    event: str
    occurred_at: datetime
    #: the event's ``data``, JSON-encoded when it was published
    data_json: str
    webhook_id: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event for one webhook, and how its attempts went."""

    id: str
    webhook_id: str
    event: str
    project: str
    occurred_at: datetime
    state: DeliveryState
    attempts: int
    last_attempt_at: datetime | None
    #: the HTTP status of the last attempt, if one came back
    last_status_code: int | None
    #: why the last attempt failed (None after a 2xx)
    last_error: str | None
    #: when the next attempt is due (None once delivered or failed)
    next_attempt_at: datetime | None
    delivered_at: datetime | None


@dataclass(frozen=True, slots=True)
class DueDelivery:
    """A pending delivery whose attempt is due, with what sending it needs."""

    delivery: Delivery
    url: str
    data_json: str
    #: the webhook's signing secret; None when it cannot be decrypted
    secret: str | None = field(repr=False)


class WebhookStore(Protocol):
    def add_webhook(
        self,
        *,
        project: str,
        url: str,
        events: Sequence[str],
        secret: str,
        created_by: str | None,
    ) -> Webhook: ...

    def list_webhooks(self, project: str | None = None) -> list[Webhook]: ...

    def get_webhook(self, webhook_id: str) -> Webhook:
        """By id or a unique prefix of at least 6 characters."""
        ...

    def remove_webhook(self, webhook_id: str) -> None:
        """The webhook and its deliveries, pending ones included."""
        ...

    def add_deliveries(self, events: Sequence[OutboxEvent]) -> list[Delivery]: ...

    def due_deliveries(
        self, *, now: datetime, limit: int, exclude: Sequence[str] = ()
    ) -> list[DueDelivery]:
        """Pending deliveries due at *now* but those in *exclude* (under way)."""
        ...

    def next_attempt_at(self, *, exclude: Sequence[str] = ()) -> datetime | None:
        """When the earliest pending delivery not in *exclude* is due; None when
        there is none."""
        ...

    def record_attempt(
        self,
        delivery_id: str,
        *,
        attempt: int,
        at: datetime,
        status_code: int | None,
        error: str | None,
        next_attempt_at: datetime | None,
    ) -> Delivery | None:
        """Record attempt number *attempt*: delivered when *error* is None, else
        pending until *next_attempt_at*, or failed when that is None. None when
        the delivery is gone (its webhook was removed meanwhile)."""
        ...

    def deliveries(self, webhook_id: str, *, limit: int) -> list[Delivery]:
        """A webhook's deliveries, newest first."""
        ...


class StoreThread(Protocol):
    """Runs a blocking store call on the store's own thread."""

    async def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...

"""Notifications by webhook: the event catalogue, the signed deliveries and their outbox.

Role: tells the systems around the gateway (chat, ticketing, a SIEM) what
happened, as a signed JSON POST per event to each webhook of the event's
project. See ``docs/webhooks.md``.

* :mod:`gateway.notify.events`: the catalogue (defined once) and each access
  event's ``data``;
* :mod:`gateway.notify.signing`: the ``X-Pam-Signature`` header and its check;
* :mod:`gateway.notify.retry`: the backoff schedule;
* :mod:`gateway.notify.ports`: the store operations it needs, and the records;
* :mod:`gateway.notify.notifier`: :class:`Notifier`: ``publish`` and the deliverer;
* :mod:`gateway.notify.webhooks`: :class:`Webhooks`: adding, listing,
  removing and testing webhooks.

Invariant: notifying never stands between a person and access. ``publish`` is
synchronous, never raises and never waits on the network or the disk; the
outbox rows are written on the store thread and delivered by a background task.
"""

from __future__ import annotations

from gateway.notify.events import ALL_EVENTS, EVENTS, Event
from gateway.notify.notifier import Notifier
from gateway.notify.retry import RetryPolicy
from gateway.notify.webhooks import Webhooks

__all__ = ["ALL_EVENTS", "EVENTS", "Event", "Notifier", "RetryPolicy", "Webhooks"]

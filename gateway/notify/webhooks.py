"""Webhooks per project: add (with a new secret), list, remove, test, and their deliveries.

What the control API's webhook routes call; who may call them (an admin of the
webhook's project) is the router's check.

Invariants:

* The gateway makes every secret (:func:`secrets.token_urlsafe`, 256 bits,
  prefixed ``pamwh_`` so a leaked one is recognisable) and returns it once, from
  :meth:`Webhooks.add`; the store keeps it sealed with the master key.
* A webhook's URL is absolute ``http`` or ``https`` with a host, and carries no
  user name or password (the signature is how a receiver knows the sender;
  credentials in a URL would be shown by every listing).
* Its events are checked against the catalogue (:func:`check_events`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Final
from urllib.parse import urlsplit

from gateway.errors import InvalidRequest
from gateway.notify.events import Event, check_events
from gateway.notify.notifier import Notifier
from gateway.notify.ports import Delivery, StoreThread, Webhook, WebhookStore

__all__ = ["MAX_URL_LENGTH", "SECRET_PREFIX", "Webhooks", "check_url"]

SECRET_PREFIX: Final = "pamwh_"
_SECRET_BYTES: Final = 32
MAX_URL_LENGTH: Final = 2048


def check_url(url: str) -> str:
    """*url* when it is one a webhook may POST to, else :class:`InvalidRequest`."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidRequest(f"a webhook URL has at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidRequest("a webhook URL has no spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError as exc:
        raise InvalidRequest(f"not a URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidRequest(
            "a webhook URL starts with https:// or http://",
            hint="for example https://hooks.example.com/pam",
        )
    if not parts.hostname:
        raise InvalidRequest("a webhook URL names a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest(
            "a webhook URL carries no user name or password",
            hint="receivers check the X-Pam-Signature header with the webhook's secret",
        )
    return url


class Webhooks:
    def __init__(self, store: WebhookStore, db: StoreThread, notifier: Notifier) -> None:
        self._store = store
        self._db = db
        self._notifier = notifier

    async def add(
        self, *, project: str, url: str, events: Sequence[str], created_by: str | None
    ) -> tuple[Webhook, str]:
        """A new webhook and its secret: the only time the secret is returned."""
        secret = SECRET_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        webhook = await self._db(
            self._store.add_webhook,
            project=project,
            url=check_url(url),
            events=check_events(events),
            secret=secret,
            created_by=created_by,
        )
        return webhook, secret

    async def all(self) -> list[Webhook]:
        return await self._db(self._store.list_webhooks)

    async def get(self, webhook_id: str) -> Webhook:
        return await self._db(self._store.get_webhook, webhook_id)

    async def remove(self, webhook_id: str) -> None:
        await self._db(self._store.remove_webhook, webhook_id)

    async def test(self, webhook_id: str, *, requested_by: str) -> Delivery:
        """Send ``webhook.test`` to this webhook alone; returns the pending delivery."""
        return await self._notifier.send_now(
            webhook_id,
            Event.WEBHOOK_TEST,
            {"webhook_id": webhook_id, "requested_by": requested_by},
        )

    async def deliveries(self, webhook_id: str, *, limit: int) -> list[Delivery]:
        return await self._db(self._store.deliveries, webhook_id, limit=limit)

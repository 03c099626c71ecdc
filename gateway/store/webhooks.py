"""Webhooks and their outbox of deliveries.

Implements :class:`gateway.notify.ports.WebhookStore`.

Invariants:

* A webhook's secret is sealed by :class:`~gateway.credentials.secretbox.SecretBox`
  with associated data ``b"pam/webhook/" + webhook_id`` before it reaches SQL;
  it is opened only for :meth:`WebhookStore.due_deliveries` (to sign with), and
  no record listed and no error raised here contains it.
* Removing a webhook removes its deliveries in the same transaction: nothing
  pending is ever sent to a removed webhook.
* A delivery leaves ``pending`` once, and only by :meth:`record_attempt`.
* Adding the deliveries of a batch of events is one transaction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Connection, delete, func, select, update

from gateway.credentials.secretbox import SecretDecryptError
from gateway.errors import InvalidRequest, NotFound
from gateway.notify.events import is_subscribed
from gateway.notify.ports import Delivery, DeliveryState, DueDelivery, OutboxEvent, Webhook
from gateway.store.engine import StoreBase
from gateway.store.rows import new_id
from gateway.store.schema import webhook_deliveries, webhooks
from gateway.store.validation import check_name, check_time

if TYPE_CHECKING:
    from gateway.store.rows import AnyRow

__all__ = ["MAX_DELIVERIES_PAGE", "WebhookStore"]

#: most deliveries one listing returns
MAX_DELIVERIES_PAGE: Final = 1000
_ID_MIN_PREFIX: Final = 6
_ID_CHARS: Final = re.compile(r"[0-9a-f]{1,32}")
_MAX_ERROR: Final = 1000

_DELIVERY_COLUMNS: Final = tuple(c for c in webhook_deliveries.c if c.name != "data")


def webhook_secret_aad(webhook_id: str) -> bytes:
    return b"pam/webhook/" + webhook_id.encode()


def _webhook(row: AnyRow) -> Webhook:
    return Webhook(
        id=row.id,
        project=row.project,
        url=row.url,
        events=tuple(json.loads(row.events)),
        created_at=row.created_at,
        created_by=row.created_by,
    )


def _delivery(row: AnyRow) -> Delivery:
    return Delivery(
        id=row.id,
        webhook_id=row.webhook_id,
        event=row.event,
        project=row.project,
        occurred_at=row.occurred_at,
        state=DeliveryState(row.state),
        attempts=row.attempts,
        last_attempt_at=row.last_attempt_at,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        next_attempt_at=row.next_attempt_at,
        delivered_at=row.delivered_at,
    )


def _webhook_id(conn: Connection, webhook_id: str) -> str:
    """The full id of the webhook *webhook_id* names (an id or a unique prefix)."""
    key = webhook_id.strip().lower()
    if not _ID_CHARS.fullmatch(key):
        raise NotFound(f"webhook '{webhook_id}' not found")
    if len(key) < _ID_MIN_PREFIX:
        raise InvalidRequest(
            f"webhook id prefix '{webhook_id}' is too short: give at least"
            f" {_ID_MIN_PREFIX} characters"
        )
    # Lower-case hex (checked above): the prefix holds no LIKE wildcard.
    found = (
        conn.execute(select(webhooks.c.id).where(webhooks.c.id.startswith(key)).limit(2))
        .scalars()
        .all()
    )
    if not found:
        raise NotFound(f"webhook '{webhook_id}' not found")
    if len(found) > 1:
        raise InvalidRequest(
            f"webhook id prefix '{webhook_id}' matches more than one webhook; give more characters"
        )
    return str(found[0])


class WebhookStore(StoreBase):
    """Webhooks (sealed secrets) and their deliveries."""

    def add_webhook(
        self,
        *,
        project: str,
        url: str,
        events: Sequence[str],
        secret: str,
        created_by: str | None,
    ) -> Webhook:
        webhook_id = new_id()
        if not events:
            raise InvalidRequest("a webhook needs at least one event")
        row = {
            "id": webhook_id,
            "project": check_name("project", project),
            "url": url,
            "events": json.dumps(list(events)),
            "secret_ciphertext": self._box.encrypt(
                secret.encode(), aad=webhook_secret_aad(webhook_id)
            ),
            "created_at": self._now(),
            "created_by": created_by,
        }
        with self._transaction(write=True) as conn:
            conn.execute(webhooks.insert().values(row))
            return _webhook(conn.execute(select(webhooks).where(webhooks.c.id == webhook_id)).one())

    def list_webhooks(self, project: str | None = None) -> list[Webhook]:
        """Webhooks (of *project*, or every one), oldest first."""
        query = select(webhooks).order_by(webhooks.c.created_at, webhooks.c.id)
        if project is not None:
            query = query.where(webhooks.c.project == project)
        with self._transaction(write=False) as conn:
            return [_webhook(row) for row in conn.execute(query)]

    def get_webhook(self, webhook_id: str) -> Webhook:
        with self._transaction(write=False) as conn:
            full_id = _webhook_id(conn, webhook_id)
            return _webhook(conn.execute(select(webhooks).where(webhooks.c.id == full_id)).one())

    def remove_webhook(self, webhook_id: str) -> None:
        with self._transaction(write=True) as conn:
            full_id = _webhook_id(conn, webhook_id)
            conn.execute(
                delete(webhook_deliveries).where(webhook_deliveries.c.webhook_id == full_id)
            )
            conn.execute(delete(webhooks).where(webhooks.c.id == full_id))

    def add_deliveries(self, events: Sequence[OutboxEvent]) -> list[Delivery]:
        """A pending delivery, due at once, of each event for each webhook of its
        project subscribed to it (or for the one webhook it names)."""
        if not events:
            return []
        rows: list[dict[str, Any]] = []
        found: dict[str, Delivery] = {}
        with self._transaction(write=True) as conn:
            projects = {e.project for e in events if e.webhook_id is None}
            by_project: dict[str, list[AnyRow]] = {}
            if projects:
                query = select(webhooks.c.id, webhooks.c.project, webhooks.c.events).where(
                    webhooks.c.project.in_(sorted(projects))
                )
                for hook in conn.execute(query):
                    by_project.setdefault(hook.project, []).append(hook)
            for event in events:
                occurred_at = check_time("occurred_at", event.occurred_at)
                if event.webhook_id is not None:
                    targets = [_webhook_id(conn, event.webhook_id)]
                else:
                    targets = [
                        hook.id
                        for hook in by_project.get(event.project, ())
                        if is_subscribed(json.loads(hook.events), event.event)
                    ]
                rows += [
                    {
                        "id": new_id(),
                        "webhook_id": target,
                        "event": event.event,
                        "project": event.project,
                        "occurred_at": occurred_at,
                        "data": event.data_json,
                        "state": DeliveryState.PENDING.value,
                        "attempts": 0,
                        "next_attempt_at": occurred_at,
                    }
                    for target in targets
                ]
            if rows:
                conn.execute(webhook_deliveries.insert(), rows)
                query = select(*_DELIVERY_COLUMNS).where(
                    webhook_deliveries.c.id.in_([r["id"] for r in rows])
                )
                found = {row.id: _delivery(row) for row in conn.execute(query)}
        return [found[r["id"]] for r in rows]

    def due_deliveries(
        self, *, now: datetime, limit: int, exclude: Sequence[str] = ()
    ) -> list[DueDelivery]:
        """Pending deliveries due at *now* but those in *exclude*, the
        longest-waiting first."""
        query = (
            select(
                *_DELIVERY_COLUMNS,
                webhook_deliveries.c.data,
                webhooks.c.url,
                webhooks.c.secret_ciphertext,
            )
            .join(webhooks, webhooks.c.id == webhook_deliveries.c.webhook_id)
            .where(
                webhook_deliveries.c.state == DeliveryState.PENDING.value,
                webhook_deliveries.c.next_attempt_at <= check_time("now", now),
                webhook_deliveries.c.id.not_in(list(exclude)),
            )
            .order_by(webhook_deliveries.c.next_attempt_at, webhook_deliveries.c.id)
            .limit(max(1, limit))
        )
        with self._transaction(write=False) as conn:
            rows = conn.execute(query).all()
        return [
            DueDelivery(
                delivery=_delivery(row),
                url=row.url,
                data_json=row.data,
                secret=self._open_secret(row.webhook_id, row.secret_ciphertext),
            )
            for row in rows
        ]

    def _open_secret(self, webhook_id: str, sealed: bytes) -> str | None:
        try:
            return self._box.decrypt(bytes(sealed), aad=webhook_secret_aad(webhook_id)).decode()
        except SecretDecryptError:
            return None  # the attempt is recorded as failed, saying why; nothing unsigned is sent

    def next_attempt_at(self, *, exclude: Sequence[str] = ()) -> datetime | None:
        query = select(func.min(webhook_deliveries.c.next_attempt_at)).where(
            webhook_deliveries.c.state == DeliveryState.PENDING.value,
            webhook_deliveries.c.id.not_in(list(exclude)),
        )
        with self._transaction(write=False) as conn:
            value = conn.execute(query).scalar_one_or_none()
        if value is None:
            return None
        # An aggregate loses the column's type on SQLite: convert by hand.
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
        return moment.astimezone(UTC)

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
        at = check_time("at", at)
        if error is None:
            state, next_at, delivered_at = DeliveryState.DELIVERED, None, at
        else:
            state = DeliveryState.PENDING if next_attempt_at is not None else DeliveryState.FAILED
            next_at = None if next_attempt_at is None else check_time("next", next_attempt_at)
            delivered_at = None
        with self._transaction(write=True) as conn:
            changed = conn.execute(
                update(webhook_deliveries)
                .where(
                    webhook_deliveries.c.id == delivery_id,
                    webhook_deliveries.c.state == DeliveryState.PENDING.value,
                )
                .values(
                    state=state.value,
                    attempts=attempt,
                    last_attempt_at=at,
                    last_status_code=status_code,
                    last_error=None if error is None else error[:_MAX_ERROR],
                    next_attempt_at=next_at,
                    delivered_at=delivered_at,
                )
            ).rowcount
            if not changed:
                return None
            row = conn.execute(
                select(*_DELIVERY_COLUMNS).where(webhook_deliveries.c.id == delivery_id)
            ).one()
        return _delivery(row)

    def deliveries(self, webhook_id: str, *, limit: int) -> list[Delivery]:
        with self._transaction(write=False) as conn:
            full_id = _webhook_id(conn, webhook_id)
            query = (
                select(*_DELIVERY_COLUMNS)
                .where(webhook_deliveries.c.webhook_id == full_id)
                .order_by(webhook_deliveries.c.occurred_at.desc(), webhook_deliveries.c.id.desc())
                .limit(max(1, min(limit, MAX_DELIVERIES_PAGE)))
            )
            return [_delivery(row) for row in conn.execute(query)]

"""The notifier: ``publish`` an event, and the background task that delivers it.

:meth:`Notifier.publish` is what the rest of the gateway calls when something
happened. It copies the event (its ``data`` JSON-encoded on the spot) into a
queue and returns; a writer task turns the queue into outbox rows, one
delivery per subscribed webhook of the event's project, on the store thread.
The deliverer task sends each due delivery as a signed POST
(:mod:`gateway.notify.signing`) with ``httpx.AsyncClient``, records the
attempt's outcome, and schedules the next attempt by the backoff
(:mod:`gateway.notify.retry`) until one gets a 2xx answer or the attempts run
out.

Invariants:

* ``publish`` is synchronous, never raises and never waits (on the network or
  the disk): a notification is never worth a failed or slow grant. What it
  cannot take (no running loop, data that is not JSON, a full queue) is logged
  and dropped.
* Durable once written: a delivery row survives a restart and is sent by the
  next daemon (at least once: a receiver dedupes on ``X-Pam-Delivery``).
  :meth:`Notifier.close` writes what is queued before the store thread stops;
  an attempt cut short by the shutdown stays pending, to be sent again.
* Every attempt has a deadline (``RetryPolicy.timeout``, the whole request
  included) and never follows a redirect; only a 2xx answer counts as delivered.
  The answer's body is not read.
* Each attempt is its own task, at most ``batch`` at once: a receiver that is
  slow or silent holds up no other delivery. A delivery is never attempted twice
  at once (one under way is left out of the store's "due" answer until its
  outcome is recorded).
* No secret and no body reaches a log line: logs name the delivery, the
  webhook, the event and the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import httpx
import structlog

from gateway import __version__
from gateway.notify.events import EVENTS, iso_time
from gateway.notify.ports import Delivery, DueDelivery, OutboxEvent, StoreThread, WebhookStore
from gateway.notify.retry import RetryPolicy
from gateway.notify.signing import SIGNATURE_HEADER, signature_header

__all__ = ["DELIVERY_HEADER", "EVENT_HEADER", "Notifier", "delivery_body"]

log = structlog.get_logger(__name__)

EVENT_HEADER: Final = "X-Pam-Event"
DELIVERY_HEADER: Final = "X-Pam-Delivery"
USER_AGENT: Final = f"pam-gateway/{__version__}"
#: events waiting for the store at most; beyond that they are dropped (and counted)
DEFAULT_MAX_QUEUED: Final = 10_000
#: deliveries attempted at once
DEFAULT_BATCH: Final = 16
#: the pause after the store failed the deliverer, before it asks again
_STORE_RETRY_SECONDS: Final = 5.0
#: the longest error text kept for an attempt
_MAX_ERROR: Final = 300


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _json_value(value: object) -> str:
    if isinstance(value, datetime):
        return iso_time(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _encode(data: Mapping[str, Any]) -> str:
    # NaN and infinities are not JSON: refused here, not sent to a receiver's parser.
    return json.dumps(dict(data), default=_json_value, ensure_ascii=False, allow_nan=False)


def delivery_body(delivery: Delivery, data_json: str, gateway_id: str) -> bytes:
    """The request body: the same bytes for every attempt of a delivery."""
    body = {
        "id": delivery.id,
        "event": delivery.event,
        "occurred_at": iso_time(delivery.occurred_at),
        "gateway_id": gateway_id,
        "project": delivery.project,
        "data": json.loads(data_json),
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


class Notifier:
    """Publishes events to the outbox and delivers them; see the module docstring."""

    def __init__(
        self,
        store: WebhookStore,
        db: StoreThread,
        *,
        gateway_id: str,
        retry: RetryPolicy,
        clock: Callable[[], datetime] = _utcnow,
        max_queued: int = DEFAULT_MAX_QUEUED,
        batch: int = DEFAULT_BATCH,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._store = store
        self._db = db
        self._gateway_id = gateway_id
        self._retry = retry
        self._clock = clock
        self._max_queued = max_queued
        self._batch = batch
        self._transport = transport
        self._queue: list[OutboxEvent] = []
        self._dropped = 0
        self._writer: asyncio.Task[None] | None = None
        self._deliverer: asyncio.Task[None] | None = None
        #: delivery id -> its attempt under way (never picked again until it ends)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    # --- publishing -------------------------------------------------------------------

    def publish(self, project: str, event: str, data: Mapping[str, Any]) -> None:
        """Queue *event* of *project* for every webhook subscribed to it.

        On the event loop; returns at once and never raises.
        """
        try:
            if self._closed:
                raise RuntimeError("the notifier is closed")
            if event not in EVENTS:
                raise ValueError(f"unknown event {event!r}")
            item = OutboxEvent(
                project=project,
                event=event,
                occurred_at=self._clock(),
                data_json=_encode(data),
            )
            loop = asyncio.get_running_loop()
            if len(self._queue) >= self._max_queued:
                self._dropped += 1  # the store is not keeping up: counted, logged by the writer
                return
            self._queue.append(item)
            if self._writer is None or self._writer.done():
                self._writer = loop.create_task(self._write(), name="webhook-outbox")
        except Exception as exc:
            log.error(
                "webhook_publish_failed", project=project, webhook_event=event, error=repr(exc)
            )

    async def _write(self) -> None:
        while self._queue or self._dropped:
            batch, self._queue = self._queue, []
            if self._dropped:
                log.error("webhook_events_dropped", count=self._dropped)
                self._dropped = 0
            if not batch:
                continue
            try:
                added = await self._db(self._store.add_deliveries, batch)
            except Exception as exc:
                log.error("webhook_outbox_write_failed", error=repr(exc), lost=len(batch))
                continue
            if added:
                self._wake.set()

    async def send_now(self, webhook_id: str, event: str, data: Mapping[str, Any]) -> Delivery:
        """Write one delivery of *event* for *webhook_id*, whatever it subscribes
        to (``webhook.test``), and wake the deliverer; returns it, pending."""
        item = OutboxEvent(
            project=(await self._db(self._store.get_webhook, webhook_id)).project,
            event=event,
            occurred_at=self._clock(),
            data_json=_encode(data),
            webhook_id=webhook_id,
        )
        (delivery,) = await self._db(self._store.add_deliveries, [item])
        self._wake.set()
        return delivery

    # --- start and stop ---------------------------------------------------------------

    async def start(self) -> None:
        """Start delivering: what an earlier daemon left pending goes out first."""
        self._client = httpx.AsyncClient(
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
            trust_env=False,
            transport=self._transport,
        )
        self._deliverer = asyncio.create_task(self._deliver_forever(), name="webhook-deliverer")

    async def flush(self) -> None:
        """Wait until every published event is in the outbox."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def close(self) -> None:
        """Write what is queued, then stop delivering (pending rows wait for the
        next start); call before the store thread stops."""
        await self.flush()
        self._closed = True
        tasks = [t for t in (self._deliverer, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    # --- delivering -------------------------------------------------------------------

    async def _deliver_forever(self) -> None:
        """Start an attempt for each due delivery (at most ``batch`` at once, each
        its own task, so a slow receiver holds up no other), then sleep until the
        next one is due, an attempt ends or an event is written."""
        while True:
            self._wake.clear()
            room = self._batch - len(self._inflight)
            try:
                if room > 0:
                    due = await self._db(
                        self._store.due_deliveries,
                        now=self._clock(),
                        limit=room,
                        exclude=tuple(self._inflight),
                    )
                    for item in due:
                        self._launch(item)
                    if due:
                        continue
                    next_at = await self._db(
                        self._store.next_attempt_at, exclude=tuple(self._inflight)
                    )
                else:
                    next_at = None  # full: the next attempt to end wakes this up
            except Exception as exc:  # the store failed: keep the task, ask again later
                log.error("webhook_deliverer_failed", error=repr(exc))
                await asyncio.sleep(_STORE_RETRY_SECONDS)
                continue
            wait = None if next_at is None else (next_at - self._clock()).total_seconds()
            if wait is None or wait > 0:
                # Not asyncio.wait_for: on 3.11 it can swallow a cancellation that
                # lands as the event is set, and close() would wait forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    def _launch(self, due: DueDelivery) -> None:
        delivery_id = due.delivery.id
        task = asyncio.create_task(self._attempt(due), name=f"webhook-{delivery_id[:8]}")
        self._inflight[delivery_id] = task

        def _done(task: asyncio.Task[None]) -> None:
            # Only now, with the attempt on record, may the delivery be picked again.
            self._inflight.pop(delivery_id, None)
            self._wake.set()
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("webhook_attempt_crashed", delivery_id=delivery_id, error=repr(exc))

        task.add_done_callback(_done)

    async def _attempt(self, due: DueDelivery) -> None:
        delivery = due.delivery
        attempt = delivery.attempts + 1
        status, error = await self._post(due)
        now = self._clock()
        delay = None if error is None else self._retry.delay_after(attempt)
        next_at = None if delay is None else now + timedelta(seconds=delay)
        try:
            await self._db(
                self._store.record_attempt,
                delivery.id,
                attempt=attempt,
                at=now,
                status_code=status,
                error=error,
                next_attempt_at=next_at,
            )
        except Exception as exc:  # still pending in the store: it is attempted again
            log.error("webhook_attempt_not_recorded", delivery_id=delivery.id, error=repr(exc))
            return
        fields = {
            "delivery_id": delivery.id,
            "webhook_id": delivery.webhook_id,
            "webhook_event": delivery.event,
            "attempt": attempt,
            "status_code": status,
        }
        if error is None:
            log.info("webhook_delivered", **fields)
        elif next_at is not None:
            log.warning("webhook_attempt_failed", **fields, error=error, retry_at=iso_time(next_at))
        else:
            log.error("webhook_delivery_failed", **fields, error=error)

    async def _post(self, due: DueDelivery) -> tuple[int | None, str | None]:
        """One attempt: (status code, None) after a 2xx, else (status or None, why)."""
        if due.secret is None:
            return None, "the webhook's secret cannot be decrypted (was the master key changed?)"
        assert self._client is not None
        delivery = due.delivery
        body = delivery_body(delivery, due.data_json, self._gateway_id)
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: delivery.event,
            DELIVERY_HEADER: delivery.id,
            SIGNATURE_HEADER: signature_header(due.secret, int(self._clock().timestamp()), body),
        }
        timeout = self._retry.timeout
        try:
            async with (
                asyncio.timeout(timeout),
                self._client.stream(
                    "POST", due.url, content=body, headers=headers, timeout=timeout
                ) as response,
            ):
                status = response.status_code
        except (TimeoutError, httpx.TimeoutException):
            return None, f"no answer within {timeout:g}s"
        except httpx.HTTPError as exc:
            return None, _describe(exc)
        except Exception as exc:  # an odd URL, a broken answer: this attempt failed, on record
            return None, f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]
        if 200 <= status < 300:
            return status, None
        return status, f"HTTP {status}"


def _describe(exc: httpx.HTTPError) -> str:
    kind = "cannot connect" if isinstance(exc, httpx.ConnectError) else type(exc).__name__
    text = str(exc).strip()
    return (f"{kind}: {text}" if text else kind)[:_MAX_ERROR]

"""The notifier against a real SQLite store on its own thread and a real HTTP receiver:
publish never raises nor waits, deliveries are signed, retried by the backoff and
recorded, and one slow receiver holds up no other."""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.app.runtime import StoreThread
from gateway.credentials.secretbox import SecretBox
from gateway.notify import Notifier, RetryPolicy, Webhooks
from gateway.notify.ports import Delivery, DeliveryState
from gateway.notify.signing import verify_signature
from gateway.store import Store
from gateway.testing.webhook_receiver import WebhookReceiver

FAST = RetryPolicy(first_delay=0.05, factor=2, max_attempts=3, timeout=5)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(f"sqlite:///{tmp_path / 'pam.db'}", SecretBox(secrets.token_bytes(32))) as s:
        yield s


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as started:
        yield started


@pytest.fixture
async def notifier(store: Store) -> AsyncIterator[Notifier]:
    db = StoreThread()
    started = Notifier(store, db, gateway_id="gw-test", retry=FAST)
    await started.start()
    try:
        yield started
    finally:
        await started.close()
        db.shutdown()


@pytest.fixture
def webhooks(store: Store, notifier: Notifier) -> Webhooks:
    return Webhooks(store, notifier._db, notifier)


async def eventually(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll *check* (off the loop) until it is truthy: a bounded wait."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def only_delivery(store: Store, webhook_id: str, state: DeliveryState) -> Delivery | None:
    found = store.deliveries(webhook_id, limit=10)
    return found[0] if len(found) == 1 and found[0].state == state else None


async def test_publish_never_raises_whatever_it_is_given(notifier: Notifier) -> None:
    with capture_logs() as logs:
        notifier.publish("default", "access.nonsense", {})
        notifier.publish("default", "access.opened", {"when": object()})
        notifier.publish("default", "access.opened", {"ratio": float("nan")})
        await asyncio.to_thread(notifier.publish, "default", "access.opened", {})  # no loop
    assert [e["event"] for e in logs] == ["webhook_publish_failed"] * 4
    assert "unknown event 'access.nonsense'" in logs[0]["error"]


async def test_a_subscribed_webhook_gets_a_signed_body_and_others_get_nothing(
    store: Store, webhooks: Webhooks, notifier: Notifier, receiver: WebhookReceiver
) -> None:
    hook, secret = await webhooks.add(
        project="default", url=receiver.url, events=["access.opened"], created_by="ann"
    )
    unsubscribed, _ = await webhooks.add(
        project="default", url=receiver.url, events=["access.ended"], created_by=None
    )
    elsewhere, _ = await webhooks.add(
        project="other", url=receiver.url, events=["*"], created_by=None
    )

    notifier.publish("default", "access.opened", {"session_id": "s1", "n": 1})

    (got,) = await asyncio.to_thread(receiver.wait_for, "access.opened")
    body = got.json()
    delivery = await eventually(lambda: only_delivery(store, hook.id, DeliveryState.DELIVERED))
    assert body == {
        "id": delivery.id,
        "event": "access.opened",
        "occurred_at": body["occurred_at"],
        "gateway_id": "gw-test",
        "project": "default",
        "data": {"session_id": "s1", "n": 1},
    }
    assert body["occurred_at"].endswith("Z")
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"].startswith("pam-gateway/")
    assert (got.headers["x-pam-event"], got.headers["x-pam-delivery"]) == (
        "access.opened",
        delivery.id,
    )
    assert verify_signature(secret, got.headers["x-pam-signature"], got.body, now=time.time())
    assert (delivery.attempts, delivery.last_status_code, delivery.last_error) == (1, 200, None)
    await notifier.flush()
    # Every outbox row is written now: the other two webhooks have none (a
    # request to them might merely be late; a row would not be).
    assert store.deliveries(unsubscribed.id, limit=10) == []
    assert store.deliveries(elsewhere.id, limit=10) == []
    assert len(receiver.requests) == 1


async def test_a_failing_receiver_is_retried_until_it_answers_2xx(
    store: Store, webhooks: Webhooks, notifier: Notifier, receiver: WebhookReceiver
) -> None:
    hook, _ = await webhooks.add(project="default", url=receiver.url, events=["*"], created_by=None)
    receiver.fail_next(2, status=503)
    notifier.publish("default", "access.ended", {"session_id": "s2"})
    delivery = await eventually(lambda: only_delivery(store, hook.id, DeliveryState.DELIVERED))
    assert (delivery.attempts, delivery.last_status_code, delivery.last_error) == (3, 200, None)
    assert [r.status for r in receiver.requests] == [503, 503, 200]
    # Every attempt carries the same body and delivery id.
    assert len({r.body for r in receiver.requests}) == 1


async def test_when_the_attempts_run_out_the_delivery_stays_failed_saying_why(
    store: Store, webhooks: Webhooks, notifier: Notifier, receiver: WebhookReceiver
) -> None:
    hook, _ = await webhooks.add(project="default", url=receiver.url, events=["*"], created_by=None)
    receiver.fail_next(5, status=500)
    with capture_logs() as logs:
        notifier.publish("default", "access.ended", {})
        failed = await eventually(lambda: only_delivery(store, hook.id, DeliveryState.FAILED))
    assert (failed.attempts, failed.last_status_code, failed.last_error) == (3, 500, "HTTP 500")
    assert failed.next_attempt_at is None
    assert [e["event"] for e in logs if e["event"].startswith("webhook_")] == [
        "webhook_attempt_failed",
        "webhook_attempt_failed",
        "webhook_delivery_failed",
    ]
    assert len(receiver.requests) == 3


async def test_a_receiver_that_holds_the_request_holds_up_no_other_webhook(
    store: Store, webhooks: Webhooks, notifier: Notifier, receiver: WebhookReceiver
) -> None:
    with WebhookReceiver() as slow:
        slow.hold_next()
        await webhooks.add(project="default", url=slow.url, events=["*"], created_by=None)
        fast, _ = await webhooks.add(
            project="default", url=receiver.url, events=["*"], created_by=None
        )
        notifier.publish("default", "access.opened", {})
        await asyncio.to_thread(slow.wait_for, "access.opened")
        # The slow receiver still holds its request; the other webhook was served.
        await eventually(lambda: only_delivery(store, fast.id, DeliveryState.DELIVERED))
        assert slow.requests[0].status is None
        slow.release()


async def test_an_unreachable_receiver_is_an_attempt_that_failed_with_the_error(
    store: Store, webhooks: Webhooks, notifier: Notifier
) -> None:
    down = WebhookReceiver().start()
    down.stop()  # its port now refuses connections
    hook, _ = await webhooks.add(project="default", url=down.url, events=["*"], created_by=None)
    notifier.publish("default", "access.opened", {})
    failed = await eventually(lambda: only_delivery(store, hook.id, DeliveryState.FAILED))
    assert failed.last_status_code is None
    assert failed.last_error is not None and failed.last_error.startswith("cannot connect")


async def test_a_removed_webhook_s_pending_deliveries_go_with_it(
    store: Store, webhooks: Webhooks, notifier: Notifier, receiver: WebhookReceiver
) -> None:
    receiver.hold_next()
    hook, _ = await webhooks.add(project="default", url=receiver.url, events=["*"], created_by=None)
    notifier.publish("default", "access.opened", {})
    await asyncio.to_thread(receiver.wait_for, "access.opened")
    await webhooks.remove(hook.id[:8])
    receiver.release()
    assert await webhooks.all() == []
    with pytest.raises(Exception, match="not found"):
        await webhooks.deliveries(hook.id, limit=10)


async def test_close_writes_what_is_queued_so_the_next_start_sends_it(
    store: Store, receiver: WebhookReceiver
) -> None:
    db = StoreThread()
    try:
        first = Notifier(store, db, gateway_id="gw", retry=FAST)
        hook, _ = await Webhooks(store, db, first).add(
            project="default", url=receiver.url, events=["*"], created_by=None
        )
        # Never started: nothing is sent, but close still writes the outbox.
        first.publish("default", "access.ended", {"why": "shutdown"})
        await first.close()
        (pending,) = store.deliveries(hook.id, limit=10)
        assert (pending.state, pending.attempts) == (DeliveryState.PENDING, 0)
        assert receiver.requests == []

        second = Notifier(store, db, gateway_id="gw", retry=FAST)
        await second.start()
        try:
            (got,) = await asyncio.to_thread(receiver.wait_for, "access.ended")
            assert got.json()["id"] == pending.id
            assert json.loads(got.body)["data"] == {"why": "shutdown"}
        finally:
            await second.close()
    finally:
        db.shutdown()


async def test_the_test_event_goes_to_the_one_webhook_whatever_it_subscribes_to(
    store: Store, webhooks: Webhooks, receiver: WebhookReceiver
) -> None:
    hook, _ = await webhooks.add(
        project="default", url=receiver.url, events=["request.created"], created_by=None
    )
    delivery = await webhooks.test(hook.id, requested_by="ann")
    assert (delivery.event, delivery.state, delivery.attempts) == (
        "webhook.test",
        DeliveryState.PENDING,
        0,
    )
    (got,) = await asyncio.to_thread(receiver.wait_for, "webhook.test")
    assert got.json()["data"] == {"webhook_id": hook.id, "requested_by": "ann"}


def tried_once(store: Store, webhook_id: str) -> bool:
    return [d.attempts for d in store.deliveries(webhook_id, limit=10)] == [1]


async def test_close_returns_when_an_event_was_written_just_before(
    store: Store, receiver: WebhookReceiver
) -> None:
    # The deliverer sleeps until a retry is due; the outbox write wakes it as
    # close() cancels it. On Python 3.11 asyncio.wait_for can swallow that
    # cancellation, and close() would never return.
    receiver.fail_next(1000)
    slow = RetryPolicy(first_delay=600, factor=1, max_attempts=2, timeout=5)
    db = StoreThread()
    try:
        for _ in range(10):
            notifier = Notifier(store, db, gateway_id="gw", retry=slow)
            hook, _ = await Webhooks(store, db, notifier).add(
                project="default", url=receiver.url, events=["*"], created_by=None
            )
            await notifier.start()
            notifier.publish("default", "access.opened", {})
            await eventually(functools.partial(tried_once, store, hook.id))
            notifier.publish("default", "access.ended", {})
            async with asyncio.timeout(30):
                await notifier.close()
    finally:
        db.shutdown()

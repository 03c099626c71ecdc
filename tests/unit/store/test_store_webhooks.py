"""Webhooks and their outbox in the store, on SQLite and PostgreSQL: sealed secrets,
which webhooks an event reaches, due deliveries, and each attempt's record."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, create_engine, select, update
from store_support import T0, FakeClock, pg_admin_url

from gateway.credentials.secretbox import SecretBox
from gateway.errors import InvalidRequest, NotFound
from gateway.notify.ports import DeliveryState, OutboxEvent
from gateway.store import Store
from gateway.store.schema import webhooks

SECRET = "pamwh_" + secrets.token_urlsafe(32)


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, SecretBox(secrets.token_bytes(32)), clock=clock) as opened:
        yield opened


@pytest.fixture
def raw(store_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_admin_url(store_url) if "postgresql" in store_url else store_url)
    yield engine
    engine.dispose()


def add(store: Store, project: str = "default", events: tuple[str, ...] = ("*",)) -> str:
    return store.add_webhook(
        project=project, url="https://h/x", events=events, secret=SECRET, created_by="ann"
    ).id


def event(name: str = "access.opened", project: str = "default", **kw: object) -> OutboxEvent:
    return OutboxEvent(project=project, event=name, occurred_at=T0, data_json="{}", **kw)  # type: ignore[arg-type]


def test_the_secret_is_stored_sealed_and_bound_to_its_row(store: Store, raw: Engine) -> None:
    first, second = add(store), add(store)
    with raw.connect() as conn:
        sealed = dict(conn.execute(select(webhooks.c.id, webhooks.c.secret_ciphertext)).all())
    assert all(SECRET.encode() not in bytes(blob) for blob in sealed.values())
    store.add_deliveries([event()])
    assert {d.secret for d in store.due_deliveries(now=T0, limit=10)} == {SECRET}
    # A blob copied onto another row does not open there: no signature, not a wrong one.
    with raw.begin() as conn:
        conn.execute(
            update(webhooks).where(webhooks.c.id == second).values(secret_ciphertext=sealed[first])
        )
    opened = {d.delivery.webhook_id: d.secret for d in store.due_deliveries(now=T0, limit=10)}
    assert opened == {first: SECRET, second: None}
    assert SECRET not in repr(store.due_deliveries(now=T0, limit=10))


def test_an_event_reaches_the_subscribed_webhooks_of_its_project_only(store: Store) -> None:
    star = add(store)
    opened = add(store, events=("access.opened", "access.revoked"))
    add(store, events=("access.ended",))
    add(store, project="other")
    made = store.add_deliveries([event(), event("webhook.test")])
    assert sorted(d.webhook_id for d in made) == sorted([star, opened])
    assert {(d.state, d.attempts, d.next_attempt_at) for d in made} == {
        (DeliveryState.PENDING, 0, T0)
    }
    # The test event reaches the webhook it names, whatever that subscribes to.
    (test,) = store.add_deliveries([event("webhook.test", webhook_id=opened)])
    assert (test.webhook_id, test.event) == (opened, "webhook.test")


def test_due_deliveries_come_oldest_first_and_not_those_under_way(store: Store) -> None:
    hook = add(store)
    first, second = store.add_deliveries(
        [event(), OutboxEvent("default", "access.ended", T0 + timedelta(seconds=1), "{}")]
    )
    assert [d.delivery.id for d in store.due_deliveries(now=T0, limit=10)] == [first.id]
    later = T0 + timedelta(seconds=5)
    assert [d.delivery.id for d in store.due_deliveries(now=later, limit=10)] == [
        first.id,
        second.id,
    ]
    assert [d.delivery.id for d in store.due_deliveries(now=later, limit=1)] == [first.id]
    assert [
        d.delivery.id for d in store.due_deliveries(now=later, limit=10, exclude=[first.id])
    ] == [second.id]
    assert store.next_attempt_at() == T0
    assert store.next_attempt_at(exclude=[first.id]) == T0 + timedelta(seconds=1)
    assert store.next_attempt_at(exclude=[first.id, second.id]) is None
    (due,) = store.due_deliveries(now=T0, limit=1)
    assert (due.url, due.data_json, due.delivery.webhook_id) == ("https://h/x", "{}", hook)


def test_each_attempt_is_recorded_until_delivered(store: Store) -> None:
    add(store)
    (made,) = store.add_deliveries([event()])
    retry_at = T0 + timedelta(seconds=10)
    failed_once = store.record_attempt(
        made.id, attempt=1, at=T0, status_code=502, error="HTTP 502", next_attempt_at=retry_at
    )
    assert failed_once is not None
    assert (failed_once.state, failed_once.attempts, failed_once.last_status_code) == (
        DeliveryState.PENDING,
        1,
        502,
    )
    assert (failed_once.last_error, failed_once.next_attempt_at) == ("HTTP 502", retry_at)
    assert store.due_deliveries(now=T0, limit=10) == []
    assert store.next_attempt_at() == retry_at
    done = store.record_attempt(
        made.id, attempt=2, at=retry_at, status_code=204, error=None, next_attempt_at=None
    )
    assert done is not None
    assert (done.state, done.attempts, done.last_error, done.delivered_at) == (
        DeliveryState.DELIVERED,
        2,
        None,
        retry_at,
    )
    assert done.next_attempt_at is None
    assert store.next_attempt_at() is None
    # It never leaves delivered.
    assert (
        store.record_attempt(
            made.id, attempt=3, at=retry_at, status_code=None, error="x", next_attempt_at=None
        )
        is None
    )


def test_the_last_failed_attempt_leaves_the_delivery_failed_and_listed(store: Store) -> None:
    hook = add(store)
    (made,) = store.add_deliveries([event()])
    failed = store.record_attempt(
        made.id, attempt=1, at=T0, status_code=None, error="cannot connect", next_attempt_at=None
    )
    assert failed is not None and failed.state == DeliveryState.FAILED
    assert store.next_attempt_at() is None
    assert [d.state for d in store.deliveries(hook, limit=10)] == [DeliveryState.FAILED]


def test_deliveries_are_listed_newest_first_within_the_limit(store: Store) -> None:
    hook = add(store)
    for n in range(3):
        store.add_deliveries([OutboxEvent("default", "access.opened", T0 + timedelta(n), "{}")])
    listed = store.deliveries(hook[:6], limit=2)
    assert [d.occurred_at for d in listed] == [T0 + timedelta(2), T0 + timedelta(1)]


def test_removing_a_webhook_removes_its_deliveries(store: Store) -> None:
    hook, other = add(store), add(store)
    store.add_deliveries([event()])
    store.remove_webhook(hook)
    assert [w.id for w in store.list_webhooks()] == [other]
    assert [d.delivery.webhook_id for d in store.due_deliveries(now=T0, limit=10)] == [other]
    with pytest.raises(NotFound, match="not found"):
        store.deliveries(hook, limit=10)


def test_a_webhook_is_found_by_a_unique_prefix(store: Store) -> None:
    hook = add(store)
    assert store.get_webhook(hook[:6]).id == hook
    assert store.get_webhook(hook.upper()).id == hook
    with pytest.raises(InvalidRequest, match="too short"):
        store.get_webhook(hook[:5])
    with pytest.raises(NotFound):
        store.get_webhook("not-hex")
    with pytest.raises(NotFound):
        store.get_webhook("0" * 32 if not hook.startswith("0") else "f" * 32)


def test_webhooks_are_listed_per_project_with_their_events(store: Store) -> None:
    add(store, events=("access.opened", "access.ended"))
    add(store, project="ops")
    listed = store.list_webhooks("default")
    assert [(w.project, w.events, w.created_by) for w in listed] == [
        ("default", ("access.opened", "access.ended"), "ann")
    ]
    assert len(store.list_webhooks()) == 2


def test_an_invalid_project_name_is_refused(store: Store) -> None:
    with pytest.raises(InvalidRequest, match="invalid project name"):
        add(store, project="no spaces please")

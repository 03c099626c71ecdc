"""A gateway's presence (gateway.access.presence) over a real store (a SQLite
file and a real PostgreSQL) with its clock injected: each tick renews the
lease and ends the sessions of gateways whose lease lapsed, at their last
renewal; a live gateway's sessions, its own included, are left alone; a clean
stop gives the lease up."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError
from store_support import T0, FakeClock

from gateway.access.presence import Presence
from gateway.config import GatewaySettings
from gateway.credentials.schedule import PRESENCE_LEASE_PREFIX, presence_lease
from gateway.credentials.secretbox import SecretBox
from gateway.store import Store
from gateway.store.models import AccessSession

T = TypeVar("T")
KEY = secrets.token_bytes(32)


async def inline(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, SecretBox(KEY), clock=clock) as opened:
        opened.add_resource("db1", "db.example.com", 5432, "app")
        opened.add_account("db1", "ro", "app_reader", "pw-" + secrets.token_hex(8))
        yield opened


def presence(store: Store, gateway_id: str) -> Presence:
    return Presence(store, inline, gateway_id, renew_seconds=5, lease_seconds=15)


def grant(store: Store, gateway_id: str) -> AccessSession:
    return store.create_session(
        requester="alice",
        resource="db1",
        account="ro",
        listen_host="127.0.0.1",
        expires_at=T0 + timedelta(hours=1),
        gateway_id=gateway_id,
    )


async def test_a_tick_ends_only_the_sessions_of_a_gateway_whose_lease_lapsed(
    store: Store, clock: FakeClock
) -> None:
    a, b = presence(store, "gw-a"), presence(store, "gw-b")
    told: list[int] = []
    b.on_closed = told.append
    await a.tick()
    await b.tick()
    of_a, of_b = grant(store, "gw-a"), grant(store, "gw-b")
    clock.advance(5)
    await a.tick()  # a's last renewal
    last_renewal = clock.now
    for _ in range(2):  # a is stuck; b goes on renewing
        clock.advance(5)
        assert await b.tick() == 0
    assert store.get_session(of_a.id).ended_at is None  # a's lease has not lapsed yet
    clock.advance(5)
    assert await b.tick() == 1
    ended = store.get_session(of_a.id)
    assert (ended.end_reason, ended.ended_at) == ("gateway_crash", last_renewal)
    assert store.get_session(of_b.id).ended_at is None
    assert await b.tick() == 0
    assert told == [1]


async def test_a_gateway_never_ends_its_own_live_sessions(store: Store, clock: FakeClock) -> None:
    a = presence(store, "gw-a")
    await a.tick()
    session = grant(store, "gw-a")
    for _ in range(10):
        clock.advance(5)
        assert await a.tick() == 0
    assert store.get_session(session.id).ended_at is None


async def test_start_takes_the_lease_and_a_clean_stop_gives_it_up(store: Store) -> None:
    a = presence(store, "gw-a")
    await a.start()
    try:
        assert store.lease_holders(PRESENCE_LEASE_PREFIX) == {presence_lease("gw-a"): "gw-a"}
        assert a.last_renewed is not None
    finally:
        await a.close()
    assert store.lease_holders(PRESENCE_LEASE_PREFIX) == {}


def test_a_presence_lease_must_outlast_three_renewals() -> None:
    assert GatewaySettings(presence_renew_seconds=1, presence_lease_seconds=3)
    with pytest.raises(ValidationError, match="at least three presence_renew_seconds"):
        GatewaySettings(presence_renew_seconds=5, presence_lease_seconds=14)

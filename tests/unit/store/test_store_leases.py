"""Leases on a SQLite file and a real PostgreSQL: one holder at a time, renewed
by its holder, free once expired or released, and taken by exactly one of many
gateways asking at once (each with a store of its own, as separate processes
would have)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from store_support import FakeClock

from gateway.credentials.secretbox import SecretBox
from gateway.errors import InvalidRequest
from gateway.store import Store

KEY = secrets.token_bytes(32)


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, SecretBox(KEY), clock=clock) as opened:
        yield opened


def test_a_lease_has_one_holder_until_it_expires(store: Store, clock: FakeClock) -> None:
    assert store.acquire_lease("scheduler", "gw-a", 30)
    assert not store.acquire_lease("scheduler", "gw-b", 30)
    assert store.lease_holders() == {"scheduler": "gw-a"}
    clock.advance(20)
    assert store.acquire_lease("scheduler", "gw-a", 30)  # renewed: 30 s from now
    clock.advance(20)
    assert not store.acquire_lease("scheduler", "gw-b", 30)
    clock.advance(10)  # exactly at its expiry: free
    assert store.lease_holders() == {}
    assert store.acquire_lease("scheduler", "gw-b", 30)
    assert not store.acquire_lease("scheduler", "gw-a", 30)
    assert store.lease_holders() == {"scheduler": "gw-b"}


def test_only_its_holder_releases_a_lease(store: Store) -> None:
    assert store.acquire_lease("scheduler", "gw-a", 30)
    assert not store.release_lease("scheduler", "gw-b")
    assert not store.acquire_lease("scheduler", "gw-b", 30)
    assert store.release_lease("scheduler", "gw-a")
    assert store.acquire_lease("scheduler", "gw-b", 30)


def test_holders_are_listed_by_name_prefix(store: Store, clock: FakeClock) -> None:
    store.acquire_lease("gateway/a", "a", 10)
    store.acquire_lease("gateway/b", "b", 30)
    store.acquire_lease("gateway_c", "c", 30)  # "_" is not a wildcard here
    store.acquire_lease("scheduler", "a", 30)
    assert store.lease_holders("gateway/") == {"gateway/a": "a", "gateway/b": "b"}
    clock.advance(10)
    assert store.lease_holders("gateway/") == {"gateway/b": "b"}


def test_a_lease_taken_after_a_wait_for_the_store_lasts_from_when_it_was_written(
    store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A renewal that waited longer than the lease for a connection (the store
    # out of reach) must not write a lease already lapsed: others would take
    # its live holder for gone.
    connect = store._engine.connect

    def slow_connect() -> Any:
        clock.advance(60)
        return connect()

    monkeypatch.setattr(store._engine, "connect", slow_connect)
    assert store.acquire_lease("gateway/gw-a", "gw-a", 30)
    monkeypatch.undo()
    assert store.lease_holders() == {"gateway/gw-a": "gw-a"}
    clock.advance(29)
    assert not store.acquire_lease("gateway/gw-a", "gw-b", 30)
    clock.advance(1)
    assert store.lease_holders() == {}


def test_a_lease_needs_a_name_a_holder_and_a_length(store: Store) -> None:
    for name, holder, seconds in (("", "a", 1), ("x" * 129, "a", 1), ("n", "", 1), ("n", "a", 0)):
        with pytest.raises(InvalidRequest):
            store.acquire_lease(name, holder, seconds)


def test_many_gateways_asking_at_once_get_one_holder(store_url: str, clock: FakeClock) -> None:
    stores = [Store.open(store_url, SecretBox(KEY), clock=clock) for _ in range(6)]

    def ask(i: int, one: Store, start: threading.Barrier, won: list[int]) -> None:
        start.wait()
        if one.acquire_lease("scheduler", f"gw-{i}", 30):
            won.append(i)

    try:
        for _round in range(5):
            start = threading.Barrier(len(stores))
            won: list[int] = []
            threads = [
                threading.Thread(target=ask, args=(i, one, start, won))
                for i, one in enumerate(stores)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(won) == 1
            assert stores[0].lease_holders() == {"scheduler": f"gw-{won[0]}"}
            clock.advance(31)
    finally:
        for one in stores:
            one.close()

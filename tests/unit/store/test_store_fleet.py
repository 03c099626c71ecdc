"""The fleet in the store (``gateway.store.fleet``), on a SQLite file and a real
PostgreSQL: each gateway's advertised address, listed while its presence lease
is held, and a live grant taken over by another gateway (only ``holder_id``
moves; the sealed opener stays, and crash recovery goes by the holder)."""

from __future__ import annotations

import pytest
from store_support import (
    PRESENCE_LEASE_SECONDS,
    FakeClock,
    db1_store,  # noqa: F401 (the store fixture)
    open_session,
    renew_presence,
)

from gateway.errors import InvalidRequest, NotFound
from gateway.store import Store

LEASE = PRESENCE_LEASE_SECONDS


def test_the_fleet_is_the_gateways_present_in_the_order_they_started(
    store: Store, clock: FakeClock
) -> None:
    store.register_gateway("gw-a", "https://a.example:7745")
    clock.advance(1)
    store.register_gateway("gw-b", "https://b.example:7745")
    clock.advance(1)
    store.register_gateway("gw-c", "https://c.example:7745")
    assert store.fleet_urls() == []  # none holds its lease yet
    for gw in ("gw-a", "gw-b", "gw-c"):
        renew_presence(store, gw)
    assert store.fleet_urls() == [
        "https://a.example:7745",
        "https://b.example:7745",
        "https://c.example:7745",
    ]
    store.register_gateway("gw-a", "https://a2.example:7745")  # restarted, moved
    clock.advance(LEASE - 1)
    renew_presence(store, "gw-b")
    clock.advance(2)  # a's and c's leases lapsed, b renewed
    assert store.fleet_urls() == ["https://b.example:7745"]
    renew_presence(store, "gw-a")
    assert store.fleet_urls() == ["https://b.example:7745", "https://a2.example:7745"]
    with pytest.raises(InvalidRequest, match="api_url"):
        store.register_gateway("gw-d", "")


def test_a_take_over_moves_the_holder_and_keeps_the_sealed_opener(store: Store) -> None:
    session = open_session(store, "gw-a")
    assert store.get_session(session.id).holder_id == "gw-a"
    moved, previous = store.take_over_session(session.id, "gw-b")
    assert previous == "gw-a"
    assert (moved.gateway_id, moved.holder_id) == ("gw-a", "gw-b")
    again, previous = store.take_over_session(session.id, "gw-b")
    assert (again.holder_id, previous) == ("gw-b", "gw-b")
    store.end_session(session.id, reason="client_ended")
    assert store.verify_audit(session.id) == []  # the start seal still holds


def test_an_ended_or_expired_grant_is_not_taken_over(store: Store, clock: FakeClock) -> None:
    ended = open_session(store, "gw-a")
    store.end_session(ended.id, reason="client_ended")
    unchanged, _ = store.take_over_session(ended.id, "gw-b")
    assert unchanged.holder_id == "gw-a"
    expired = open_session(store, "gw-a")
    clock.advance((expired.expires_at - clock.now).total_seconds() + 1)
    unchanged, _ = store.take_over_session(expired.id, "gw-b")
    assert unchanged.holder_id == "gw-a"
    with pytest.raises(NotFound):
        store.take_over_session("nosuchsession", "gw-b")


def test_recovery_ends_a_taken_over_grant_only_when_its_new_holder_is_gone(
    store: Store, clock: FakeClock
) -> None:
    renew_presence(store, "gw-b")
    session = open_session(store, "gw-a")  # gw-a never renews: it is gone
    store.take_over_session(session.id, "gw-b")
    assert store.close_orphans("gw-c") == 0  # its holder, gw-b, is alive
    clock.advance(LEASE + 1)
    assert store.close_orphans("gw-c") == 1
    assert store.get_session(session.id).end_reason == "gateway_crash"


#: a tunnel grant's client key as the store keeps it (never parsed by the store)
KEY_PEM = "-----BEGIN PUBLIC KEY-----\nstand-in\n-----END PUBLIC KEY-----\n"


def _tunnel_session(store: Store, gateway_id: str) -> str:
    return open_session(store, gateway_id, client_public_key=KEY_PEM).id


def test_a_stopping_gateway_hands_a_tunnel_grant_to_the_longest_running_other(
    store: Store, clock: FakeClock
) -> None:
    for gw in ("gw-a", "gw-b", "gw-c"):
        store.register_gateway(gw, f"https://{gw}.example")
        renew_presence(store, gw)
        clock.advance(1)
    tunnel = _tunnel_session(store, "gw-a")
    local = open_session(store, "gw-a").id
    assert store.tunnel_grants_held_by("gw-b") == []
    assert store.hand_over_session(local, "gw-a") is None  # its door was on gw-a's host
    assert store.hand_over_session(tunnel, "gw-c") is None  # not gw-c's to give
    assert store.hand_over_session(tunnel, "gw-a") == "gw-b"
    assert store.get_session(tunnel).holder_id == "gw-b"
    assert store.tunnel_grants_held_by("gw-b") == [tunnel]
    store.end_session(tunnel, reason="client_ended")
    assert store.tunnel_grants_held_by("gw-b") == []


def test_no_hand_over_without_another_gateway_present(store: Store, clock: FakeClock) -> None:
    store.register_gateway("gw-a", "https://a.example")
    store.register_gateway("gw-b", "https://b.example")
    renew_presence(store, "gw-a")
    renew_presence(store, "gw-b")
    clock.advance(LEASE + 1)  # gw-b's lease lapsed (gw-a is the one asking)
    tunnel = _tunnel_session(store, "gw-a")
    assert store.hand_over_session(tunnel, "gw-a") is None
    assert store.get_session(tunnel).holder_id == "gw-a"

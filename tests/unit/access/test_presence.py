"""A gateway's presence (gateway.access.presence) over a real store (a SQLite
file and a real PostgreSQL) with its clock injected: each tick renews the
lease and ends the sessions of gateways whose lease lapsed, at their last
renewal; a live gateway's sessions, its own included, are left alone; a clean
stop gives the lease up. A gateway that cannot renew for longer than its grace
refuses new connections and, in strict mode, ends its live ones."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError
from store_support import FakeClock, open_session, store_with_db1

from gateway.access.admission import Admission
from gateway.access.presence import REFUSAL, Presence
from gateway.config import GatewaySettings
from gateway.credentials.schedule import PRESENCE_LEASE_PREFIX, presence_lease
from gateway.errors import StoreError
from gateway.net.relay import Termination
from gateway.protocol.sqlstate import SqlState
from gateway.store import Store

T = TypeVar("T")
KEY = secrets.token_bytes(32)


async def inline(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with store_with_db1(store_url, KEY, clock) as opened:
        yield opened


def presence(store: Store, gateway_id: str) -> Presence:
    return Presence(store, inline, gateway_id, renew_seconds=5, lease_seconds=15)


async def test_a_tick_ends_only_the_sessions_of_a_gateway_whose_lease_lapsed(
    store: Store, clock: FakeClock
) -> None:
    a, b = presence(store, "gw-a"), presence(store, "gw-b")
    told: list[list[str]] = []
    b.on_closed = told.append
    await a.tick()
    await b.tick()
    of_a, of_b = open_session(store, "gw-a"), open_session(store, "gw-b")
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
    assert told == [[of_a.id]]


async def test_a_gateway_never_ends_its_own_live_sessions(store: Store, clock: FakeClock) -> None:
    a = presence(store, "gw-a")
    await a.tick()
    session = open_session(store, "gw-a")
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


class Unreachable:
    """A store that can be cut off: every call raises while ``down``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.down = False

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise StoreError("state store error: connection refused")
        return getattr(self.store, name)(*args, **kwargs)

    def acquire_lease(self, name: str, holder: str, seconds: float) -> bool:
        return bool(self._call("acquire_lease", name, holder, seconds))

    def release_lease(self, name: str, holder: str) -> bool:
        return bool(self._call("release_lease", name, holder))

    def close_orphans(
        self, gateway_id: str, *, starting: bool = False, ended: list[str] | None = None
    ) -> int:
        return int(self._call("close_orphans", gateway_id, starting=starting, ended=ended))


@pytest.mark.parametrize("strict", [False, True])
async def test_out_of_reach_past_the_grace_new_connections_are_refused_and_strictly_live_ones_cut(
    store: Store, strict: bool
) -> None:
    flaky = Unreachable(store)
    now = [100.0]
    cuts: list[Termination] = []
    a = Presence(
        flaky,
        inline,
        "gw-a",
        grace_seconds=15,
        strict=strict,
        cut_live=cuts.append,
        monotonic=lambda: now[0],
    )
    assert a.refusal() is None  # before its start
    await a.tick()
    flaky.down = True
    now[0] += 15
    with pytest.raises(StoreError):
        await a.tick()
    a.check_grace()
    assert a.refusal() is None and cuts == []  # within the grace
    now[0] += 0.5
    refusal = a.refusal()
    assert refusal is not None
    assert (refusal.reason, refusal.sqlstate) == ("store_unavailable", SqlState.CANNOT_CONNECT_NOW)
    a.check_grace()
    a.check_grace()  # once per outage
    assert [(c.reason, c.sqlstate) for c in cuts] == (
        [("store_unavailable", SqlState.ADMIN_SHUTDOWN)] if strict else []
    )
    flaky.down = False
    await a.tick()
    assert a.refusal() is None
    flaky.down = True
    now[0] += 16
    a.check_grace()  # a new outage: cut again
    assert len(cuts) == (2 if strict else 0)


async def test_the_gateway_wide_check_refuses_with_the_stores_reason() -> None:
    a = Presence(Unreachable(None), inline, "gw-a", monotonic=lambda: 0.0)  # type: ignore[arg-type]
    assert Admission(checks=(a.refusal,)).refusal() is None
    a.last_renewed = -20.0
    assert Admission(checks=(a.refusal,)).refusal() is REFUSAL


async def test_after_renewal_runs_at_start_and_each_tick_and_its_failure_fails_nothing(
    store: Store,
) -> None:
    a = presence(store, "gw-a")
    calls: list[int] = []

    async def after() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("the key ring directory is unreadable")

    a.after_renewal = after
    await a.tick()
    assert await a.tick() == 0  # the hook failed: logged, the lease renewed all the same
    assert a.is_lease_fresh()
    await a.tick()
    assert calls == [1, 1, 1]
    b = presence(store, "gw-b")
    b.after_renewal = after
    await b.start()  # the loop's first tick is renew_seconds away
    await b.close()
    assert calls == [1, 1, 1, 1]

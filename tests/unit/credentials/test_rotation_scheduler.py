"""Rotation schedules: the next-time, jitter and backoff arithmetic with the
random draw given, and the scheduler's ticks over a real store (a SQLite file
and a real PostgreSQL) with its clock and draw injected. The rotation itself is
a stand-in that says how it ended: the real one runs against PostgreSQL in
tests/integration/test_rotation_schedule.py."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest
from store_support import T0, FakeClock

from gateway.credentials.schedule import (
    PRESENCE_LEASE_PREFIX,
    SCHEDULER_LEASE,
    RotationScheduler,
    SchedulePlan,
    presence_lease,
)
from gateway.credentials.secretbox import SecretBox
from gateway.errors import InvalidRequest, NotFound
from gateway.store import Store

T = TypeVar("T")
KEY = secrets.token_bytes(32)
DAY = 86400
PLAN = SchedulePlan(jitter_fraction=0.1, retry_first_delay=10.0, retry_factor=2.0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- the arithmetic -----------------------------------------------------------------------


def test_after_a_rotation_the_next_is_one_interval_later_plus_up_to_the_jitter() -> None:
    assert PLAN.after_success(T0, 3600, draw=0.0) == at(3600)
    assert PLAN.after_success(T0, 3600, draw=0.5) == at(3600 + 180)
    assert PLAN.after_success(T0, 3600, draw=0.999) == at(3600 * (1 + 0.1 * 0.999))
    assert SchedulePlan(jitter_fraction=0).after_success(T0, 3600, draw=0.9) == at(3600)


def test_failures_are_retried_with_exponential_backoff_capped_by_the_interval() -> None:
    delays = [PLAN.retry_delay(n, 100, draw=0.0) for n in range(1, 7)]
    assert delays == [10.0, 20.0, 40.0, 80.0, 100.0, 100.0]
    assert PLAN.retry_delay(2, 100, draw=0.5) == 20 * 1.05
    # Jitter never takes a retry past the interval.
    assert PLAN.retry_delay(4, 85, draw=0.9) == 85.0
    assert PLAN.after_failure(T0, 100, 3, draw=0.0) == at(40)


def test_the_backoff_stays_finite_after_years_of_failures_and_flat_with_factor_one() -> None:
    assert PLAN.retry_delay(10**6, 30 * DAY, draw=0.0) == 30 * DAY
    flat = SchedulePlan(jitter_fraction=0, retry_first_delay=5.0, retry_factor=1.0)
    assert [flat.retry_delay(n, 60, draw=0.0) for n in (1, 2, 10**6)] == [5.0, 5.0, 5.0]
    # A first delay longer than the interval is cut to it.
    assert SchedulePlan(retry_first_delay=600).retry_delay(1, 60, draw=0.0) == 60.0


# --- the scheduler --------------------------------------------------------------------------


@dataclass(frozen=True)
class Ended:
    ok: bool
    outcome: str
    ended_at: datetime
    detail: str | None = None


@dataclass
class StandIn:
    """The gateway's rotation as the scheduler sees it: each call takes *takes*
    seconds of the clock and ends as the next of *outcomes* says."""

    clock: FakeClock
    outcomes: list[bool | Exception] = field(default_factory=list)
    takes: float = 2.0
    calls: list[tuple[str, str, str]] = field(default_factory=list)

    async def __call__(self, resource: str, account: str, *, started_by: str) -> Ended:
        self.calls.append((resource, account, started_by))
        outcome = self.outcomes.pop(0) if self.outcomes else True
        if isinstance(outcome, Exception):
            raise outcome
        ended = self.clock.advance(self.takes)
        return Ended(outcome, "rotated" if outcome else "failed", ended, None if outcome else "no")


async def inline(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, SecretBox(KEY), clock=clock) as opened:
        opened.add_resource("prod", "db.example.com", 5432, "app")
        opened.add_account("prod", "ro", "app_ro", "pw-" + secrets.token_hex(8))
        opened.add_account("prod", "rw", "app_rw", "pw-" + secrets.token_hex(8))
        yield opened


@dataclass
class Recoveries:
    gone: list[Callable[[str], bool]] = field(default_factory=list)

    async def __call__(self, *, gone: Callable[[str], bool]) -> bool:
        self.gone.append(gone)
        return True


def scheduler(
    store: Store,
    clock: FakeClock,
    rotate: StandIn,
    gateway_id: str = "gw-a",
    draw: float = 0.5,
    recover: Recoveries | None = None,
) -> RotationScheduler:
    return RotationScheduler(
        store,
        inline,
        gateway_id=gateway_id,
        rotate=rotate,
        recover=recover or Recoveries(),
        plan=PLAN,
        lease_seconds=30,
        clock=clock,
        draw=lambda: draw,
        min_interval_seconds=60,
    )


async def tick(one: RotationScheduler) -> None:
    await one.tick()
    await one.wait_for_runs()


async def test_a_schedule_starts_one_interval_from_now_and_refuses_a_short_one(
    store: Store, clock: FakeClock
) -> None:
    one = scheduler(store, clock, StandIn(clock))
    account = await one.set_schedule("prod", "ro", 3600)
    assert (account.rotation_interval_seconds, account.next_rotation_at) == (  # type: ignore[attr-defined]
        3600,
        at(3600 * 1.05),
    )
    with pytest.raises(InvalidRequest, match="at least 1m, not 59s"):
        await one.set_schedule("prod", "ro", 59)
    with pytest.raises(InvalidRequest, match="at most"):
        await one.set_schedule("prod", "ro", 10**10)
    with pytest.raises(NotFound):
        await one.set_schedule("prod", "nope", 3600)
    off = await one.set_schedule("prod", "ro", None)
    assert off.next_rotation_at is None  # type: ignore[attr-defined]


async def test_a_due_rotation_runs_once_and_the_next_is_an_interval_after_it_ended(
    store: Store, clock: FakeClock
) -> None:
    rotate = StandIn(clock)
    one = scheduler(store, clock, rotate)
    await one.set_schedule("prod", "ro", 3600)
    await tick(one)
    assert rotate.calls == []  # not due yet
    clock.now = at(3600 * 1.05)
    await tick(one)
    await tick(one)
    assert rotate.calls == [("prod", "ro", "schedule")]
    account = store.get_account("prod", "ro")
    ended = at(3600 * 1.05 + 2)
    assert account.next_rotation_at == ended + timedelta(seconds=3600 * 1.05)
    assert account.rotation_failures == 0
    assert one.holds_lease


async def test_failures_back_off_then_a_success_resets_the_count(
    store: Store, clock: FakeClock
) -> None:
    rotate = StandIn(clock, outcomes=[False, False, InvalidRequest("in flight"), True])
    one = scheduler(store, clock, rotate, draw=0.0)
    await one.set_schedule("prod", "ro", 60)
    waits = []
    for failures in (1, 2, 3):
        clock.now = store.get_account("prod", "ro").next_rotation_at  # type: ignore[assignment]
        await tick(one)
        account = store.get_account("prod", "ro")
        assert account.rotation_failures == failures
        assert account.next_rotation_at is not None
        waits.append((account.next_rotation_at - clock.now).total_seconds())
    # 10 s, 20 s, then 40 s after the refused one (which took no time).
    assert waits == [10.0, 20.0, 40.0]
    clock.now = store.get_account("prod", "ro").next_rotation_at  # type: ignore[assignment]
    await tick(one)
    account = store.get_account("prod", "ro")
    assert (account.rotation_failures, account.next_rotation_at) == (
        0,
        clock.now + timedelta(seconds=60),
    )
    assert len(rotate.calls) == 4


async def test_an_account_removed_during_its_run_is_left_alone(
    store: Store, clock: FakeClock
) -> None:
    rotate = StandIn(clock, outcomes=[NotFound("account 'ro' not found")])
    one = scheduler(store, clock, rotate)
    await one.set_schedule("prod", "ro", 60)
    clock.advance(3600)
    await tick(one)
    assert rotate.calls == [("prod", "ro", "schedule")]


async def test_only_the_lease_holder_runs_schedules_and_the_lease_moves_when_it_stops(
    store_url: str, store: Store, clock: FakeClock
) -> None:
    with Store.open(store_url, SecretBox(KEY), clock=clock) as other_store:
        a_rotate, b_rotate = StandIn(clock), StandIn(clock)
        a = scheduler(store, clock, a_rotate, gateway_id="gw-a")
        b = scheduler(other_store, clock, b_rotate, gateway_id="gw-b")
        await a.set_schedule("prod", "ro", 60)
        await a.set_schedule("prod", "rw", 60)
        clock.advance(120)
        await tick(a)
        await tick(b)
        assert (a.holds_lease, b.holds_lease) == (True, False)
        assert sorted(a_rotate.calls) == [("prod", "ro", "schedule"), ("prod", "rw", "schedule")]
        assert b_rotate.calls == []
        # Each gateway's presence is gateway.access.presence's, not the scheduler's.
        assert store.lease_holders(PRESENCE_LEASE_PREFIX) == {}
        await a.close()  # gives the lease up
        assert store.lease_holders() == {}
        clock.advance(120)
        await tick(b)
        assert b.holds_lease
        assert sorted(b_rotate.calls) == [("prod", "ro", "schedule"), ("prod", "rw", "schedule")]
        assert store.lease_holders()[SCHEDULER_LEASE] == "gw-b"


async def test_a_holder_that_stops_renewing_loses_the_lease_after_it_expires(
    store_url: str, store: Store, clock: FakeClock
) -> None:
    with Store.open(store_url, SecretBox(KEY), clock=clock) as other_store:
        a = scheduler(store, clock, StandIn(clock), gateway_id="gw-a")
        b = scheduler(other_store, clock, StandIn(clock), gateway_id="gw-b")
        await tick(a)
        clock.advance(29)
        await tick(b)
        assert not b.holds_lease
        clock.advance(1)  # a died without a word: its lease runs out
        await tick(b)
        assert b.holds_lease
        await tick(a)
        assert not a.holds_lease


async def test_the_holder_settles_rotations_left_by_gone_gateways_only(
    store: Store, clock: FakeClock
) -> None:
    for account, gateway in (("ro", "gw-gone"), ("rw", "gw-present")):
        store.begin_rotation(
            "prod",
            account,
            "pw-new-" + secrets.token_hex(8),
            rotation_id=secrets.token_hex(16),
            via="self",
            started_by="alice",
            gateway_id=gateway,
        )
    store.acquire_lease(presence_lease("gw-present"), "gw-present", 300)
    recoveries = Recoveries()
    one = scheduler(store, clock, StandIn(clock), recover=recoveries)
    await tick(one)
    assert one._recovery is not None
    await one._recovery
    [gone] = recoveries.gone
    assert (gone("gw-gone"), gone("gw-present"), gone("gw-a")) == (True, False, False)


async def test_no_rotation_of_a_present_gateway_is_taken_over(
    store: Store, clock: FakeClock
) -> None:
    store.begin_rotation(
        "prod",
        "ro",
        "pw-new-" + secrets.token_hex(8),
        rotation_id=secrets.token_hex(16),
        via="self",
        started_by="alice",
        gateway_id="gw-b",
    )
    store.acquire_lease(presence_lease("gw-b"), "gw-b", 300)
    recoveries = Recoveries()
    one = scheduler(store, clock, StandIn(clock), recover=recoveries)
    await tick(one)
    assert recoveries.gone == [] and one._recovery is None

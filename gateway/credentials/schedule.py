"""Rotation schedules: when an account's password is rotated next, and the
scheduler that rotates it then.

An account may have a schedule (``pam account rotate R A --every 7d``): an
interval and the time the next rotation is due. :class:`SchedulePlan` is the
arithmetic, pure and with the random draw passed in: after a rotation that
worked, the next is due one interval after it ended, put off by a random share
of up to ``jitter_fraction`` of the interval (so accounts scheduled together
drift apart); after ``n`` failures in a row it is tried again after
``retry_first_delay * retry_factor ** (n - 1)``, with the same share of jitter,
and never later than one interval.

:class:`RotationScheduler` is the gateway's task. Each tick it tries to take or
renew the scheduler's lease (:data:`SCHEDULER_LEASE`); only the holder runs due
rotations, so gateways sharing a store take turns. (Each gateway's presence
lease, ``gateway/<gateway id>``, is renewed by ``gateway.access.presence``.)
For each due account it first *claims* the run, moving the due time to when a
failed attempt would be retried, over the due time it read (compare and set);
then it calls the gateway's rotation (``started_by`` ``schedule``) and sets the
next time from how it ended, again over the claimed time.

Invariants:

* One run per due time: a claim that finds the due time changed (an admin set
  the schedule again, another gateway claimed it) runs nothing, and a gateway
  that dies mid-run leaves the account due again at its claim (a retry's wait).
* Nothing here sets a schedule an admin changed meanwhile: the next time is
  written only over the claimed one.
* The holder also settles rotations in flight that a gone gateway left (its
  presence lease expired; :meth:`~gateway.credentials.rotation.Rotations.recover`
  with ``gone``); a rotation of a present gateway is its own to finish.
* Closing waits for the runs in flight, then releases the scheduler's lease, so
  another gateway takes over at its next tick instead of after it runs out.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import structlog

from gateway.credentials.ports import AccountRecord, StoreThread
from gateway.credentials.records import PendingRotation
from gateway.errors import GatewayError, InvalidRequest, NotFound

__all__ = [
    "PRESENCE_LEASE_PREFIX",
    "SCHEDULER_LEASE",
    "STARTED_BY_SCHEDULE",
    "LeaseStore",
    "RotationScheduler",
    "SchedulePlan",
    "ScheduleStore",
    "ScheduledRotation",
    "presence_lease",
]

log = structlog.get_logger(__name__)

#: the lease whose holder runs the schedules
SCHEDULER_LEASE: Final = "rotation-scheduler"
#: each running gateway holds ``gateway/<its id>``
PRESENCE_LEASE_PREFIX: Final = "gateway/"
#: ``started_by`` of a scheduled rotation, on its record and its webhook
STARTED_BY_SCHEDULE: Final = "schedule"
#: most scheduled rotations one gateway runs at once
MAX_CONCURRENT_RUNS: Final = 4
#: the longest interval a schedule may have (about ten years)
MAX_INTERVAL_SECONDS: Final = 3660 * 86400


def presence_lease(gateway_id: str) -> str:
    return PRESENCE_LEASE_PREFIX + gateway_id


@dataclass(frozen=True, slots=True)
class ScheduledRotation:
    """An account's schedule as the scheduler reads it."""

    resource: str
    account: str
    interval_seconds: int
    next_at: datetime
    #: scheduled attempts failed in a row (0 after one that worked)
    failures: int


@dataclass(frozen=True, slots=True)
class SchedulePlan:
    """When the next rotation is due; ``draw`` is a number in [0, 1)."""

    jitter_fraction: float = 0.05
    retry_first_delay: float = 60.0
    retry_factor: float = 2.0

    def after_success(self, ended_at: datetime, interval_seconds: int, draw: float) -> datetime:
        """One interval after *ended_at*, plus up to ``jitter_fraction`` of it."""
        wait = interval_seconds * (1 + self.jitter_fraction * draw)
        return ended_at + timedelta(seconds=wait)

    def retry_delay(self, failures: int, interval_seconds: int, draw: float) -> float:
        """Seconds to wait after the *failures*-th failure in a row (1, 2, ...):
        the backoff with its jitter, never more than the interval."""
        delay = self.retry_first_delay
        for _ in range(max(failures, 1) - 1):
            if delay >= interval_seconds or self.retry_factor == 1:
                break  # capped below anyway; and no overflow after years of failures
            delay *= self.retry_factor
        return float(min(delay * (1 + self.jitter_fraction * draw), interval_seconds))

    def after_failure(
        self, ended_at: datetime, interval_seconds: int, failures: int, draw: float
    ) -> datetime:
        return ended_at + timedelta(seconds=self.retry_delay(failures, interval_seconds, draw))


class LeaseStore(Protocol):
    """Leases (``gateway.store.leases`` documents each)."""

    def acquire_lease(self, name: str, holder: str, seconds: float) -> bool: ...

    def release_lease(self, name: str, holder: str) -> bool: ...

    def lease_holders(self, prefix: str = "") -> dict[str, str]: ...


class ScheduleStore(Protocol):
    """Schedules (``gateway.store.schedules`` documents each)."""

    def set_rotation_schedule(
        self,
        resource: str,
        account: str,
        interval_seconds: int | None,
        next_at: datetime | None = None,
    ) -> AccountRecord: ...

    def due_rotations(self, now: datetime, limit: int = 100) -> list[ScheduledRotation]: ...

    def claim_rotation(
        self, resource: str, account: str, *, expected_next_at: datetime, next_at: datetime
    ) -> bool: ...

    def reschedule_rotation(
        self,
        resource: str,
        account: str,
        *,
        expected_next_at: datetime,
        next_at: datetime,
        failures: int,
    ) -> bool: ...

    def pending_rotations(self) -> list[PendingRotation]: ...


class SchedulerStore(LeaseStore, ScheduleStore, Protocol):
    pass


class RotationOutcome(Protocol):
    """What the scheduler reads of a rotation's result."""

    @property
    def ok(self) -> bool: ...
    @property
    def outcome(self) -> str: ...
    @property
    def ended_at(self) -> datetime: ...
    @property
    def detail(self) -> str | None: ...


class Rotate(Protocol):
    async def __call__(
        self, resource: str, account: str, *, started_by: str
    ) -> RotationOutcome: ...


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False)
class RotationScheduler:
    store: SchedulerStore
    db: StoreThread
    gateway_id: str
    #: the gateway's rotation (``Gateway.rotate``)
    rotate: Rotate
    #: settle rotations in flight, those of the gateways *gone* says are gone too
    #: (``Rotations.recover``); True when none is left
    recover: Callable[..., Coroutine[Any, Any, bool]]
    plan: SchedulePlan = field(default_factory=SchedulePlan)
    tick_seconds: float = 5.0
    lease_seconds: float = 30.0
    clock: Callable[[], datetime] = _now
    #: a number in [0, 1) for the jitter (not a secret: when, not what)
    draw: Callable[[], float] = random.random
    max_concurrent: int = MAX_CONCURRENT_RUNS
    #: the shortest interval a schedule may have
    min_interval_seconds: int = 60
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _runs: dict[tuple[str, str], asyncio.Task[None]] = field(default_factory=dict, repr=False)
    _recovery: asyncio.Task[bool] | None = field(default=None, repr=False)
    _holding: bool = False

    # --- life --------------------------------------------------------------------------

    async def start(self) -> None:
        """Tick in the background (after this gateway's presence is announced)."""
        self._task = asyncio.create_task(self._loop(), name="rotation-scheduler")

    async def close(self) -> None:
        """Stop ticking, let the runs in flight end, give the lease up."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._runs:
            await asyncio.gather(*self._runs.values(), return_exceptions=True)
        if self._recovery is not None:
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
        try:
            await self.db(self.store.release_lease, SCHEDULER_LEASE, self.gateway_id)
        except Exception as exc:  # the store is going away: the lease expires anyway
            log.warning("lease_not_released", lease=SCHEDULER_LEASE, error=repr(exc))
        if self._holding:
            log.info("rotation_scheduler_lease_released", gateway_id=self.gateway_id)
        self._holding = False

    @property
    def holds_lease(self) -> bool:
        """Whether this gateway ran the schedules at its last tick."""
        return self._holding

    # --- schedules -----------------------------------------------------------------------

    async def set_schedule(
        self, resource: str, account: str, interval_seconds: int | None
    ) -> AccountRecord:
        """Rotate *account* every *interval_seconds* from now on (first one
        interval from now, with jitter), or never again (None)."""
        if interval_seconds is None:
            return await self.db(self.store.set_rotation_schedule, resource, account, None)
        if interval_seconds < self.min_interval_seconds:
            raise InvalidRequest(
                f"a rotation schedule needs an interval of at least"
                f" {_spell(self.min_interval_seconds)}, not {_spell(interval_seconds)}",
                hint="rotate once now with --now",
            )
        if interval_seconds > MAX_INTERVAL_SECONDS:
            raise InvalidRequest(
                f"a rotation schedule's interval is at most {_spell(MAX_INTERVAL_SECONDS)}"
            )
        first = self.plan.after_success(self.clock(), interval_seconds, self.draw())
        return await self.db(
            self.store.set_rotation_schedule, resource, account, interval_seconds, first
        )

    # --- ticks ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a store failure: try again next tick, never die
                log.error("rotation_scheduler_failed", error=repr(exc))
            await asyncio.sleep(self.tick_seconds)

    async def tick(self) -> None:
        """Renew the lease; as the holder, settle what gone gateways left and
        start the due rotations."""
        holding = await self.db(
            self.store.acquire_lease, SCHEDULER_LEASE, self.gateway_id, self.lease_seconds
        )
        if holding != self._holding:
            event = (
                "rotation_scheduler_lease_acquired" if holding else "rotation_scheduler_lease_lost"
            )
            log.info(event, gateway_id=self.gateway_id)
            self._holding = holding
        if not holding:
            return
        await self._recover_abandoned()
        room = self.max_concurrent - len(self._runs)
        if room <= 0:
            return
        due = await self.db(self.store.due_rotations, self.clock(), room + len(self._runs))
        for scheduled in due:
            key = (scheduled.resource, scheduled.account)
            if key in self._runs or len(self._runs) >= self.max_concurrent:
                continue
            task = asyncio.create_task(
                self._run(scheduled), name=f"scheduled-rotation-{key[0]}-{key[1]}"
            )
            self._runs[key] = task
            task.add_done_callback(lambda _t, key=key: self._runs.pop(key, None))  # type: ignore[misc]

    async def wait_for_runs(self) -> None:
        """Until the runs started so far have ended (tests)."""
        if self._runs:
            await asyncio.gather(*self._runs.values(), return_exceptions=True)

    async def _recover_abandoned(self) -> None:
        """Settle, in the background, the rotations in flight whose gateway is gone."""
        if self._recovery is not None and not self._recovery.done():
            return
        pending = await self.db(self.store.pending_rotations)
        foreign = {p.gateway_id for p in pending if p.gateway_id not in (None, self.gateway_id)}
        if not foreign:
            return
        present = set((await self.db(self.store.lease_holders, PRESENCE_LEASE_PREFIX)).values())
        gone = foreign - present
        if not gone:
            return
        log.warning("rotations_of_gone_gateways", gateway_ids=sorted(g for g in gone if g))
        self._recovery = asyncio.create_task(
            self.recover(gone=lambda gateway_id: gateway_id in gone), name="rotation-takeover"
        )

    # --- one run -------------------------------------------------------------------------

    async def _run(self, scheduled: ScheduledRotation) -> None:
        try:
            await self._run_once(scheduled)
        except Exception as exc:  # a store failure: the claim makes it due again later
            log.error(
                "scheduled_rotation_failed",
                resource=scheduled.resource,
                account=scheduled.account,
                error=repr(exc),
            )

    async def _run_once(self, scheduled: ScheduledRotation) -> None:
        resource, account = scheduled.resource, scheduled.account
        interval = scheduled.interval_seconds
        # If this gateway dies during the run, the account is due again when a
        # failed attempt would be retried.
        claim = self.clock() + timedelta(
            seconds=self.plan.retry_delay(scheduled.failures + 1, interval, self.draw())
        )
        claimed = await self.db(
            self.store.claim_rotation,
            resource,
            account,
            expected_next_at=scheduled.next_at,
            next_at=claim,
        )
        if not claimed:
            return  # its schedule changed meanwhile
        detail: str | None
        try:
            result = await self.rotate(resource, account, started_by=STARTED_BY_SCHEDULE)
        except NotFound:
            return  # the account went, and its schedule with it
        except GatewayError as exc:  # e.g. a rotation of it already in flight
            ok, outcome, ended_at, detail = False, "not_started", self.clock(), exc.message
        else:
            ok, outcome, ended_at, detail = (
                result.ok,
                result.outcome,
                result.ended_at,
                result.detail,
            )
        failures = 0 if ok else scheduled.failures + 1
        next_at = (
            self.plan.after_success(ended_at, interval, self.draw())
            if ok
            else self.plan.after_failure(ended_at, interval, failures, self.draw())
        )
        kept = await self.db(
            self.store.reschedule_rotation,
            resource,
            account,
            expected_next_at=claim,
            next_at=next_at,
            failures=failures,
        )
        log.info(
            "scheduled_rotation_ended",
            resource=resource,
            account=account,
            outcome=outcome,
            error=detail if not ok else None,
            failures=failures,
            next_at=next_at.isoformat() if kept else None,
        )


def _spell(seconds: int) -> str:
    """``90s``, ``1m``, ``12h``, ``7d``: the largest unit that divides it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"

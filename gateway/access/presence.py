"""This gateway's presence in a store shared with other gateways, and the
recovery of the sessions of those that are gone.

Each gateway holds the lease ``gateway/<its id>`` (``gateway.store.leases``)
while it runs, renewing it every ``renew_seconds`` for ``lease_seconds``. Each
renewal is followed by a recovery pass: the open sessions of gateways whose
lease has lapsed are ended as ``gateway_crash`` at that gateway's last renewal
(``SessionStore.close_orphans``). The pass at start-up, which also ends this
gateway's own sessions left by its previous run, is the grant service's
(:meth:`~gateway.access.service.GrantService.start`), before :meth:`Presence.start`.

Invariants:

* Nothing here ends a session of a live gateway, this one's included: the store
  judges liveness by the lease, in the same transaction as the ends.
* A tick that fails (the store unreachable) is logged and the next one tried;
  the task never dies of it.
* :meth:`Presence.close` releases the lease, so a gateway that stopped cleanly
  is gone at once (its sessions were ended by its shutdown). Release it last:
  a gateway whose lease is gone while it still relays can have its sessions
  ended by another.
* A gateway that has not renewed for ``grace_seconds`` (the store unreachable,
  or too slow) refuses new connections (:meth:`Presence.refusal`, one of
  admission's gateway-wide checks) until a renewal works again; with ``strict``
  it also ends its live ones, once per outage. The time is this process's
  monotonic clock since the last renewal that worked, so a renewal stuck in the
  store thread counts as not done.
* ``after_renewal`` runs after each renewal (start-up's included): the composition
  root reports this gateway's master key ring there and follows the store's
  active version (:func:`gateway.credentials.keyring.refresh`). Its failure is
  logged and does not fail the renewal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from gateway.access.ports import StoreThread
from gateway.credentials.schedule import presence_lease
from gateway.net.relay import Termination
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason

__all__ = ["Presence", "PresenceStore"]

log = structlog.get_logger(__name__)

#: New connections while the store has been out of reach for longer than the grace.
REFUSAL = Termination(
    ConnectionEndReason.STORE_UNAVAILABLE,
    SqlState.CANNOT_CONNECT_NOW,
    "pam refuses new connections: this gateway cannot reach its store",
    hint="try again shortly, or through another gateway; check the gateway log",
)
#: Live connections, in strict mode, once the grace has passed.
CUT = Termination(
    ConnectionEndReason.STORE_UNAVAILABLE,
    SqlState.ADMIN_SHUTDOWN,
    "terminating connection because this pam gateway cannot reach its store",
    hint="reconnect through another gateway, or once this one is back",
)


def _cut_nothing(_termination: Termination) -> None:
    return None


class PresenceStore(Protocol):
    """Leases and crash recovery (``gateway.store.Store`` implements it)."""

    def acquire_lease(self, name: str, holder: str, seconds: float) -> bool: ...

    def release_lease(self, name: str, holder: str) -> bool: ...

    def close_orphans(
        self, gateway_id: str, *, starting: bool = ..., ended: list[str] | None = ...
    ) -> int: ...


@dataclass(eq=False)
class Presence:
    store: PresenceStore
    db: StoreThread
    gateway_id: str
    renew_seconds: float = 5.0
    lease_seconds: float = 15.0
    #: told the ids of the sessions a tick ended (the composition root wakes the
    #: grant roles' janitor and tells the webhooks); must not block
    on_closed: Callable[[list[str]], None] | None = None
    #: without a renewal for this long, new connections are refused
    grace_seconds: float = 15.0
    #: and live ones ended (``cut_live``: every grant's)
    strict: bool = False
    cut_live: Callable[[Termination], None] = _cut_nothing
    monotonic: Callable[[], float] = time.monotonic
    #: run after each renewal that worked (see the module docstring)
    after_renewal: Callable[[], Awaitable[object]] | None = None
    #: monotonic time of the last renewal that worked (None before the first)
    last_renewed: float | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _watch: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _reported: bool = field(default=False, init=False, repr=False)

    async def start(self) -> None:
        """Take the lease (raises if the store cannot be reached), then renew it
        and recover in the background."""
        await self._renew()
        await self._after_renewal()
        self._task = asyncio.create_task(self._loop(), name="gateway-presence")
        self._watch = asyncio.create_task(self._watch_grace(), name="gateway-presence-grace")

    async def close(self) -> None:
        """Stop renewing and give the lease up."""
        for task in (self._task, self._watch):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._watch = None
        try:
            await self.db(
                self.store.release_lease, presence_lease(self.gateway_id), self.gateway_id
            )
        except Exception as exc:  # the store is going away: the lease lapses anyway
            log.warning("presence_lease_not_released", error=repr(exc))

    async def tick(self) -> int:
        """Renew the lease, then end the sessions of gone gateways; returns how
        many were ended."""
        await self._renew()
        await self._after_renewal()
        ended: list[str] = []
        closed = await self.db(self.store.close_orphans, self.gateway_id, ended=ended)
        if closed:
            log.warning("closed_sessions_of_gone_gateways", count=closed, reason="gateway_crash")
            if self.on_closed is not None:
                self.on_closed(ended)
        return closed

    async def _after_renewal(self) -> None:
        if self.after_renewal is None:
            return
        try:
            await self.after_renewal()
        except Exception as exc:  # the lease is renewed; this is tried again next tick
            log.error("presence_after_renewal_failed", error=repr(exc))

    def _since_renewal(self) -> float:
        """Seconds since the last renewal that worked (0 before the first: start
        itself fails if the store is out of reach)."""
        age = self.lease_age()
        return 0.0 if age is None else age

    def lease_age(self) -> float | None:
        """Seconds since the last renewal that worked (None before the first)."""
        return None if self.last_renewed is None else self.monotonic() - self.last_renewed

    def is_lease_fresh(self) -> bool:
        """Whether this gateway holds its lease: renewed within ``lease_seconds``
        (past that, other gateways may take it as gone and end its sessions)."""
        age = self.lease_age()
        return age is not None and age < self.lease_seconds

    def is_out_of_reach(self) -> bool:
        """Whether the last renewal that worked is older than the grace."""
        return self._since_renewal() > self.grace_seconds

    def refusal(self) -> Termination | None:
        """Why new connections are refused for the store's sake now, if they are."""
        return REFUSAL if self.is_out_of_reach() else None

    def check_grace(self) -> None:
        """In strict mode, end every live connection once the grace has passed
        (once per outage: a renewal that works starts the count again)."""
        if not self.is_out_of_reach():
            return
        if not self._reported:
            log.error(
                "store_out_of_reach",
                gateway_id=self.gateway_id,
                seconds=round(self._since_renewal(), 1),
                strict=self.strict,
            )
            if self.strict:
                self.cut_live(CUT)
        self._reported = True

    async def _renew(self) -> None:
        # Counted from before the call: the store renews it at some point during
        # it, and a grace counted from later would run out later than the lease.
        now = self.monotonic()
        # The lease is named after its one holder: taking it always succeeds.
        await self.db(
            self.store.acquire_lease,
            presence_lease(self.gateway_id),
            self.gateway_id,
            self.lease_seconds,
        )
        if self.last_renewed is not None and now - self.last_renewed >= self.lease_seconds:
            # Other gateways may have ended this one's sessions meanwhile.
            log.error(
                "presence_lease_lapsed",
                gateway_id=self.gateway_id,
                seconds=round(now - self.last_renewed, 1),
            )
        if self._reported:
            log.info("store_in_reach_again", gateway_id=self.gateway_id)
        self.last_renewed = now
        self._reported = False

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.renew_seconds)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a store failure: try again next tick, never die
                log.error("presence_renewal_failed", error=repr(exc))

    async def _watch_grace(self) -> None:
        # Apart from the renewals: one stuck in the store thread must not hold it up.
        while True:
            await asyncio.sleep(min(self.renew_seconds, 1.0))
            self.check_grace()

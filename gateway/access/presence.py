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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from gateway.access.ports import StoreThread
from gateway.credentials.schedule import presence_lease

__all__ = ["Presence", "PresenceStore"]

log = structlog.get_logger(__name__)


class PresenceStore(Protocol):
    """Leases and crash recovery (``gateway.store.Store`` implements it)."""

    def acquire_lease(self, name: str, holder: str, seconds: float) -> bool: ...

    def release_lease(self, name: str, holder: str) -> bool: ...

    def close_orphans(self, gateway_id: str, *, starting: bool = ...) -> int: ...


@dataclass(eq=False)
class Presence:
    store: PresenceStore
    db: StoreThread
    gateway_id: str
    renew_seconds: float = 5.0
    lease_seconds: float = 15.0
    #: told how many sessions a tick ended (the composition root wakes the grant
    #: roles' janitor); must not block
    on_closed: Callable[[int], None] | None = None
    #: monotonic time of the last renewal that worked (None before the first)
    last_renewed: float | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    async def start(self) -> None:
        """Take the lease (raises if the store cannot be reached), then renew it
        and recover in the background."""
        await self._renew()
        self._task = asyncio.create_task(self._loop(), name="gateway-presence")

    async def close(self) -> None:
        """Stop renewing and give the lease up."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
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
        closed = await self.db(self.store.close_orphans, self.gateway_id)
        if closed:
            log.warning("closed_sessions_of_gone_gateways", count=closed, reason="gateway_crash")
            if self.on_closed is not None:
                self.on_closed(closed)
        return closed

    async def _renew(self) -> None:
        # The lease is named after its one holder: taking it always succeeds.
        await self.db(
            self.store.acquire_lease,
            presence_lease(self.gateway_id),
            self.gateway_id,
            self.lease_seconds,
        )
        now = time.monotonic()
        if self.last_renewed is not None and now - self.last_renewed >= self.lease_seconds:
            # Other gateways may have ended this one's sessions meanwhile.
            log.error(
                "presence_lease_lapsed",
                gateway_id=self.gateway_id,
                seconds=round(now - self.last_renewed, 1),
            )
        self.last_renewed = now

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.renew_seconds)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a store failure: try again next tick, never die
                log.error("presence_renewal_failed", error=repr(exc))

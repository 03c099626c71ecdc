"""Following the changes other gateways on the same store make.

Wires :class:`~gateway.store.changes.ChangeFeed` (PostgreSQL's notifications)
and a periodic reconcile to what this gateway holds: its grants
(:meth:`~gateway.access.service.GrantService.apply_stored`) and its cached
credentials (upstream targets, the audit's password masks).

Invariants:

* A notification and a reconcile take the same path: read the store for what
  this gateway holds, apply the difference. A notification only narrows what is
  read (one session, one principal's grants), so a lost one costs at most one
  reconcile interval.
* Changes this gateway made itself come back as notifications too; applying
  them again is a no-op (its grant is already ended or moved), and the
  credentials announcement it made is skipped by its origin.
* Each tick or notification that fails (the store unreachable) is logged, and
  the next one tried; neither task dies of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from gateway.access.ports import StoreThread
from gateway.access.service import GrantService
from gateway.store import Store
from gateway.store.changes import Change, ChangeFeed, ChangeTopic

__all__ = ["ChangeFollower"]

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class ChangeFollower:
    store: Store
    db: StoreThread
    grants: GrantService
    gateway_id: str
    #: drop the cached targets and reload the masks (this gateway only)
    refresh_credentials: Callable[[], Awaitable[None]]
    reconcile_seconds: float
    listen: bool = True
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _fingerprint: str | None = None
    #: one apply at a time: a notification and a reconcile tick do not interleave
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def start(self) -> None:
        self._fingerprint = await self.db(self.store.credentials_fingerprint)
        self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="changes-reconcile"))
        conninfo = self.store.listen_conninfo() if self.listen else None
        if conninfo is not None:
            feed = ChangeFeed(
                conninfo,
                on_change=self.changed,
                on_connected=self.reconcile,
                application_name=f"pam-changes-{self.gateway_id}",
            )
            self._tasks.append(asyncio.create_task(feed.run(), name="changes-feed"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def changed(self, change: Change) -> None:
        """Apply one announced change (what it names, read back from the store)."""
        started = time.monotonic()
        try:
            if change.kind is ChangeTopic.CREDENTIALS:
                if change.id != self.gateway_id:
                    async with self._lock:
                        await self._refresh_credentials()
            elif change.kind is ChangeTopic.SESSION:
                await self._apply(self.grants.live_ids(session_id=change.id))
            elif change.kind is ChangeTopic.HANDED:  # by a stopping gateway: to this one?
                await self._adopt([change.id])
            elif change.kind is ChangeTopic.PRINCIPAL:
                await self._apply(self.grants.live_ids(principal_id=change.id))
        except Exception as exc:  # the reconcile will catch up
            log.warning("change_not_applied", kind=change.kind, error=repr(exc))
            return
        log.debug(
            "change_applied",
            kind=change.kind,
            id=change.id,
            seconds=round(time.monotonic() - started, 4),
        )

    async def reconcile(self) -> None:
        """Read back every grant this gateway holds, build those handed to it,
        and compare the credentials' fingerprint."""
        await self._apply(self.grants.live_ids())
        await self._adopt(await self.db(self.store.tunnel_grants_held_by, self.gateway_id))
        fingerprint = await self.db(self.store.credentials_fingerprint)
        if fingerprint != self._fingerprint:
            async with self._lock:
                await self._refresh_credentials(fingerprint)

    async def _refresh_credentials(self, fingerprint: str | None = None) -> None:
        # Read before the refresh: a change landing during it moves the
        # fingerprint again, and the next reconcile refreshes once more.
        if fingerprint is None:
            fingerprint = await self.db(self.store.credentials_fingerprint)
        await self.refresh_credentials()
        self._fingerprint = fingerprint
        log.info("credentials_refreshed_from_store")

    async def _apply(self, session_ids: list[str]) -> None:
        if not session_ids:
            return
        async with self._lock:
            states = await self.db(self.store.grant_states, session_ids)
            changed = await self.grants.apply_stored(states)
        if changed:
            log.info("grants_changed_elsewhere", count=changed)

    async def _adopt(self, session_ids: list[str]) -> None:
        """Build the grants among *session_ids* the store says this gateway
        holds and it has not built yet (read only for those: a reconcile names
        every tunnel grant held here)."""
        held = set(self.grants.live_ids())
        new = [session_id for session_id in session_ids if session_id not in held]
        if not new:
            return
        states = await self.db(self.store.grant_states, new)
        mine = [
            session_id
            for session_id, state in states.items()
            if state.holder_id == self.gateway_id and state.ended_at is None
        ]
        if mine and (adopted := await self.grants.adopt(mine)):
            log.info("grants_handed_over_here", count=adopted)

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_seconds)
            try:
                await self.reconcile()
            except Exception as exc:
                log.warning("changes_reconcile_failed", error=repr(exc))

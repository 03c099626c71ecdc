"""The janitor: disables each grant role when its grant ends, drops it when due.

For every row of ``ephemeral_roles`` not finished whose grant's session has
ended (any reason: expiry, revoke, its owner, shutdown, the watchdog, a failed
start, a crash: at start every session a crash left open is ended), signed in
as the resource's rotation role, in the resource's database:

1. the role is looked up: gone -> ``gone``; not a member of the marker role, or
   its comment names another grant -> ``not_managed``, left alone;
2. once: ``ALTER ROLE ... NOLOGIN PASSWORD NULL``, ``GRANT role TO
   CURRENT_USER`` (the next steps need its privileges), then
   ``pg_terminate_backend`` of each of its backends (waiting for them);
3. from the grant's end plus ``cleanup_after``: ``REASSIGN OWNED BY role TO
   owner; DROP OWNED BY role; DROP ROLE role`` in one transaction -> ``dropped``.

Invariants:

* Each step is idempotent and settles by what the server shows, so a sweep
  cut anywhere (a crash, a shutdown's deadline) is finished by the next.
* A failure is recorded on the row (``last_error``, ``attempts``) and tried
  again after a delay that doubles from ``retry_first_delay_seconds`` up to
  ``retry_max_delay_seconds``; a broken connection leaves the rest of that
  resource's rows to the next sweep.
* Sweeps run one at a time: at start, whenever a grant with a role ends
  (:meth:`Janitor.wake`), every ``janitor_interval_seconds``, and once more at
  :meth:`Janitor.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from gateway.credentials.ephemeral import sql
from gateway.credentials.ephemeral.admin import RoleAdmin, StatementFailed
from gateway.credentials.ephemeral.ports import EphemeralRole, EphemeralRoleStore, EphemeralSettings
from gateway.credentials.ports import StoreThread
from gateway.credentials.targets import Credentials
from gateway.errors import GatewayError
from gateway.net.upstream import UpstreamConnection

__all__ = ["Janitor"]

log = structlog.get_logger(__name__)


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False)
class Janitor:
    store: EphemeralRoleStore
    db: StoreThread
    credentials: Credentials
    admin: RoleAdmin
    settings: EphemeralSettings
    #: what time it is (tests move it past a grant's ``cleanup_after``)
    clock: Callable[[], datetime] = _utc_now
    _wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _sweeping: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    def start(self) -> None:
        """Sweep now (what a crash left), then on every wake and interval."""
        self._task = asyncio.create_task(self._run(), name="grant-role-janitor")

    def wake(self) -> None:
        """Sweep soon (a grant with a role ended)."""
        self._wake.set()

    async def close(self, timeout: float | None = None) -> None:
        """Stop, then one last sweep (the grants the shutdown ended), bounded by
        *timeout* (default: three upstream connect timeouts)."""
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        limit = timeout if timeout is not None else 3 * self.settings.connect_timeout
        try:
            async with asyncio.timeout(limit):
                await self.sweep()
        except TimeoutError:
            log.warning("grant_role_janitor_cut_short", timeout_seconds=limit)
        except Exception as exc:  # shutting down: say so, never raise
            log.error("grant_role_janitor_failed", error=repr(exc))

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.sweep()
            except Exception as exc:  # a store failure: try again later, never die
                log.error("grant_role_janitor_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.janitor_interval_seconds):
                    await self._wake.wait()

    async def sweep(self) -> int:
        """Disable and drop every grant role that is due; how many were settled."""
        async with self._sweeping:
            due = await self.db(self.store.ephemeral_roles_due, self.clock())
            by_resource: dict[str, list[EphemeralRole]] = {}
            for row in due:
                by_resource.setdefault(row.resource, []).append(row)
            settled = 0
            for resource, rows in by_resource.items():
                settled += await self._sweep_resource(resource, rows)
            return settled

    async def _sweep_resource(self, resource: str, rows: Sequence[EphemeralRole]) -> int:
        settled, left = 0, list(rows)
        try:
            owner = await self.db(self.store.reassign_owner, resource)
            async with self.admin.signed_in(resource) as admin:
                while left:
                    try:
                        settled += await self._settle(admin, left[0], owner)
                    except StatementFailed as failed:
                        await self._failed(left[0], failed.detail)
                    left.pop(0)
        except GatewayError as exc:
            # No rotation role, its sign-in failed, or the connection broke:
            # what is left waits for the next try.
            for row in left:
                await self._failed(row, exc.message)
        return settled

    async def _settle(
        self, admin: UpstreamConnection, row: EphemeralRole, owner: str | None
    ) -> int:
        """Disable *row*'s role if not yet, drop it when due; 1 when finished."""
        fields = {"role": row.role, "resource": row.resource, "session_id": row.session_id}
        self.credentials.drop_grant_target(row.session_id)
        state = await self.admin.state(admin, row.role)
        now = self.clock()
        if state is None:
            await self.db(self.store.ephemeral_role_finished, row.id, outcome="gone", at=now)
            log.info("grant_role_gone", **fields)
            return 1
        if not sql.is_for_grant(state, row.session_id):
            await self.db(self.store.ephemeral_role_finished, row.id, outcome="not_managed", at=now)
            log.warning("grant_role_not_managed", comment=state.comment, **fields)
            return 1
        due_at = row.due_at() or now
        if row.disabled_at is None:
            await self.admin.must(admin, sql.disable_role_sql(row.role), "disable it")
            await self.admin.must(admin, sql.terminate_backends_sql(row.role), "end its backends")
            await self.db(self.store.ephemeral_role_disabled, row.id, at=now, drop_after=due_at)
            log.info("grant_role_disabled", drop_after=due_at.isoformat(), **fields)
        if due_at > now:
            return 0
        await self.admin.must(admin, sql.drop_role_sql(row.role, owner), "drop it")
        await self.db(self.store.ephemeral_role_finished, row.id, outcome="dropped", at=now)
        log.info("grant_role_dropped", reassigned_to=owner or "(the rotation role)", **fields)
        return 1

    async def _failed(self, row: EphemeralRole, error: str) -> None:
        delay = min(
            self.settings.retry_first_delay_seconds * 2 ** min(row.attempts, 30),
            self.settings.retry_max_delay_seconds,
        )
        retry_at = self.clock() + timedelta(seconds=delay)
        await self.db(self.store.ephemeral_role_failed, row.id, error=error, retry_at=retry_at)
        log.warning(
            "grant_role_cleanup_failed",
            role=row.role,
            resource=row.resource,
            session_id=row.session_id,
            error=error,
            attempts=row.attempts + 1,
            retry_at=retry_at.isoformat(),
        )

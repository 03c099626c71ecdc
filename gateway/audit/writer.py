"""The audit writer: one task that writes audit events to the store in batches.

Relays hand events over, as :data:`~gateway.audit.records.EventRow` tuples,
with :meth:`AuditWriter.submit` (no I/O, no await); the writer task flushes
every ``interval`` seconds or as soon as ``batch_size`` events wait. Memory
stays bounded: when more than ``max_backlog`` events wait, :meth:`wait_for_room`
makes relays pause before reading more, so a slow store slows the sessions
instead of growing a buffer or dropping records.

When a write fails the events stay queued and the writer retries. With
``fail_closed`` the owner is told at once (``on_failure``) so it can refuse new
connections and end live ones rather than let them continue unrecorded; it is
told again (``on_recovery``) once a write succeeds.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import structlog

from gateway.audit.records import EventRow

log = structlog.get_logger(__name__)

#: Writes a batch; returns how many of its events were written (the store's
#: writer mode leaves out events it cannot attribute to a session).
AppendFn = Callable[[list[EventRow]], Awaitable[int]]
Callback = Callable[[BaseException | None], Awaitable[None]]


class AuditWriter:
    def __init__(
        self,
        append: AppendFn,
        *,
        batch_size: int = 500,
        interval: float = 0.2,
        max_backlog: int = 50_000,
        retry_interval: float = 1.0,
        on_failure: Callback | None = None,
        on_recovery: Callback | None = None,
    ) -> None:
        self._append = append
        self._batch_size = batch_size
        self._interval = interval
        self._max_backlog = max_backlog
        self._retry_interval = retry_interval
        self._on_failure = on_failure
        self._on_recovery = on_recovery
        self._queue: deque[EventRow] = deque()
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._flush_requested = False
        self.failed: BaseException | None = None
        self.written = 0

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    def submit(self, events: Sequence[EventRow]) -> None:
        if not events:
            return
        self._queue.extend(events)
        self._idle.clear()
        if len(self._queue) >= self._batch_size:
            self._wakeup.set()
        if len(self._queue) > self._max_backlog:
            self._room.clear()

    @property
    def congested(self) -> bool:
        """More than ``max_backlog`` events wait to be written."""
        return not self._room.is_set()

    async def wait_for_room(self) -> None:
        await self._room.wait()

    async def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is written (bounded)."""
        self._flush_requested = True
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 10.0) -> None:
        await self.drain(timeout)
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._queue:
            log.error("audit_events_unwritten_at_shutdown", count=len(self._queue))

    async def _run(self) -> None:
        while not self._closing:
            if not self._queue:
                self._idle.set()
            timed_out = False
            try:
                async with asyncio.timeout(self._interval):
                    await self._wakeup.wait()
            except TimeoutError:
                timed_out = True
            self._wakeup.clear()
            # Full batches go at once; a partial one waits for the interval (or a
            # drain). Writing whatever piled up during the previous write would
            # keep the store busy with ever smaller batches under steady load,
            # paying the per-transaction cost for a handful of events each time.
            flush = timed_out or self._flush_requested
            self._flush_requested = False
            while len(self._queue) >= self._batch_size or (flush and self._queue):
                batch = [self._queue[i] for i in range(min(self._batch_size, len(self._queue)))]
                try:
                    written = await self._append(batch)
                except Exception as exc:
                    await self._failed(exc)
                    await asyncio.sleep(self._retry_interval)
                    continue
                if written < len(batch):
                    log.error("audit_events_unattributable", count=len(batch) - written)
                for _ in batch:
                    self._queue.popleft()
                self.written += len(batch)
                if self.failed is not None:
                    await self._recovered()
                if len(self._queue) <= self._max_backlog // 2:
                    self._room.set()

    async def _failed(self, exc: BaseException) -> None:
        first = self.failed is None
        self.failed = exc
        if first:
            log.error("audit_write_failed", error=str(exc), backlog=len(self._queue))
            if self._on_failure is not None:
                await self._on_failure(exc)

    async def _recovered(self) -> None:
        log.warning("audit_write_recovered", backlog=len(self._queue))
        self.failed = None
        if self._on_recovery is not None:
            await self._on_recovery(None)

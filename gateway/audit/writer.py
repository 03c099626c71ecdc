"""The audit writer, as the daemon sees it: the journal, its reader's progress, backpressure.

Relays append journal records (:meth:`AuditWriter.append`: one ``os.write``, no
await); a consumer reads them back off the event loop (the audit writer
process, :class:`~gateway.audit.sink.AuditSink`, or the store thread in the
in-process mode) and reports how far the store holds them
(:meth:`AuditWriter.progressed`) or that it cannot write
(:meth:`AuditWriter.failure`).

Invariants:
* Memory stays bounded and nothing is dropped: when the journal runs more than
  ``max_lag`` bytes ahead of what the store holds, :attr:`congested` is true and
  :meth:`wait_for_room` makes relays pause reading until the lag is back under
  half the bound.
* With ``fail_closed`` the owner is told at once (``on_failure``) when the
  store cannot be written, so it can refuse and cut connections rather than let
  them run unrecorded; it is told again (``on_recovery``) once a write succeeds.
* :meth:`drain` returns once everything journaled before it was called is in
  the store (bounded by its timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from gateway.audit.journal import KIND_SECRETS, Journal, encode_event
from gateway.audit.stats import WriteStats

log = structlog.get_logger(__name__)

Callback = Callable[[BaseException | None], Awaitable[None]]
#: How far the journal may run ahead of the store before relays pause: about
#: 50,000 statements (what the event backlog allowed before the journal), under a
#: second of the writer's work, so a review's bounded drain sees a burst whole
#: and a crash's replay stays short.
MAX_LAG_BYTES = 8 * 1024 * 1024
#: How often a waiting drain asks the consumer again to commit what it has.
_DRAIN_NUDGE_SECONDS = 0.5


class JournalConsumer(Protocol):
    """What reads the journal into the store (the writer process, or the store thread)."""

    async def start(self, writer: AuditWriter) -> None: ...

    def flush(self) -> None:
        """Commit what has been journaled so far without waiting for a full batch."""
        ...

    async def close(self) -> None:
        """Process everything journaled, then stop."""
        ...


class AuditWriter:
    def __init__(
        self,
        journal: Journal,
        consumer: JournalConsumer,
        *,
        max_lag: int = MAX_LAG_BYTES,
        on_failure: Callback | None = None,
        on_recovery: Callback | None = None,
    ) -> None:
        self.journal = journal
        self._consumer = consumer
        self._max_lag = max_lag
        self._on_failure = on_failure
        self._on_recovery = on_recovery
        self._room = asyncio.Event()
        self._room.set()
        self._progress = asyncio.Event()
        self.failed: BaseException | None = None
        #: bytes of this run's journal that the store holds
        self.processed = 0
        #: told what the reader wrote with each progress report that says (the
        #: daemon's metrics); must not block
        self.on_written: Callable[[WriteStats], None] | None = None

    async def start(self) -> None:
        await self._consumer.start(self)

    # --- the relays' side -------------------------------------------------------------

    def append(self, record: bytes) -> None:
        """Journal one record; raises ``OSError`` when it is not in the kernel."""
        journal = self.journal
        journal.append(record)
        if journal.journaled - self.processed > self._max_lag:
            self._room.clear()

    def secrets_changed(self) -> None:
        """Tell the reader to reload the stored passwords before what follows."""
        try:
            self.append(encode_event(KIND_SECRETS, 0, 0, None))
        except OSError as exc:
            log.error("audit_journal_write_failed", error=str(exc))

    @property
    def backlog(self) -> int:
        """Journaled bytes the store does not hold yet."""
        return self.journal.journaled - self.processed

    @property
    def congested(self) -> bool:
        """The journal is more than ``max_lag`` bytes ahead of the store."""
        return not self._room.is_set()

    async def wait_for_room(self) -> None:
        await self._room.wait()

    # --- the consumer's side ----------------------------------------------------------

    async def progressed(self, segment: int, offset: int, stats: WriteStats | None = None) -> None:
        """The store holds everything journaled up to *offset* of *segment*;
        *stats*: what was written since the last report."""
        if stats is not None and self.on_written is not None:
            self.on_written(stats)
        self.processed = max(self.processed, self.journal.processed(segment, offset))
        if self.backlog <= self._max_lag // 2:
            self._room.set()
        self._progress.set()
        self._progress = asyncio.Event()
        if self.failed is not None:
            await self._recovered()

    async def failure(self, exc: BaseException) -> None:
        first = self.failed is None
        self.failed = exc
        if first:
            log.error("audit_write_failed", error=str(exc), backlog_bytes=self.backlog)
            if self._on_failure is not None:
                await self._on_failure(exc)

    async def _recovered(self) -> None:
        log.warning("audit_write_recovered", backlog_bytes=self.backlog)
        self.failed = None
        if self._on_recovery is not None:
            await self._on_recovery(None)

    # --- syncing and stopping ---------------------------------------------------------

    async def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything journaled so far is in the store (bounded)."""
        target = self.journal.journaled
        try:
            async with asyncio.timeout(timeout):
                while self.processed < target:
                    progress = self._progress
                    self._consumer.flush()
                    try:
                        async with asyncio.timeout(_DRAIN_NUDGE_SECONDS):
                            await progress.wait()
                    except TimeoutError:
                        continue
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 10.0) -> None:
        """Flush, stop the consumer (it processes what is left), close the journal.
        What the store does not hold stays in the journal for the next start."""
        await self.drain(timeout)
        await self._consumer.close()
        self.journal.close()
        if self.backlog:
            log.error("audit_events_unwritten_at_shutdown", backlog_bytes=self.backlog)

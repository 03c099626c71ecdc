"""The refusal recorder: every refusal on record, a flood summarised.

The API and the listeners hand every :class:`~gateway.refusal.Refusal` to
:meth:`RefusalRecorder.refused` (on the event loop; it never blocks). Within an
interval (opened by the first refusal after a quiet spell, ``interval`` seconds
long) the first refusal of each (source address, reason) pair is recorded and
logged at once, with a count of 1; every further one of that pair is only
counted, and when the interval ends the pair gets one summary record and one
log line carrying the count and the first and last times of those further
refusals. 1,000 refusals from one host for one reason are two records and two
log lines; the counts of a pair's records add up to its refusals exactly.

Invariants:

* Memory is bounded: at most ``max_pairs`` pairs are tracked per interval; the
  refusals of pairs beyond that are counted in one overflow summary (source
  ``*``, reason ``overflow``). At most ``max_queued`` records wait for the
  store; beyond that they are dropped and the loss is logged with its count.
* Records are written on the store's thread (:class:`StoreThread`), never on
  the event loop, through the :class:`RefusalLog` port (the store implements it).
* :meth:`RefusalRecorder.close` ends the current interval and writes what is
  pending, so a stopping daemon loses no count.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

import structlog

from gateway.audit.ports import StoreThread
from gateway.errors import GatewayError
from gateway.refusal import Refusal, RefusalReason

__all__ = ["RefusalEntry", "RefusalLog", "RefusalRecorder"]

log = structlog.get_logger(__name__)

DEFAULT_INTERVAL_SECONDS: Final = 10.0
DEFAULT_MAX_PAIRS: Final = 1024
#: the source of the overflow summary: any address
OVERFLOW_SOURCE: Final = "*"


@dataclass(frozen=True, slots=True)
class RefusalEntry:
    """One row of the refusal record: a refusal, or a pair's summary of an interval."""

    first_at: datetime
    last_at: datetime
    place: str
    reason: str
    message: str
    source: str
    who: str | None
    session_id: str | None
    count: int


class RefusalLog(Protocol):
    """Where refusal records go (``gateway.store.Store`` implements it)."""

    def add_refusals(self, entries: Sequence[RefusalEntry]) -> int: ...


@dataclass(slots=True)
class _Tally:
    """A pair's refusals after its first, within the current interval."""

    latest: Refusal
    first_at: datetime | None = None
    count: int = 0

    def add(self, refusal: Refusal) -> None:
        if self.first_at is None:
            self.first_at = refusal.at
        self.latest = refusal
        self.count += 1

    def summary(self, *, source: str | None = None, reason: str | None = None) -> RefusalEntry:
        latest = self.latest
        return RefusalEntry(
            first_at=self.first_at or latest.at,
            last_at=latest.at,
            place=str(latest.place),
            reason=reason or str(latest.reason),
            message=latest.message,
            source=source or latest.source,
            who=latest.who,
            session_id=latest.session_id,
            count=self.count,
        )


def _entry(refusal: Refusal) -> RefusalEntry:
    return RefusalEntry(
        first_at=refusal.at,
        last_at=refusal.at,
        place=str(refusal.place),
        reason=str(refusal.reason),
        message=refusal.message,
        source=refusal.source,
        who=refusal.who,
        session_id=refusal.session_id,
        count=1,
    )


def _fields(entry: RefusalEntry) -> dict[str, Any]:
    return {
        "reason": entry.reason,
        "place": entry.place,
        "source": entry.source,
        "who": entry.who,
        "session_id": entry.session_id,
        "message": entry.message,
        "count": entry.count,
    }


class RefusalRecorder:
    """Records refusals, summarising each (source, reason) pair per interval."""

    def __init__(
        self,
        store: RefusalLog,
        db: StoreThread,
        *,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        max_pairs: int = DEFAULT_MAX_PAIRS,
        max_queued: int | None = None,
    ) -> None:
        self._store = store
        self._db = db
        self._interval = interval
        self._max_pairs = max_pairs
        self._max_queued = max_queued if max_queued is not None else 4 * max_pairs + 2
        self._pairs: dict[tuple[str, str], _Tally] = {}
        self._overflow: _Tally | None = None
        self._window: asyncio.TimerHandle | None = None
        self._queue: list[RefusalEntry] = []
        self._writer: asyncio.Task[None] | None = None
        self._dropped = 0
        #: told of every refusal as it comes (the daemon's metrics); must not block
        self.observer: Callable[[Refusal], None] | None = None

    def refused(self, refusal: Refusal) -> None:
        """Take one refusal (on the event loop): recorded now if it is its
        pair's first in this interval, else counted for the interval's summary."""
        if self.observer is not None:
            self.observer(refusal)
        key = (refusal.source, str(refusal.reason))
        tally = self._pairs.get(key)
        if tally is not None:
            tally.add(refusal)
        elif len(self._pairs) >= self._max_pairs:
            if self._overflow is None:
                self._overflow = _Tally(refusal)
            self._overflow.add(refusal)
        else:
            self._pairs[key] = _Tally(refusal)
            entry = _entry(refusal)
            log.info(refusal.event, **_fields(entry))
            self._enqueue(entry)
        if self._window is None:
            loop = asyncio.get_running_loop()
            self._window = loop.call_later(self._interval, self._end_interval)

    def _end_interval(self) -> None:
        """Summarise every pair refused again in the interval now ending."""
        self._window = None
        pairs, self._pairs = self._pairs, {}
        overflow, self._overflow = self._overflow, None
        for tally in pairs.values():
            if tally.count:
                entry = tally.summary()
                log.info("refusals_summarised", **_fields(entry))
                self._enqueue(entry)
        if overflow is not None:
            entry = overflow.summary(source=OVERFLOW_SOURCE, reason=RefusalReason.OVERFLOW)
            entry = dataclasses.replace(
                entry,
                message=f"{entry.count} refusals of more (source, reason) pairs than"
                f" the {self._max_pairs} tracked per interval",
                who=None,
                session_id=None,
            )
            log.warning("refusals_summarised", **_fields(entry))
            self._enqueue(entry)

    def _enqueue(self, entry: RefusalEntry) -> None:
        if len(self._queue) >= self._max_queued:
            # The store is not keeping up: drop, but say how many.
            self._dropped += entry.count
            return
        self._queue.append(entry)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._write(), name="refusal-recorder"
            )

    async def _write(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self._db(self._store.add_refusals, batch)
            except GatewayError as exc:
                log.error("refusal_record_failed", error=exc.message, lost=len(batch))
            if self._dropped:
                log.error("refusal_records_dropped", refusals=self._dropped)
                self._dropped = 0

    async def flush(self) -> None:
        """End the current interval now and wait until its records are written."""
        if self._window is not None:
            self._window.cancel()
        self._end_interval()
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def close(self) -> None:
        await self.flush()

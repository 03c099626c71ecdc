"""Connection records: each relayed connection's start and end, group-committed.

Invariants:
* A connection row is written before its first byte is relayed (the listener
  waits for :meth:`ConnectionRecords.start`).
* Rows are group-committed: the starts and ends that queue up while one store
  transaction runs share the next, and each caller resumes once its own change
  is committed, exactly as a store call of its own would (errors included).
* A connection's end is a fact with its own time: if the store refuses to write
  it (the state fail-closed mode cuts connections in), it is kept and written
  again until the store takes it, and before its session ends
  (:meth:`ConnectionRecords.write_unwritten_ends`), so it is never left for the
  session's end to close under another reason.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from gateway.access.ports import (
    ConnectionEnd,
    ConnectionStart,
    SessionStore,
    StartedConnection,
    StoreThread,
)
from gateway.errors import GatewayError, StoreError

log = structlog.get_logger(__name__)

#: How often connection ends the store refused are written again.
UNWRITTEN_RETRY_SECONDS = 1.0

_Outcome = asyncio.Future[StartedConnection | None]


@dataclass(eq=False)
class ConnectionRecords:
    store: SessionStore
    db: StoreThread
    #: connection starts and ends waiting for the next group commit
    _changes: list[tuple[ConnectionStart | ConnectionEnd, _Outcome]] = field(
        default_factory=list, repr=False
    )
    _writer: asyncio.Task[None] | None = None
    #: connection ends the store refused, kept with their own end time
    _unwritten_ends: list[ConnectionEnd] = field(default_factory=list, repr=False)
    _unwritten_retry: asyncio.Task[None] | None = None
    _closing: bool = False

    async def start(
        self,
        session_id: str,
        client_addr: str,
        application_name: str | None,
        *,
        backend_pid: int | None,
        started_at: datetime,
    ) -> str:
        record = await self._record(
            ConnectionStart(session_id, client_addr, application_name, backend_pid, started_at)
        )
        assert record is not None
        return record.id

    async def end(
        self,
        connection_id: str,
        *,
        reason: str,
        bytes_from_client: int,
        bytes_from_server: int,
        error: tuple[str, str] | None,
    ) -> None:
        end = ConnectionEnd(
            connection_id,
            reason,
            bytes_from_client,
            bytes_from_server,
            error[0] if error else None,
            error[1] if error else None,
            # Taken now, not when the store takes it: a refused write is retried.
            ended_at=datetime.now(UTC),
        )
        try:
            await self._record(end)
        except StoreError as exc:
            self._keep_unwritten(end, exc)

    async def write_unwritten_ends(self) -> None:
        """Try once more to write the connection ends the store refused; those it
        still refuses are kept. Called before a session ends, whose end would
        otherwise close them under its own reason and time."""
        ends, self._unwritten_ends = self._unwritten_ends, []
        if not ends:
            return
        outcomes = await asyncio.gather(
            *(self._record(end) for end in ends), return_exceptions=True
        )
        for end, outcome in zip(ends, outcomes, strict=True):
            if isinstance(outcome, StoreError):
                self._unwritten_ends.append(end)
            elif isinstance(outcome, BaseException):
                log.error(
                    "connection_end_dropped", connection_id=end.connection_id, error=repr(outcome)
                )
        if self._unwritten_ends:
            self._schedule_retry()
        else:
            log.warning("connection_ends_written", count=len(ends))

    async def close(self) -> None:
        """Let the changes being written go in, then try the kept ends once more."""
        self._closing = True
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._unwritten_retry is not None:
            self._unwritten_retry.cancel()
            await asyncio.gather(self._unwritten_retry, return_exceptions=True)
        await self.write_unwritten_ends()

    def _keep_unwritten(self, end: ConnectionEnd, exc: StoreError) -> None:
        log.error(
            "connection_end_unwritten",
            connection_id=end.connection_id,
            reason=end.reason,
            error=exc.message,
        )
        self._unwritten_ends.append(end)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._unwritten_ends and self._unwritten_retry is None and not self._closing:
            self._unwritten_retry = asyncio.create_task(
                self._retry_unwritten_ends(), name="connection-ends-retry"
            )

    async def _retry_unwritten_ends(self) -> None:
        try:
            while self._unwritten_ends:
                await asyncio.sleep(UNWRITTEN_RETRY_SECONDS)
                await self.write_unwritten_ends()
        finally:
            self._unwritten_retry = None

    async def _record(self, change: ConnectionStart | ConnectionEnd) -> StartedConnection | None:
        """Write a connection start or end, group-committed: whatever queues up
        while one store transaction runs goes into the next one, so a burst of
        connections shares transactions. Returns once this change is committed."""
        outcome: _Outcome = asyncio.get_running_loop().create_future()
        self._changes.append((change, outcome))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_changes(), name="connection-records")
        return await outcome

    async def _write_changes(self) -> None:
        try:
            while self._changes:
                batch, self._changes = self._changes, []
                try:
                    results = await self.db(self.store.record_connections, [c for c, _ in batch])
                except Exception as exc:
                    for _, outcome in batch:
                        if not outcome.done():
                            outcome.set_exception(exc)
                    continue
                for (_, outcome), result in zip(batch, results, strict=True):
                    if outcome.done():  # its connection was cancelled meanwhile
                        continue
                    if isinstance(result, GatewayError):
                        outcome.set_exception(result)
                    else:
                        outcome.set_result(result)
        finally:
            self._writer = None

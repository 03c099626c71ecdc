"""Tests of gateway.audit.writer.AuditWriter: batching, draining, failure and backpressure.

The writer's ``append`` is its only dependency; here it records the batches it is
given (the store behind it is tested in test_audit_store.py and end to end in
tests/integration/test_audit*.py).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog.testing

from gateway.audit.records import AuditEvent
from gateway.audit.writer import AuditWriter

#: Long enough that the interval never fires during a test.
NEVER = 3600.0


def _events(count: int, start: int = 0) -> list[AuditEvent]:
    return [
        AuditEvent(
            session_id="s" * 32,
            connection_id=f"{start + i:032d}",
            kind="statement",
            occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        )
        for i in range(count)
    ]


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[AuditEvent]] = []
        self.fail_with: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self, events: list[AuditEvent]) -> object:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        self.batches.append(list(events))
        return len(events)

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


async def _until(condition: object, *, steps: int = 10_000) -> None:
    """Let the writer task run until *condition()* holds (a step bound, not a clock)."""
    for _ in range(steps):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


@pytest.mark.asyncio
async def test_full_batches_go_at_once_and_a_partial_one_waits_for_drain() -> None:
    sink = Recorder()
    writer = AuditWriter(sink, batch_size=10, interval=NEVER)
    writer.start()
    try:
        events = _events(25)
        writer.submit(events)
        await _until(lambda: writer.written == 20)
        # The 5 left over are not written on their own: under steady load that
        # would turn into a stream of tiny transactions.
        for _ in range(100):
            await asyncio.sleep(0)
        assert sink.sizes == [10, 10]
        assert writer.backlog == 5
        assert await writer.drain(timeout=NEVER)
        assert sink.sizes == [10, 10, 5]
        assert [e for batch in sink.batches for e in batch] == events
    finally:
        await writer.close()


@pytest.mark.asyncio
async def test_the_interval_flushes_a_partial_batch() -> None:
    sink = Recorder()
    writer = AuditWriter(sink, batch_size=1000, interval=0.01)
    writer.start()
    try:
        writer.submit(_events(3))
        # No drain: only the interval can write these.
        await _until(lambda: writer.written == 3, steps=10**9)
        assert sink.sizes == [3]
    finally:
        await writer.close()


@pytest.mark.asyncio
async def test_a_failed_write_keeps_the_events_and_reports_failure_then_recovery() -> None:
    sink = Recorder()
    sink.fail_with = RuntimeError("database is locked")
    seen: list[BaseException | None] = []

    async def on_failure(exc: BaseException | None) -> None:
        seen.append(exc)

    async def on_recovery(exc: BaseException | None) -> None:
        seen.append(exc)

    writer = AuditWriter(
        sink,
        batch_size=2,
        interval=NEVER,
        retry_interval=0,
        on_failure=on_failure,
        on_recovery=on_recovery,
    )
    writer.start()
    try:
        events = _events(2)
        writer.submit(events)
        await _until(lambda: writer.failed is not None)
        assert writer.backlog == 2
        assert len(seen) == 1 and isinstance(seen[0], RuntimeError)
        sink.fail_with = None
        await _until(lambda: writer.written == 2)
        assert sink.batches == [events]
        assert writer.failed is None
        assert seen[1:] == [None]
    finally:
        await writer.close()


@pytest.mark.asyncio
async def test_a_backlog_over_the_limit_congests_until_it_is_written() -> None:
    sink = Recorder()
    sink.gate = asyncio.Event()
    writer = AuditWriter(sink, batch_size=4, interval=NEVER, max_backlog=6)
    writer.start()
    try:
        writer.submit(_events(6))
        assert not writer.congested
        writer.submit(_events(1, start=6))
        assert writer.congested
        room = asyncio.ensure_future(writer.wait_for_room())
        await asyncio.sleep(0)
        assert not room.done()
        sink.gate.set()
        await asyncio.wait_for(room, NEVER)
        assert not writer.congested
        assert await writer.drain(timeout=NEVER)
        assert writer.written == 7
    finally:
        await writer.close()


@pytest.mark.asyncio
async def test_events_the_store_left_out_are_logged_with_their_count() -> None:
    async def attributes_all_but_two(events: list[Any]) -> int:
        return len(events) - 2

    writer = AuditWriter(attributes_all_but_two, batch_size=5, interval=NEVER)
    writer.start()
    try:
        with structlog.testing.capture_logs() as logs:
            writer.submit(_events(5))
            await _until(lambda: writer.written == 5)
    finally:
        await writer.close()
    assert [(e["event"], e["count"]) for e in logs if e["log_level"] == "error"] == [
        ("audit_events_unattributable", 2)
    ]

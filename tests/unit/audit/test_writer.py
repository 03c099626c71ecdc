"""Tests of gateway.audit.writer.AuditWriter: the journal's backpressure, drain and failure.

The consumer that reads the journal into the store is a stand-in here that
reports progress when told to (the real ones, the writer process and the store
thread, are tested in test_sink.py, test_runtime.py and end to end in
tests/integration/test_audit*.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.audit.journal import KIND_SECRETS, Journal, SegmentReader, segment_path
from gateway.audit.writer import AuditWriter

#: Bound on every wait; not a timing check.
NEVER = 3600.0


class Consumer:
    """Reports progress only when the test says so; counts flush requests."""

    def __init__(self) -> None:
        self.writer: AuditWriter | None = None
        self.flushes = 0
        self.answer_flush = False
        self.closed = False

    async def start(self, writer: AuditWriter) -> None:
        self.writer = writer

    def flush(self) -> None:
        self.flushes += 1
        if self.answer_flush:
            assert self.writer is not None
            asyncio.get_running_loop().create_task(
                self.writer.progressed(*self.writer.journal.position)
            )

    async def close(self) -> None:
        self.closed = True


async def _writer(tmp_path: Path, **kwargs: int) -> tuple[AuditWriter, Consumer]:
    consumer = Consumer()
    writer = AuditWriter(Journal(tmp_path), consumer, **kwargs)  # type: ignore[arg-type]
    await writer.start()
    return writer, consumer


@pytest.mark.asyncio
async def test_a_journal_too_far_ahead_of_the_store_congests_until_it_catches_up(
    tmp_path: Path,
) -> None:
    writer, _ = await _writer(tmp_path, max_lag=100)
    writer.append(b"x" * 100)
    assert not writer.congested
    writer.append(b"x" * 1)
    assert writer.congested and writer.backlog == 101
    room = asyncio.ensure_future(writer.wait_for_room())
    await asyncio.sleep(0)
    assert not room.done()
    # Caught up to within the bound but not half of it: still congested.
    await writer.progressed(0, 30)
    assert writer.congested
    await writer.progressed(0, 60)
    await asyncio.wait_for(room, NEVER)
    assert not writer.congested and writer.backlog == 41


@pytest.mark.asyncio
async def test_drain_waits_until_the_store_holds_what_was_journaled(tmp_path: Path) -> None:
    writer, consumer = await _writer(tmp_path)
    writer.append(b"y" * 10)
    assert not await writer.drain(timeout=0.01)
    assert consumer.flushes >= 1
    consumer.answer_flush = True
    assert await writer.drain(timeout=NEVER)
    assert writer.backlog == 0
    await writer.close()
    assert consumer.closed


@pytest.mark.asyncio
async def test_a_failure_is_reported_once_and_recovery_when_progress_comes(
    tmp_path: Path,
) -> None:
    seen: list[BaseException | None] = []

    async def note(exc: BaseException | None) -> None:
        seen.append(exc)

    consumer = Consumer()
    writer = AuditWriter(Journal(tmp_path), consumer, on_failure=note, on_recovery=note)
    await writer.start()
    await writer.failure(RuntimeError("database is locked"))
    await writer.failure(RuntimeError("database is locked"))
    assert len(seen) == 1 and isinstance(writer.failed, RuntimeError)
    await writer.progressed(0, 0)
    assert writer.failed is None and seen[1:] == [None]


@pytest.mark.asyncio
async def test_a_change_of_the_stored_passwords_is_a_record_of_its_own(tmp_path: Path) -> None:
    writer, _ = await _writer(tmp_path)
    writer.secrets_changed()
    (record,) = SegmentReader(segment_path(tmp_path, writer.journal.run, 0)).records()
    assert (record.kind, record.connection, record.payload) == (KIND_SECRETS, 0, b"")

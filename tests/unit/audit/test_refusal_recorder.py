"""The refusal recorder against a real SQLite store on its own thread: a flood
is a handful of records and log lines whose counts add up exactly, pairs beyond
the cap share one overflow summary, and the record is append-only."""

from __future__ import annotations

import asyncio
import random
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.app.runtime import StoreThread
from gateway.audit.refusals import OVERFLOW_SOURCE, RefusalRecorder
from gateway.credentials.secretbox import SecretBox
from gateway.refusal import Refusal, RefusalPlace, RefusalReason
from gateway.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(f"sqlite:///{tmp_path / 'pam.db'}", SecretBox(secrets.token_bytes(32))) as s:
        yield s


def cancel(source: str = "127.0.0.1") -> Refusal:
    return Refusal(
        RefusalPlace.LISTENER,
        RefusalReason.UNKNOWN_CANCEL_KEY,
        "CancelRequest dropped",
        source,
        session_id="s" * 32,
        event="cancel_ignored_unknown_key",
    )


def bad_token(source: str = "127.0.0.1") -> Refusal:
    return Refusal(
        RefusalPlace.API, RefusalReason.BAD_TOKEN, "GET /v1/sessions: unknown token", source
    )


async def record(store: Store, refusals: list[Refusal], **kwargs: int) -> RefusalRecorder:
    db = StoreThread()
    recorder = RefusalRecorder(store, db, interval=3600, **kwargs)
    try:
        for refusal in refusals:
            recorder.refused(refusal)
        await recorder.flush()
    finally:
        db.shutdown()
    return recorder


@pytest.mark.asyncio
async def test_a_flood_of_one_pair_is_two_records_and_two_log_lines(store: Store) -> None:
    with capture_logs() as logs:
        await record(store, [cancel() for _ in range(1000)])
    entries = store.refusals()
    assert sorted(e.count for e in entries) == [1, 999]
    assert sum(e.count for e in entries) == 1000
    assert {(e.source, e.reason, e.place) for e in entries} == {
        ("127.0.0.1", "unknown_cancel_key", "listener")
    }
    summary = next(e for e in entries if e.count == 999)
    assert summary.first_at <= summary.last_at
    events = [line["event"] for line in logs]
    assert events == ["cancel_ignored_unknown_key", "refusals_summarised"]
    assert [line["count"] for line in logs] == [1, 999]


@pytest.mark.asyncio
async def test_interleaved_pairs_are_counted_apart_and_add_up(store: Store) -> None:
    flood = [cancel() for _ in range(1000)] + [bad_token() for _ in range(1000)]
    random.Random(13).shuffle(flood)
    with capture_logs() as logs:
        await record(store, flood)
    entries = store.refusals()
    assert len(entries) == 4
    for reason in ("unknown_cancel_key", "bad_token"):
        assert sum(e.count for e in entries if e.reason == reason) == 1000
    assert len(logs) == 4


@pytest.mark.asyncio
async def test_pairs_beyond_the_cap_share_one_overflow_summary(store: Store) -> None:
    flood = [bad_token(f"10.0.0.{i}") for i in range(10)] * 3
    await record(store, flood, max_pairs=3)
    entries = store.refusals()
    overflow = [e for e in entries if e.source == OVERFLOW_SOURCE]
    assert [(e.reason, e.count) for e in overflow] == [("overflow", 21)]
    assert sum(e.count for e in entries) == 30
    assert len(entries) == 3 + 3 + 1  # three firsts, their summaries, one overflow


@pytest.mark.asyncio
async def test_an_interval_ends_by_itself(store: Store) -> None:
    db = StoreThread()
    recorder = RefusalRecorder(store, db, interval=0.05)
    try:
        for _ in range(5):
            recorder.refused(cancel())
        for _ in range(200):  # a bounded wait for the timer, not a timing assertion
            if sum(e.count for e in await db(store.refusals)) == 5:
                break
            await asyncio.sleep(0.05)
        assert sorted(e.count for e in await db(store.refusals)) == [1, 4]
    finally:
        await recorder.close()
        db.shutdown()


@pytest.mark.asyncio
async def test_the_record_is_append_only(store: Store, tmp_path: Path) -> None:
    await record(store, [cancel()])
    with sqlite3.connect(tmp_path / "pam.db") as raw:
        for sql in ("UPDATE refusals SET count = 0", "DELETE FROM refusals"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                raw.execute(sql)

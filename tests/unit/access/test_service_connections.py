"""Connection records of the grant service: group-committed, yet each caller gets
its own outcome, after its own change is committed. A real SQLite store; no
PostgreSQL is involved (nothing is relayed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.access.connections import ConnectionRecords
from gateway.app.gateway import Gateway
from gateway.config import GatewaySettings
from gateway.credentials.secretbox import SecretBox
from gateway.errors import InvalidRequest, NotFound, StoreError
from gateway.store import Store


class CountingStore(Store):
    """A store that counts its group commits and holds each one up a little, as a
    busy store thread would, so that changes queue up behind it."""

    groups: list[int]
    #: set: every write of connection records fails, as on a full disk
    unwritable: bool = False

    def record_connections(self, changes: Any) -> Any:
        if self.unwritable:
            raise StoreError("state store error: disk full (test)")
        self.groups.append(len(changes))
        result = super().record_connections(changes)
        time.sleep(0.02)
        return result


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Gateway]:
    store = CountingStore.open(f"sqlite:///{tmp_path / 'pam.db'}", SecretBox(b"k" * 32))
    store.groups = []
    store.add_resource("db1", "127.0.0.1", 5432, "app")
    store.add_account("db1", "ro", "reader", "pw")
    service = Gateway(store, GatewaySettings(api_token_sha256="0" * 64, audit_enabled=False))
    yield service
    service.db.shutdown()
    store.close()


def _session(service: Gateway) -> str:
    return service.store.create_session(
        requester="alice",
        resource="db1",
        account="ro",
        listen_host="127.0.0.1",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    ).id


async def test_concurrent_connection_records_share_transactions_and_keep_their_outcomes(
    service: Gateway,
) -> None:
    store = service.store
    assert isinstance(store, CountingStore)
    session_id, ended_id = _session(service), _session(service)
    store.end_session(ended_id, reason="expired")
    now = datetime.now(UTC)

    async def start(n: int, session: str) -> str:
        return await service.host.record_connection_start(
            session, f"127.0.0.1:{n}", "psql", backend_pid=n, started_at=now
        )

    outcomes = await asyncio.gather(
        *(start(n, ended_id if n == 7 else session_id) for n in range(20)),
        return_exceptions=True,
    )
    refused = outcomes.pop(7)
    assert isinstance(refused, InvalidRequest) and "has ended" in refused.message
    assert all(isinstance(o, str) for o in outcomes)
    assert sum(store.groups) == 20 and len(store.groups) < 20
    records = {c.id: c for c in store.list_connections(session_id)}
    assert set(records) == set(outcomes)

    store.groups.clear()
    ends = [
        service.host.record_connection_end(
            connection_id,
            reason="client_closed",
            bytes_from_client=n,
            bytes_from_server=2 * n,
            error=None,
        )
        for n, connection_id in enumerate(outcomes)
    ]
    unknown = service.host.record_connection_end(
        "0" * 32, reason="error", bytes_from_client=0, bytes_from_server=0, error=("08P01", "x")
    )
    results = await asyncio.gather(*ends, unknown, return_exceptions=True)
    assert results[:-1] == [None] * len(outcomes)
    assert isinstance(results[-1], NotFound)
    assert len(store.groups) < len(results)
    ended = {c.id: c for c in store.list_connections(session_id)}
    for n, connection_id in enumerate(outcomes):
        record = ended[connection_id]
        assert (record.end_reason, record.bytes_from_client, record.bytes_from_server) == (
            "client_closed",
            n,
            2 * n,
        )
    assert service.records._writer is None


async def test_a_connection_end_the_store_refuses_is_written_later_with_its_own_time(
    service: Gateway,
) -> None:
    store = service.store
    assert isinstance(store, CountingStore)
    session_id = _session(service)
    connection_id = await service.host.record_connection_start(
        session_id, "127.0.0.1:1", "psql", backend_pid=1, started_at=datetime.now(UTC)
    )
    store.unwritable = True
    before = datetime.now(UTC)
    await service.host.record_connection_end(
        connection_id,
        reason="audit_unavailable",
        bytes_from_client=5,
        bytes_from_server=7,
        error=None,
    )
    after = datetime.now(UTC)
    records: ConnectionRecords = service.records
    await records.write_unwritten_ends()  # still refused: kept
    (record,) = store.list_connections(session_id)
    assert record.ended_at is None

    store.unwritable = False
    await records.write_unwritten_ends()
    (record,) = store.list_connections(session_id)
    assert (record.end_reason, record.bytes_from_client, record.bytes_from_server) == (
        "audit_unavailable",
        5,
        7,
    )
    assert record.ended_at is not None and before <= record.ended_at <= after
    if records._unwritten_retry is not None:
        await records._unwritten_retry  # finds nothing left and stops
    assert records._unwritten_ends == [] and records._unwritten_retry is None

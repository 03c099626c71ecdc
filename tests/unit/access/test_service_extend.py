"""Extensions in the grant service: checked and written one at a time per grant,
the timer rescheduled, the store's seal moved. A real SQLite store and a real
listener on a free port; no PostgreSQL is involved (nothing is relayed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.access.ports import SessionRecord
from gateway.app.gateway import Gateway
from gateway.config import GatewaySettings
from gateway.credentials.secretbox import SecretBox
from gateway.errors import InvalidRequest
from gateway.store import Store


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Gateway]:
    store = Store.open(f"sqlite:///{tmp_path / 'pam.db'}", SecretBox(b"k" * 32))
    store.add_resource("db1", "127.0.0.1", 5432, "app")
    store.add_account("db1", "ro", "reader", "pw")
    settings = GatewaySettings(
        api_token_sha256="0" * 64, audit_enabled=False, max_grant_seconds=3600
    )
    service = Gateway(store, settings)
    await service.start()
    yield service
    await service.shutdown()
    store.close()


async def _open(service: Gateway, minutes: int = 30) -> SessionRecord:
    return await service.grants.open_access(
        requester="alice", resource="db1", account="ro", duration_seconds=minutes * 60
    )


async def test_two_extensions_at_once_are_checked_one_after_the_other(service: Gateway) -> None:
    session = await _open(service)
    checked: list[int] = []

    async def authorize(_session: SessionRecord, total_seconds: int) -> None:
        checked.append(total_seconds)
        await asyncio.sleep(0)  # let the other extension run meanwhile, if it can

    outcomes = await asyncio.gather(
        *(
            service.grants.extend(session.id, by_seconds=1200, by="alice", authorize=authorize)
            for _ in range(2)
        ),
        return_exceptions=True,
    )

    extended, refused = outcomes
    assert not isinstance(extended, BaseException)
    assert extended.expires_at == session.expires_at + timedelta(minutes=20)
    assert isinstance(refused, InvalidRequest)
    assert refused.message == (
        "a grant may last at most 1h on this gateway; extended by 20m it would last 1h10m"
    )
    assert checked == [3000]
    stored = service.store.get_session(session.id)
    assert stored.expires_at == session.expires_at + timedelta(minutes=20)
    assert service.store.verify_audit(session.id) == []


async def test_a_refused_check_leaves_the_expiry_and_its_timer_as_they_were(
    service: Gateway,
) -> None:
    session = await _open(service)
    grant = service.grants._grants[session.id]
    timer = grant.expiry_task

    async def refuse(_session: SessionRecord, _total: int) -> None:
        raise InvalidRequest("no (test)")

    with pytest.raises(InvalidRequest, match=r"no \(test\)"):
        await service.grants.extend(session.id, by_seconds=60, by="alice", authorize=refuse)
    assert grant.expiry_task is timer and timer is not None and not timer.done()
    assert service.store.get_session(session.id).expires_at == session.expires_at


async def test_an_extension_restarts_the_timer_and_an_ended_grant_is_not_extended(
    service: Gateway,
) -> None:
    session = await _open(service)
    grant = service.grants._grants[session.id]
    timer = grant.expiry_task

    extended = await service.grants.extend(session.id, by_seconds=60, by="alice")

    assert grant.listener.grant.expires_at == extended.expires_at
    await asyncio.sleep(0)
    assert timer is not None and timer.cancelled()
    assert grant.expiry_task is not None and not grant.expiry_task.done()
    await service.grants.close_access(session.id)
    with pytest.raises(InvalidRequest) as refused:
        await service.grants.extend(session.id, by_seconds=60, by="alice")
    assert refused.value.message == (
        f"access session {session.id[:8]} is not live (it ended: client_ended)"
    )

"""The checks behind /readyz, each failing on its own, with what its detail says."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from gateway.app.readiness import Readiness, report
from gateway.config import GatewaySettings


class FakePresence:
    lease_seconds = 15.0

    def __init__(self, age: float | None) -> None:
        self.age = age

    def lease_age(self) -> float | None:
        return self.age

    def is_lease_fresh(self) -> bool:
        return self.age is not None and self.age < self.lease_seconds


def _audit(*, failed: Any = None, backlog: int = 0, sink_running: bool | None = True) -> Any:
    writer = SimpleNamespace(failed=failed, backlog=backlog)
    sink = None if sink_running is None else SimpleNamespace(is_running=lambda: sink_running)
    return SimpleNamespace(settings=GatewaySettings(), writer=writer, sink=sink)


async def _fine() -> None:
    return None


def _readiness(ping: Any = _fine, age: float | None = 1.0, **audit: Any) -> Readiness:
    return Readiness(ping, FakePresence(age), _audit(**audit), store_timeout=0.2)  # type: ignore[arg-type]


async def _failed(readiness: Readiness) -> dict[str, str]:
    return {c.name: c.detail for c in await readiness.checks() if not c.ok}


async def test_everything_fine_is_ready() -> None:
    body = report(await _readiness().checks())
    assert body["status"] == "ready" and body["failed"] == []


async def test_a_store_that_does_not_answer_fails_and_later_probes_share_the_stuck_ping() -> None:
    started = 0
    release = asyncio.Event()

    async def stuck() -> None:
        nonlocal started
        started += 1
        await release.wait()

    readiness = _readiness(stuck)
    assert await _failed(readiness) == {"store": "no answer within 0.2 s"}
    assert await _failed(readiness) == {"store": "no answer within 0.2 s"}
    assert started == 1
    release.set()
    await asyncio.sleep(0)
    assert await _failed(readiness) == {}
    assert started == 2


async def test_a_store_error_is_named_by_its_class_only() -> None:
    async def broken() -> None:
        raise OSError("could not connect to postgresql://admin:hunter2@db")

    assert await _failed(_readiness(broken)) == {"store": "unreachable (OSError)"}


async def test_a_lease_not_taken_or_stale_fails() -> None:
    assert await _failed(_readiness(age=None)) == {"lease": "not taken yet"}
    assert await _failed(_readiness(age=20.0)) == {
        "lease": "last renewed 20.0 s ago (the lease lasts 15 s)"
    }


async def test_the_audit_fails_on_a_write_failure_a_dead_writer_or_a_backlog_over_the_bound() -> (
    None
):
    assert await _failed(_readiness(failed=RuntimeError())) == {
        "audit": "the trail cannot be written to the store"
    }
    assert await _failed(_readiness(sink_running=False)) == {
        "audit": "the audit writer process is not running"
    }
    over = 9 * 1024 * 1024
    assert await _failed(_readiness(backlog=over)) == {
        "audit": f"backlog {over} bytes over {8 * 1024 * 1024}"
    }
    # In-process mode (no writer process): only the failure and the backlog count.
    assert await _failed(_readiness(sink_running=None)) == {}

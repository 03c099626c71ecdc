"""The audit runtime's fail-closed mode, driven through a real journal and its
in-process reader: the first failed write refuses new connections and cuts live
ones as audit_unavailable; a write that succeeds again lifts the refusal. The
store is a stand-in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from gateway.audit.records import EventRow
from gateway.audit.runtime import AuditRuntime
from gateway.config import GatewaySettings
from gateway.errors import StoreError
from gateway.net.relay import Termination
from gateway.protocol.framing import TappedMessage
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason

T = TypeVar("T")
#: Bound on every wait; not a timing check.
WAIT_SECONDS = 30.0


class FlakyStore:
    def __init__(self) -> None:
        self.failing = True
        self.written: list[EventRow] = []

    def append_audit_rows(
        self, rows: Sequence[EventRow], *, substitute_invalid: bool = False
    ) -> int:
        if self.failing:
            raise StoreError("state store error: disk full (test)")
        self.written.extend(rows)
        return len(rows)


async def inline(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


def _settings(**changes: Any) -> GatewaySettings:
    return GatewaySettings(api_token_sha256="0" * 64, **changes)


def _statement(runtime: AuditRuntime, sql: str) -> None:
    """One connection running *sql*, through its tap, as the relay would."""
    audit = runtime.connection_audit("s" * 32, "c" * 32, ())
    assert audit is not None
    audit.connection_event("connection_start", {}, now_ns=1)
    assert audit.on_client([TappedMessage(ord("Q"), sql.encode() + b"\x00")], 2) is None
    server = [TappedMessage(ord("C"), b"SELECT 1\x00"), TappedMessage(ord("Z"), b"I")]
    assert audit.on_server(server, 3) is None


async def test_fail_closed_refuses_and_cuts_until_the_trail_can_be_written_again() -> None:
    store = FlakyStore()
    cuts: list[Termination] = []
    cut = asyncio.Event()

    def cut_live(termination: Termination) -> None:
        cuts.append(termination)
        cut.set()

    runtime = AuditRuntime(store, inline, _settings(audit_fail_closed=True), cut_live=cut_live)
    await runtime.start()
    assert runtime.writer is not None and runtime.refusal() is None
    _statement(runtime, "select 1")
    async with asyncio.timeout(WAIT_SECONDS):
        await cut.wait()

    (termination,) = cuts
    assert (termination.reason, termination.sqlstate) == (
        ConnectionEndReason.AUDIT_UNAVAILABLE,
        SqlState.ADMIN_SHUTDOWN,
    )
    refusal = runtime.refusal()
    assert refusal is not None
    assert (refusal.reason, refusal.sqlstate) == (
        ConnectionEndReason.AUDIT_UNAVAILABLE,
        SqlState.CANNOT_CONNECT_NOW,
    )
    assert refusal.message == (
        "pam refuses new connections: the audit trail cannot be written (fail-closed mode)"
    )

    store.failing = False
    assert await runtime.writer.drain(timeout=WAIT_SECONDS)
    assert [(r[2], r[5]) for r in store.written] == [
        ("connection_start", None),
        ("statement", "select 1"),
    ]
    assert runtime.refusal() is None
    await runtime.close()


async def test_without_fail_closed_a_failed_write_neither_refuses_nor_cuts() -> None:
    store = FlakyStore()
    cuts: list[Termination] = []
    runtime = AuditRuntime(store, inline, _settings(), cut_live=cuts.append)
    await runtime.start()
    assert runtime.writer is not None
    _statement(runtime, "select 1")
    async with asyncio.timeout(WAIT_SECONDS):
        while runtime.writer.failed is None:
            await asyncio.sleep(0.01)
    assert (cuts, runtime.refusal()) == ([], None)
    store.failing = False
    await runtime.close()


async def test_no_tap_and_no_writer_while_the_audit_is_off() -> None:
    runtime = AuditRuntime(FlakyStore(), inline, _settings(audit_enabled=False))
    await runtime.start()
    assert runtime.writer is None
    assert runtime.connection_audit("s", "c", ("pw",)) is None
    await runtime.close()

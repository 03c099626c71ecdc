"""The audit path in isolation: microseconds per statement for each stage.

``python -m bench.audit_path`` feeds a recorded-looking stream of pgbench
select-only transactions (simple and extended protocol) through the same code
the daemon runs, one stage at a time, in this process:

* ``tap``: the statement tracker, from tapped messages to events (the event
  loop's share, minus framing);
* ``encode``: the event loop's side of handing a batch to the writer process;
* ``store``: the writer process's side: decoding the batch and
  ``Store.append_audit`` into a fresh SQLite store (validation, the hash chain,
  the INSERT and the commit).

It is a measuring aid for the figures in docs/performance.md (where the time of
a statement goes), not a test: nothing passes or fails. The full benchmark
(``python -m bench``) is the one that measures the gateway as it runs.
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.audit.pairing import StatementTracker
from gateway.audit.records import EventRow
from gateway.audit.redaction import Redactor
from gateway.audit.sink import decode_rows, encode_rows
from gateway.crypto import SecretBox
from gateway.protocol.constants import BackendType, FrontendType
from gateway.protocol.framing import TappedMessage
from gateway.store import Store

BATCH = 500


def _cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def _simple_transaction(aid: int) -> tuple[list[TappedMessage], list[TappedMessage]]:
    sql = f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"
    client = [TappedMessage(FrontendType.QUERY, _cstr(sql))]
    server = [
        TappedMessage(BackendType.COMMAND_COMPLETE, _cstr("SELECT 1"), False, 1, 12),
        TappedMessage(BackendType.READY_FOR_QUERY, b"I", False, 1, 12),
    ]
    return client, server


def _extended_transaction(aid: int) -> tuple[list[TappedMessage], list[TappedMessage]]:
    sql = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    value = str(aid).encode()
    parse = _cstr("") + _cstr(sql) + struct.pack("!h", 0)
    bind = _cstr("") + _cstr("") + struct.pack("!hhi", 0, 1, len(value)) + value
    bind += struct.pack("!hh", 1, 1)
    client = [
        TappedMessage(FrontendType.PARSE, parse),
        TappedMessage(FrontendType.BIND, bind),
        TappedMessage(FrontendType.EXECUTE, _cstr("") + struct.pack("!i", 0)),
        TappedMessage(FrontendType.SYNC, b""),
    ]
    server = [
        TappedMessage(BackendType.PARSE_COMPLETE, b"", False, 0, 0),
        TappedMessage(BackendType.COMMAND_COMPLETE, _cstr("SELECT 1"), False, 1, 12),
        TappedMessage(BackendType.READY_FOR_QUERY, b"I", False, 1, 12),
    ]
    return client, server


def _per_event(fn: Callable[[], int], repeat: int) -> float:
    """Best of *repeat* runs of *fn* (which returns how many events it handled), in µs."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        count = fn()
        best = min(best, (time.perf_counter() - start) / count * 1e6)
    return best


def _events(protocol: str, count: int) -> tuple[Callable[[], int], list[EventRow]]:
    make = _simple_transaction if protocol == "simple" else _extended_transaction
    transactions = [make(1 + i * 7919 % 1_000_000) for i in range(count)]
    produced: list[EventRow] = []

    def tap() -> int:
        produced.clear()
        tracker = StatementTracker("s" * 32, "c" * 32, redactor=Redactor.build((), ("hunter2",)))
        now = time.time_ns()
        for client, server in transactions:
            for message in client:
                tracker.client(message, now)
            for message in server:
                produced.extend(tracker.server(message, now + 50_000))
        return len(transactions)

    tap()
    return tap, list(produced)


def _store(home: Path) -> tuple[Store, str]:
    store = Store.open(f"sqlite:///{home / 'pam.db'}", SecretBox(b"k" * 32))
    store.add_resource("prod", "127.0.0.1", 5432, "appdb")
    store.add_account("prod", "ro", "app_ro", "hunter2")
    session = store.create_session(
        requester="bench",
        resource="prod",
        account="ro",
        listen_host="127.0.0.1",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    return store, session.id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_path", description=__doc__)
    parser.add_argument("--batches", type=int, default=20, help="batches of 500 per protocol")
    parser.add_argument("--repeat", type=int, default=5, help="runs per stage (best is kept)")
    args = parser.parse_args(argv)
    count = args.batches * BATCH
    print(f"µs per statement, best of {args.repeat} runs of {count:,} statements")
    print(f"{'protocol':<10}{'tap':>8}{'encode':>8}{'store':>8}{'total':>8}")
    for protocol in ("simple", "extended"):
        tap, events = _events(protocol, count)
        with tempfile.TemporaryDirectory(prefix="pam-audit-path-") as tmp:
            store, session_id = _store(Path(tmp))
            events = [(session_id, *e[1:]) for e in events]
            batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
            payloads = [encode_rows(batch) for batch in batches]

            def encode(batches: list[list[EventRow]] = batches) -> int:
                for batch in batches:
                    encode_rows(batch)
                return count

            def write(payloads: list[bytes] = payloads, store: Store = store) -> int:
                for payload in payloads:
                    store.append_audit_rows(decode_rows(payload))
                return count

            results = [_per_event(fn, args.repeat) for fn in (tap, encode, write)]
            store.close()
        cells = "".join(f"{r:8.2f}" for r in results)
        print(f"{protocol:<10}{cells}{sum(results):8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

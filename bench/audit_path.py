"""The audit path in isolation: microseconds per statement for each stage.

``python -m bench.audit_path`` feeds a recorded-looking stream of pgbench
select-only transactions (simple and extended protocol) through the same code
the daemon runs, one stage at a time, in this process:

* ``relay``: the event loop's Python work per transaction without the audit:
  both relay callbacks (framing from the headers, forwarding) with transports
  that only count what they are given, so no system call is in the figure;
* ``+audit``: the same with the audit tap, which appends one journal record per
  tapped chunk to a real journal file (so the ``os.write`` IS in the figure);
* ``journal``: the tap alone: encoding the records and writing them (the event
  loop's whole share of the audit, minus framing);
* ``pair``: the writer process's reading of that journal: decoding the records,
  the statement tracker (pairing, redaction), rows out (no store);
* ``store``: the writer process's append of those rows in batches of 500 into a
  fresh SQLite store (validation, the hash chain, the INSERT and the commit).

With ``--instructions`` each stage runs under valgrind's callgrind instead, in a
process of its own, once with one pass over the statements and once with three;
the difference per statement is the stage's instruction count, which does not
move with the machine's load (timings here move by 20 %).

It is a measuring aid for the figures in docs/performance.md (where the time of
a statement goes), not a test: nothing passes or fails. The full benchmark
(``python -m bench``) is the one that measures the gateway as it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.audit.journal import Journal, checkpoint_path
from gateway.audit.pairing import StatementTracker
from gateway.audit.records import EventRow
from gateway.audit.redaction import Redactor
from gateway.audit.replay import JournalProcessor, TrackerSettings
from gateway.audit.tap import ConnectionAudit
from gateway.audit.writer import AuditWriter
from gateway.credentials.secretbox import SecretBox
from gateway.net.relay import Relay
from gateway.protocol.constants import BackendType, FrontendType
from gateway.protocol.framing import TappedMessage
from gateway.protocol.messages import encode_message
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


def statement_events(protocol: str, count: int) -> tuple[Callable[[], int], list[EventRow]]:
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


class _Transport:
    """Takes what the relay writes and forgets it: no system call in the figure."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class _Stream:
    def __init__(self, transport: _Transport) -> None:
        self.transport = transport


def _server_reply(protocol: str, aid: int) -> bytes:
    """What PostgreSQL answers to one pgbench select-only transaction."""
    column = b"abalance\x00" + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0)
    value = str(aid % 100_000).encode()
    reply = b"" if protocol == "simple" else encode_message(BackendType.PARSE_COMPLETE, b"")
    if protocol != "simple":
        reply += encode_message(BackendType.BIND_COMPLETE, b"")
    reply += encode_message(BackendType.ROW_DESCRIPTION, struct.pack("!h", 1) + column)
    reply += encode_message(BackendType.DATA_ROW, struct.pack("!hi", 1, len(value)) + value)
    reply += encode_message(BackendType.COMMAND_COMPLETE, _cstr("SELECT 1"))
    return reply + encode_message(BackendType.READY_FOR_QUERY, b"I")


class _NoConsumer:
    """The journal's reader, absent: the loop's side is measured alone."""

    async def start(self, writer: AuditWriter) -> None: ...

    def flush(self) -> None: ...

    async def close(self) -> None: ...


class _Discard:
    """A store that takes rows and keeps nothing (the ``pair`` stage has no store)."""

    def __init__(self) -> None:
        self.rows = 0

    def append_audit_rows(self, rows: list[EventRow], *, substitute_invalid: bool = False) -> int:
        self.rows += len(rows)
        return len(rows)


def _tap(directory: Path) -> ConnectionAudit:
    """A connection's tap journaling into a new run in *directory*."""
    writer = AuditWriter(Journal(directory), _NoConsumer())
    audit = ConnectionAudit(writer, "s" * 32, "c" * 32)
    audit.connection_event("connection_start", {"user": "bench"}, now_ns=time.time_ns())
    return audit


def _journal(
    protocol: str, count: int, directory: Path
) -> tuple[Callable[[], int], Callable[[], int]]:
    """The ``journal`` stage (the tap writing records) and the ``pair`` stage
    (reading back the last run the journal stage wrote)."""
    make = _simple_transaction if protocol == "simple" else _extended_transaction
    transactions = [make(1 + i * 7919 % 1_000_000) for i in range(count)]
    runs: list[str] = []

    def journal() -> int:
        audit = _tap(directory)
        runs.append(audit._writer.journal.run)
        now = time.time_ns()
        for client, server in transactions:
            audit.on_client(client, now)
            audit.on_server(server, now + 50_000)
        audit.connection_event("connection_end", {}, now_ns=now + 60_000)
        return count

    def pair() -> int:
        store = _Discard()
        # From the start of the run each time: a previous pass left its checkpoint.
        checkpoint_path(directory, runs[-1]).unlink(missing_ok=True)
        processor = JournalProcessor(
            directory, runs[-1], store, TrackerSettings(), lambda: ("hunter2",)
        )
        # Checkpoints and commits as the writer process makes them, minus the store.
        processor.poll(flush=True)
        assert store.rows >= count
        return count

    journal()
    return journal, pair


def _relay(protocol: str, count: int, *, audit: Path | None) -> Callable[[], int]:
    make = _simple_transaction if protocol == "simple" else _extended_transaction
    chunks = []
    for i in range(count):
        client, _ = make(1 + i * 7919 % 1_000_000)
        request = b"".join(encode_message(m.type, m.body) for m in client)
        chunks.append((request, _server_reply(protocol, i)))

    def run() -> int:
        relay = Relay(
            None,  # type: ignore[arg-type]
            _Stream(_Transport()),  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            _Stream(_Transport()),  # type: ignore[arg-type]
            name="bench",
            audit=_tap(audit) if audit is not None else None,
        )
        for request, reply in chunks:
            relay._on_client_data(request)
            relay._on_server_data(reply)
        return count

    return run


def bench_store(home: Path) -> tuple[Store, str]:
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


STAGES = ("relay", "+audit", "journal", "pair", "store")


@contextlib.contextmanager
def _stages(protocol: str, count: int) -> Iterator[dict[str, Callable[[], int]]]:
    """Each stage as a function that handles *count* statements once per call."""
    _, events = statement_events(protocol, count)
    with tempfile.TemporaryDirectory(prefix="pam-audit-path-") as tmp:
        store, session_id = bench_store(Path(tmp))
        events = [(session_id, *e[1:]) for e in events]
        batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
        journal, pair = _journal(protocol, count, Path(tmp) / "journal")

        def write() -> int:
            for batch in batches:
                store.append_audit_rows(batch)
            return count

        try:
            yield {
                "relay": _relay(protocol, count, audit=None),
                "+audit": _relay(protocol, count, audit=Path(tmp) / "relay-journal"),
                "journal": journal,
                "pair": pair,
                "store": write,
            }
        finally:
            store.close()


def _instructions(protocol: str, stage: str, count: int) -> float:
    """Instructions per statement of one stage, counted by callgrind: the same
    program run once with one call of the stage and once with three, so that
    start-up, imports and set-up cancel out."""
    totals = []
    for calls in (1, 3):
        with tempfile.TemporaryDirectory(prefix="pam-callgrind-") as tmp:
            out = Path(tmp) / "callgrind.out"
            result = subprocess.run(
                [
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={out}",
                    sys.executable,
                    "-m",
                    "bench.audit_path",
                    "--run-stage",
                    f"{protocol}:{stage}:{calls}",
                    "--batches",
                    str(count // BATCH),
                ],
                capture_output=True,
                text=True,
                # Same string hashes in both runs: dict probes then match too.
                env={**os.environ, "PYTHONHASHSEED": "0"},
                check=False,
            )
            found = re.search(r"Collected : (\d+)", result.stderr)
            if result.returncode != 0 or found is None:
                raise SystemExit(f"callgrind failed: {result.stderr.strip()[-500:]}")
            totals.append(int(found.group(1)))
    return (totals[1] - totals[0]) / (2 * count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_path", description=__doc__)
    parser.add_argument("--batches", type=int, default=20, help="batches of 500 per protocol")
    parser.add_argument("--repeat", type=int, default=5, help="runs per stage (best is kept)")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per statement under valgrind's callgrind instead of"
        " timing (repeatable on a noisy machine; slow: use --batches 2 or so)",
    )
    parser.add_argument("--run-stage", help=argparse.SUPPRESS)  # PROTOCOL:STAGE:CALLS
    args = parser.parse_args(argv)
    count = args.batches * BATCH
    if args.run_stage:
        protocol, stage, calls = args.run_stage.split(":")
        with _stages(protocol, count) as stages:
            for _ in range(int(calls)):
                stages[stage]()
        return 0
    if args.instructions:
        if shutil.which("valgrind") is None:
            raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
        print(f"instructions per statement (callgrind), {count:,} statements a call")
    else:
        print(f"µs per statement, best of {args.repeat} runs of {count:,} statements")
    print(f"{'protocol':<10}" + "".join(f"{stage:>9}" for stage in STAGES))
    for protocol in ("simple", "extended"):
        if args.instructions:
            results = [_instructions(protocol, stage, count) for stage in STAGES]
            cells = "".join(f"{r:9,.0f}" for r in results)
        else:
            with _stages(protocol, count) as stages:
                results = [_per_event(stages[stage], args.repeat) for stage in STAGES]
            cells = "".join(f"{r:9.2f}" for r in results)
        print(f"{protocol:<10}{cells}")
    print(
        "relay: the loop's Python work without audit; +audit: the same with the audit"
        " tap (framing copies, one journal record and write per tapped chunk); journal:"
        " the tap alone; pair: the writer process reading the journal into rows;"
        " store: the writer process's append of the rows"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

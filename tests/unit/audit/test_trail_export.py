"""The trail's export: records as exported, RFC 5424 messages byte for byte, the
JSON-lines file's rotation, a full queue dropping and counting, and real TCP and
TLS collectors (:class:`~gateway.testing.syslog_receiver.SyslogReceiver`) that are
down, come back, or present a certificate the CA did not sign."""

from __future__ import annotations

import itertools
import json
import os
import resource
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from pydantic import ValidationError

from gateway.audit.export import (
    Channel,
    JsonlFileSink,
    SyslogSink,
    TrailExporter,
    build_exporter,
    export_record,
    syslog_message,
)
from gateway.audit.records import AuditEvent, Parameter, event_rows
from gateway.config import GatewaySettings
from gateway.testing.net import LOOPBACK_HOST, free_port
from gateway.testing.pgtls import generate_tls_material
from gateway.testing.syslog_receiver import SyslogReceiver, parse_message, split_frames

AT = datetime(2026, 12, 6, 21, 40, 1, 123456, tzinfo=UTC)


def statement(n: int, session: str = "s1", **fields: Any) -> AuditEvent:
    return AuditEvent(
        session_id=session,
        connection_id="c1",
        kind="statement",
        occurred_at=AT,
        protocol="simple",
        sql=f"select {n}",
        status="ok",
        **fields,
    )


def records(count: int, session: str = "s1") -> list[dict[str, Any]]:
    rows = event_rows([statement(n, session) for n in range(count)])
    return [export_record(row, n + 1) for n, row in enumerate(rows)]


# --- records and messages -------------------------------------------------------------


def test_an_exported_record_holds_the_event_its_seq_and_an_iso_utc_time() -> None:
    event = statement(
        7, parameters=(Parameter(1, 23, "text", "42"), Parameter(2, None, "null", None))
    )
    record = export_record(event_rows([event])[0], 12)
    assert record["session_id"] == "s1"
    assert record["seq"] == 12
    assert record["occurred_at"] == "2026-12-06T21:40:01.123456Z"
    assert record["sql"] == "select 7"
    assert record["parameters"] == [
        {"index": 1, "type_oid": 23, "format": "text", "value": "42", "truncated": False},
        {"index": 2, "type_oid": None, "format": "null", "value": None, "truncated": False},
    ]
    assert json.loads(json.dumps(record)) == record


def test_a_syslog_message_is_rfc_5424_with_escaped_structured_data() -> None:
    record = {
        "session_id": 'a"b]c\\d',
        "seq": 3,
        "connection_id": "c1",
        "kind": "statement",
        "occurred_at": "2026-12-06T21:40:01.123456Z",
        "status": "error",
    }
    message = syslog_message(record, facility=16, app_name="pam", hostname="gw 1", procid="42")
    assert message == (
        b"<133>1 2026-12-06T21:40:01.123456Z gw1 pam 42 statement"
        b' [pam@32473 session_id="a\\"b\\]c\\\\d" seq="3" connection_id="c1"] '
        b"\xef\xbb\xbf" + json.dumps(record, separators=(",", ":")).encode()
    )
    parsed = parse_message(message)
    assert (parsed.facility, parsed.severity, parsed.msgid) == (16, 5, "statement")
    assert parsed.structured_data["pam@32473"]["session_id"] == 'a"b]c\\d'
    assert parsed.json() == record


def test_octet_counted_frames_are_split_whatever_the_chunking() -> None:
    frames = [b"<134>1 - - - - - - hello", b"<134>1 - - - - - - w\xc3\xb6rld"]
    stream = b"".join(b"%d %s" % (len(f), f) for f in frames)
    buffer, seen = bytearray(), []
    for byte in stream:
        buffer.append(byte)
        seen += split_frames(buffer)
    assert seen == frames and not buffer


# --- the file -------------------------------------------------------------------------


def test_the_jsonl_file_rotates_by_size_and_keeps_n_files(tmp_path: Path) -> None:
    path = tmp_path / "trail.jsonl"
    sink = JsonlFileSink(path, max_bytes=600, keep=2)
    sent = records(40)
    for record in sent:
        sink.send([record])
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["trail.jsonl", "trail.jsonl.1", "trail.jsonl.2"]
    lines: list[dict[str, Any]] = []
    for name in ("trail.jsonl.2", "trail.jsonl.1", "trail.jsonl"):
        text = (tmp_path / name).read_text()
        assert len(text.encode()) <= 600
        lines += [json.loads(line) for line in text.splitlines()]
    assert lines == sent[-len(lines) :]
    assert (path.stat().st_mode & 0o777) == 0o600


def _oldest_first(file: Path) -> int:
    """``trail.jsonl.N`` (the highest N first) .. ``trail.jsonl.1``, then ``trail.jsonl``."""
    rotated = file.name.removeprefix("trail.jsonl").lstrip(".")
    return -int(rotated) if rotated else 0


def test_writers_sharing_the_file_rotate_it_once_and_lose_no_line(tmp_path: Path) -> None:
    # As the audit writers of the daemon and of each relay worker do: one sink
    # each, one path, at the same time.
    path = tmp_path / "trail.jsonl"
    sessions = [f"s{n}" for n in range(4)]
    failures: list[BaseException] = []

    def write(session: str) -> None:
        sink = JsonlFileSink(path, max_bytes=4096, keep=1000)
        try:
            for record in records(300, session):
                sink.send([record])
        except BaseException as exc:  # reported below, not lost in the thread
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(s,)) for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    seen: dict[str, list[int]] = {s: [] for s in sessions}
    for file in sorted(tmp_path.iterdir(), key=_oldest_first):
        text = file.read_bytes()
        assert len(text) <= 4096, file.name
        for line in text.splitlines():
            record = json.loads(line)
            seen[record["session_id"]].append(record["seq"])
    # Every line once, each session's in order: nothing rotated twice or overwritten.
    assert seen == {s: list(range(1, 301)) for s in sessions}


# --- the queue ------------------------------------------------------------------------


class HeldSink:
    name = "held"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[list[int]] = []

    def send(self, records: Sequence[dict[str, Any]]) -> None:
        self.entered.set()
        assert self.release.wait(10)
        self.batches.append([r["seq"] for r in records])

    def close(self) -> None:
        pass


def test_a_full_queue_drops_new_records_counts_them_and_sends_the_rest_in_order() -> None:
    sink = HeldSink()
    channel = Channel(sink, queue_size=3)
    sent = records(6)
    channel.offer(sent[:1])
    assert sink.entered.wait(10)
    channel.offer(sent[1:])  # one is in flight: room for two
    assert channel.dropped == 3
    sink.release.set()
    channel.close(5)
    assert sink.batches == [[1], [2, 3]]
    assert channel.sent == 3


class GatedSink:
    """Takes a batch for each permit given (:attr:`permits`)."""

    name = "gated"

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self.entered = threading.Event()

    def send(self, records: Sequence[dict[str, Any]]) -> None:
        self.entered.set()
        assert self.permits.acquire(timeout=10)

    def close(self) -> None:
        pass


def test_each_overflow_of_a_slow_destination_is_logged_once() -> None:
    sink = GatedSink()
    channel = Channel(sink, queue_size=2)
    sent = records(8)
    with structlog.testing.capture_logs() as logs:
        for taken, (first, rest) in ((2, (sent[0:1], sent[1:4])), (4, (sent[4:5], sent[5:8]))):
            sink.entered.clear()
            channel.offer(first)
            assert sink.entered.wait(10)  # in flight alone, until a permit
            channel.offer(rest)  # room for one: two dropped
            channel.offer(rest[:1])  # one more dropped, the same overflow
            sink.permits.release(2)  # the two batches: first, then rest[0]
            assert wait_until(lambda taken=taken: channel.sent == taken)
    channel.close(5)
    dropped = [e for e in logs if e["event"] == "audit_export_dropped"]
    # Once per overflow: the destination was never down, only slow.
    assert [e["count"] for e in dropped] == [2, 2]
    assert channel.dropped == 6 and channel.sent == 4


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class DownSink:
    name = "down"

    def __init__(self) -> None:
        self.attempts: list[float] = []

    def send(self, records: Sequence[dict[str, Any]]) -> None:
        self.attempts.append(time.monotonic())
        raise ConnectionRefusedError("the collector is down")

    def close(self) -> None:
        pass


def test_a_destination_that_is_down_is_retried_after_growing_pauses_not_at_each_offer() -> None:
    sink = DownSink()
    channel = Channel(sink, queue_size=1000)
    for record in records(60):  # the journal reader committing a batch every 10 ms
        channel.offer([record])
        time.sleep(0.01)
    tried = list(sink.attempts)
    channel.close(0.1)
    gaps = [after - before for before, after in itertools.pairwise(tried)]
    assert gaps, tried
    # 0.2 s, then 0.4 s, ... (each a lower bound: a loaded machine waits longer)
    assert all(gap >= 0.2 * 2**n - 0.01 for n, gap in enumerate(gaps)), gaps
    assert channel.sent == 0


# --- syslog collectors ----------------------------------------------------------------


def test_records_reach_a_tcp_collector_once_in_order_with_session_and_seq() -> None:
    with SyslogReceiver() as receiver:
        exporter = TrailExporter([SyslogSink(LOOPBACK_HOST, receiver.port)])
        rows = event_rows([statement(n) for n in range(5)])
        exporter.publish(rows, [(n, n + 1) for n in range(5)])
        exporter.publish(rows[:1], [(0, 6)])
        messages = receiver.wait_for(6)
        exporter.close()
    assert [m.structured_data["pam@32473"]["seq"] for m in messages] == list("123456")
    assert {m.structured_data["pam@32473"]["session_id"] for m in messages} == {"s1"}
    assert [m.json()["sql"] for m in messages] == [f"select {n}" for n in range(5)] + ["select 0"]
    assert receiver.connections == 1


def test_a_collector_is_reached_from_a_descriptor_past_selects_limit() -> None:
    # A process relaying many connections (the daemon with the audit writer in
    # process) gives the collector's socket a descriptor above FD_SETSIZE (1024).
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("the descriptor limit is below 1200")
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with SyslogReceiver() as receiver:
            sink = SyslogSink(LOOPBACK_HOST, receiver.port)
            sink.send(records(1))
            assert sink._sock is not None and sink._sock.fileno() >= 1024
            sink.send(records(2)[1:])  # on the same connection, looked at first
            messages = receiver.wait_for(2)
            sink.close()
    finally:
        for fd in filler:
            os.close(fd)
    assert [m.json()["seq"] for m in messages] == [1, 2]
    assert receiver.connections == 1


def tls_receiver(tmp_path: Path) -> tuple[ssl.SSLContext, Path, Path]:
    material = generate_tls_material()
    (tmp_path / "server.pem").write_bytes(material.server_cert + material.server_key)
    (tmp_path / "ca.pem").write_bytes(material.ca_cert)
    (tmp_path / "other.pem").write_bytes(material.other_ca_cert)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "server.pem")
    return server, tmp_path / "ca.pem", tmp_path / "other.pem"


def tls_settings(port: int, ca: Path) -> GatewaySettings:
    return GatewaySettings.model_validate(
        {
            "audit_export_syslog": [
                {"host": "localhost", "port": port, "tls": True, "ca_file": str(ca)}
            ]
        }
    )


def test_records_reach_a_tls_collector_verified_against_its_ca(tmp_path: Path) -> None:
    server, ca, _ = tls_receiver(tmp_path)
    with SyslogReceiver(tls=server) as receiver:
        exporter = build_exporter(tls_settings(receiver.port, ca))
        assert exporter is not None
        exporter.publish(event_rows([statement(1)]), [(0, 1)])
        [message] = receiver.wait_for(1)
        exporter.close()
    assert message.json()["sql"] == "select 1"


def test_a_tls_collector_whose_certificate_another_ca_signed_gets_nothing(
    tmp_path: Path,
) -> None:
    server, _, other = tls_receiver(tmp_path)
    with SyslogReceiver(tls=server) as receiver:
        exporter = build_exporter(tls_settings(receiver.port, other))
        assert exporter is not None
        exporter.publish(event_rows([statement(1)]), [(0, 1)])
        with pytest.raises(AssertionError):
            receiver.wait_for(1, timeout=1.0)
        exporter.close(timeout=0.1)
        [channel] = exporter.channels
        assert channel.sent == 0


def test_a_collector_that_was_down_gets_everything_once_it_is_up() -> None:
    port = free_port()
    exporter = TrailExporter([SyslogSink(LOOPBACK_HOST, port)])
    exporter.publish(event_rows([statement(n) for n in range(3)]), [(n, n + 1) for n in range(3)])
    with SyslogReceiver(port=port) as receiver:
        messages = receiver.wait_for(3)
        exporter.close()
    assert [m.json()["seq"] for m in messages] == [1, 2, 3]


def test_a_collector_restarted_between_batches_loses_nothing() -> None:
    port = free_port()
    exporter = TrailExporter([SyslogSink(LOOPBACK_HOST, port)])
    rows = event_rows([statement(n) for n in range(4)])
    with SyslogReceiver(port=port) as first:
        exporter.publish(rows[:2], [(0, 1), (1, 2)])
        first.wait_for(2)
    with SyslogReceiver(port=port) as second:
        exporter.publish(rows[2:], [(0, 3), (1, 4)])
        messages = second.wait_for(2)
        exporter.close()
    assert [m.json()["seq"] for m in messages] == [3, 4]


def test_export_settings_are_optional_and_a_relative_file_path_is_refused() -> None:
    assert build_exporter(GatewaySettings()) is None
    with pytest.raises(ValidationError, match="absolute"):
        GatewaySettings.model_validate({"audit_export_file": {"path": "trail.jsonl"}})

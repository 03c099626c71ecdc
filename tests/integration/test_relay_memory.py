"""The relay keeps memory bounded: large messages stream through, and a slow
reader makes the gateway stop reading upstream rather than buffer."""

from __future__ import annotations

import pytest
from harness import Gateway, RawClient, current_rss_kib, peak_rss_kib, wait_for

from gateway.protocol import messages
from gateway.protocol.framing import BoundaryTracker, TappedMessage
from gateway.protocol.messages import parse_backend_key_data
from gateway.testing.pgcluster import TempCluster

pytestmark = pytest.mark.integration

MIB = 1024
#: Headroom for the daemon's growth while relaying hundreds of MB: the relay's
#: own buffers are a few hundred KB; anything near the message size means a
#: message was buffered whole.
GROWTH_LIMIT_KIB = 48 * MIB


def _stream(client: RawClient, sql: str) -> tuple[int, int, list[TappedMessage]]:
    """Send a query, read to ReadyForQuery without keeping the data; returns
    (bytes read, messages seen, the tapped E/C/Z messages)."""
    client.send(messages.encode_message(ord("Q"), sql.encode() + b"\x00"))
    tracker = BoundaryTracker(max_length=1 << 30, tap=frozenset(b"ECZ"), tap_limit=4096)
    total = 0
    tapped: list[TappedMessage] = []
    while not any(t.type == ord("Z") for t in tapped):
        chunk = client.sock.recv(1 << 20)
        assert chunk, "connection closed mid-result"
        total += len(chunk)
        tapped += tracker.feed(chunk)
    return total, tracker.messages, tapped


def _daemon_pid(gateway: Gateway) -> int:
    assert gateway.proc is not None
    return gateway.proc.pid


def test_a_200_mb_value_passes_without_the_gateway_buffering_it(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    pid = _daemon_pid(gateway)
    with RawClient(access.port, timeout=300) as client:
        client.startup("app_scram", "appdb")
        before = peak_rss_kib(pid)
        total, count, tapped = _stream(client, "select repeat('x', 200 * 1024 * 1024)")
    growth = peak_rss_kib(pid) - before
    # T + D + C + Z; the DataRow alone is 200 MB + its headers
    assert count == 4
    assert total > 200 * 1024 * 1024
    assert [t.type for t in tapped] == [ord("C"), ord("Z")]
    assert growth < GROWTH_LIMIT_KIB, f"daemon peak RSS grew by {growth} KiB"


def test_a_1_gb_copy_out_streams_with_bounded_memory(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    pid = _daemon_pid(gateway)
    rows = 1024 * 1024
    with RawClient(access.port, timeout=600) as client:
        client.startup("app_scram", "appdb")
        before = peak_rss_kib(pid)
        total, count, tapped = _stream(
            client, f"COPY (SELECT repeat('x', 1023) FROM generate_series(1, {rows})) TO STDOUT"
        )
    growth = peak_rss_kib(pid) - before
    # CopyOutResponse, one CopyData per row, CopyDone, CommandComplete, ReadyForQuery
    assert count == rows + 4
    assert total >= rows * 1024
    assert tapped[0].body == f"COPY {rows}\x00".encode()
    assert growth < GROWTH_LIMIT_KIB, f"daemon peak RSS grew by {growth} KiB"


def test_a_slow_reader_makes_the_gateway_stop_reading_upstream(
    gateway: Gateway, pg: TempCluster
) -> None:
    access = gateway.access().wait_ready()
    pid = _daemon_pid(gateway)
    with RawClient(access.port, timeout=300) as client:
        msgs = client.startup("app_scram", "appdb")
        backend = parse_backend_key_data(next(m for m in msgs if m.type == ord("K")).body).pid
        before = current_rss_kib(pid)
        sql = "COPY (SELECT repeat('y', 1023) FROM generate_series(1, 200 * 1024)) TO STDOUT"
        client.send(messages.encode_message(ord("Q"), sql.encode() + b"\x00"))
        # The client reads nothing: the server must end up blocked writing to
        # the gateway, because the gateway stopped reading from it.
        wait_for(
            lambda: (
                pg.admin_sql(f"select wait_event from pg_stat_activity where pid = {backend}")
                == "ClientWrite"
            ),
            timeout=60,
        )
        held = current_rss_kib(pid) - before
        assert held < GROWTH_LIMIT_KIB, f"daemon held {held} KiB for a stalled reader"
        tracker = BoundaryTracker(max_length=1 << 30, tap=frozenset(b"ECZ"))
        tapped: list[TappedMessage] = []
        total = 0
        while not any(t.type == ord("Z") for t in tapped):
            chunk = client.sock.recv(1 << 20)
            assert chunk
            total += len(chunk)
            tapped += tracker.feed(chunk)
        assert [t.type for t in tapped] == [ord("C"), ord("Z")]
        assert tapped[0].body == b"COPY 204800\x00"
        # Pausing and resuming lost nothing: CopyOutResponse (10 bytes), one
        # CopyData per row (1 + 4 + 1024 bytes each), CopyDone (5),
        # CommandComplete (17) and ReadyForQuery (6).
        assert tracker.messages == 204800 + 4
        assert total == 10 + 204800 * 1029 + 5 + 17 + 6

"""The idle rule (gateway.net.idle): no bytes either way and no query in flight."""

from __future__ import annotations

from gateway.durations import format_duration
from gateway.net.idle import IdleWatch
from gateway.protocol.framing import TappedMessage


def tapped(*types: str) -> list[TappedMessage]:
    return [TappedMessage(ord(t), b"", False, 0, 0) for t in types]


def test_a_silent_connection_is_idle_once_the_limit_has_passed() -> None:
    watch = IdleWatch(10.0, now=100.0)
    assert watch.due(104.0) == 6.0
    assert watch.due(110.0) is None


def test_traffic_either_way_starts_the_wait_again() -> None:
    watch = IdleWatch(10.0, now=100.0)
    watch.server_sent(tapped("A"), 107.0)  # an asynchronous NotificationResponse
    assert watch.due(110.0) == 7.0
    watch.client_sent([], 112.0)  # CopyData, say: untapped
    assert watch.due(117.0) == 5.0
    assert watch.due(122.0) is None


def test_a_query_in_flight_is_never_idle_however_long_the_server_is_silent() -> None:
    watch = IdleWatch(10.0, now=0.0)
    watch.client_sent(tapped("Q"), 1.0)
    assert watch.due(1_000.0) == 10.0
    watch.server_sent(tapped("C", "Z"), 1_000.0)
    assert watch.due(1_005.0) == 5.0
    assert watch.due(1_010.0) is None


def test_each_sync_and_function_call_waits_for_its_own_ready_for_query() -> None:
    watch = IdleWatch(10.0, now=0.0)
    # A pipeline: two Syncs and a FunctionCall, answered one at a time.
    watch.client_sent(tapped("P", "B", "E", "S", "B", "E", "S", "F"), 0.0)
    watch.server_sent(tapped("Z"), 1.0)
    watch.server_sent(tapped("Z"), 2.0)
    assert watch.due(100.0) == 10.0  # the FunctionCall still runs
    watch.server_sent(tapped("Z"), 100.0)
    assert watch.due(110.0) is None


def test_a_ready_for_query_nobody_asked_for_does_not_count() -> None:
    watch = IdleWatch(10.0, now=0.0)
    watch.server_sent(tapped("Z"), 1.0)
    watch.client_sent(tapped("Q"), 2.0)
    assert watch.awaiting == 1
    assert watch.due(50.0) == 10.0


def test_durations_read_as_pam_policy_add_takes_them() -> None:
    assert [format_duration(s) for s in (900, 5400, 45, 3600, 0)] == [
        "15m",
        "1h30m",
        "45s",
        "1h",
        "0s",
    ]

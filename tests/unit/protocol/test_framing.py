"""Byte-exact tests for gateway.protocol.framing (MessageReader, BoundaryTracker)."""

from __future__ import annotations

import struct

import pytest

from gateway.protocol.constants import MAX_STARTUP_PACKET_LENGTH, PROTOCOL_3_0
from gateway.protocol.errors import ProtocolError, ProtocolUsageError
from gateway.protocol.framing import BoundaryTracker, Message, MessageReader, TappedMessage

# Three server messages, written out by hand so the test does not trust the encoder:
# AuthenticationOk, ParameterStatus(client_encoding=UTF8), ReadyForQuery(I).
AUTH_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
PARAM_STATUS = b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"
READY = b"Z\x00\x00\x00\x05I"
STREAM = AUTH_OK + PARAM_STATUS + READY
EXPECTED = [
    Message(ord("R"), b"\x00\x00\x00\x00"),
    Message(ord("S"), b"client_encoding\x00UTF8\x00"),
    Message(ord("Z"), b"I"),
]


def drain(reader: MessageReader) -> list[Message]:
    out: list[Message] = []
    while (msg := reader.next_message()) is not None:
        out.append(msg)
    return out


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --- Message --------------------------------------------------------------------


def test_message_encode_writes_type_length_and_body() -> None:
    assert Message(ord("Z"), b"I").encode() == READY
    assert Message(ord("S"), b"client_encoding\x00UTF8\x00").encode() == PARAM_STATUS


def test_message_with_empty_body_encodes_to_five_bytes() -> None:
    assert Message(ord("X"), b"").encode() == b"X\x00\x00\x00\x04"


# --- MessageReader.next_message -------------------------------------------------


def test_reader_yields_every_message_of_a_stream_fed_whole() -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(STREAM)
    assert drain(reader) == EXPECTED
    assert reader.buffered == 0


def test_reader_yields_the_same_messages_when_fed_one_byte_at_a_time() -> None:
    reader = MessageReader(max_length=1024)
    out: list[Message] = []
    for byte in one_byte_at_a_time(STREAM):
        reader.feed(byte)
        out.extend(drain(reader))
    assert out == EXPECTED
    assert reader.buffered == 0


def test_reader_returns_none_until_the_last_body_byte_arrives() -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(READY[:-1])
    assert reader.next_message() is None
    assert reader.buffered == 5
    reader.feed(READY[-1:])
    assert reader.next_message() == Message(ord("Z"), b"I")


def test_reader_returns_none_for_a_partial_header() -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(b"Z\x00\x00\x00")
    assert reader.next_message() is None
    assert reader.buffered == 4


def test_reader_returns_an_empty_body_for_a_length_of_four() -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(b"X\x00\x00\x00\x04")
    assert reader.next_message() == Message(ord("X"), b"")
    assert reader.next_message() is None


def test_reader_returns_bodies_as_bytes_not_views() -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(READY)
    msg = reader.next_message()
    assert msg is not None
    assert type(msg.body) is bytes


def test_reader_rejects_an_oversize_length_before_the_body_arrives() -> None:
    reader = MessageReader(max_length=100)
    reader.feed(b"Q" + struct.pack("!I", 101))  # header only, no body
    with pytest.raises(ProtocolError, match="101 bytes, over the limit of 100"):
        reader.next_message()


def test_reader_accepts_a_length_equal_to_the_limit() -> None:
    reader = MessageReader(max_length=10)
    reader.feed(b"Q" + struct.pack("!I", 10) + b"select"[:6])
    assert reader.next_message() == Message(ord("Q"), b"select")


def test_reader_rejects_a_gigabyte_length_with_only_the_header_fed() -> None:
    reader = MessageReader(max_length=1 << 20)
    reader.feed(b"D\xff\xff\xff\xff")
    with pytest.raises(ProtocolError):
        reader.next_message()


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_reader_rejects_a_length_below_four(length: int) -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(b"Z" + struct.pack("!I", length))
    with pytest.raises(ProtocolError, match=f"invalid message length {length}"):
        reader.next_message()


def test_reader_keeps_working_across_many_feeds_after_compaction() -> None:
    reader = MessageReader(max_length=1024)
    out: list[Message] = []
    for _ in range(50):
        reader.feed(STREAM + READY[:3])
        out.extend(drain(reader))
        reader.feed(READY[3:])
        out.extend(drain(reader))
    assert out == [*EXPECTED, Message(ord("Z"), b"I")] * 50
    assert reader.buffered == 0


# --- MessageReader.next_startup_packet ------------------------------------------

SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
STARTUP = (
    b"\x00\x00\x00\x14"  # length 20: itself, version, two cstrings, final NUL
    + struct.pack("!I", PROTOCOL_3_0)
    + b"user\x00alice\x00\x00"
)


def test_startup_packet_body_starts_with_the_request_code() -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(SSL_REQUEST)
    assert reader.next_startup_packet(MAX_STARTUP_PACKET_LENGTH) == b"\x04\xd2\x16\x2f"
    assert reader.buffered == 0


def test_startup_packet_fed_one_byte_at_a_time_arrives_whole_once() -> None:
    reader = MessageReader(max_length=1024)
    results: list[bytes | None] = []
    for byte in one_byte_at_a_time(STARTUP):
        reader.feed(byte)
        results.append(reader.next_startup_packet(MAX_STARTUP_PACKET_LENGTH))
    assert results[:-1] == [None] * (len(STARTUP) - 1)
    assert results[-1] == b"\x00\x03\x00\x00user\x00alice\x00\x00"


def test_startup_packet_needs_four_bytes_before_it_can_decide() -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(b"\x00\x00\x00")
    assert reader.next_startup_packet(MAX_STARTUP_PACKET_LENGTH) is None


def test_a_ten_megabyte_startup_header_is_rejected_with_only_four_bytes_fed() -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(struct.pack("!I", 10 * 1024 * 1024))
    with pytest.raises(
        ProtocolError, match=r"invalid startup packet length 10485760 \(allowed 8\.\.10000\)"
    ):
        reader.next_startup_packet(MAX_STARTUP_PACKET_LENGTH)


@pytest.mark.parametrize("length", [0, 4, 7])
def test_a_startup_length_below_eight_is_rejected(length: int) -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(struct.pack("!I", length))
    with pytest.raises(ProtocolError, match=f"invalid startup packet length {length}"):
        reader.next_startup_packet(MAX_STARTUP_PACKET_LENGTH)


def test_a_startup_length_equal_to_the_limit_is_awaited_not_rejected() -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(struct.pack("!I", 64))
    assert reader.next_startup_packet(64) is None


def test_ssl_request_followed_by_early_bytes_leaves_them_for_take_remaining() -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(SSL_REQUEST + b"\x16\x03\x01")
    assert reader.next_startup_packet(MAX_STARTUP_PACKET_LENGTH) == b"\x04\xd2\x16\x2f"
    assert reader.take_remaining() == b"\x16\x03\x01"


# --- MessageReader.take_remaining ------------------------------------------------


def test_take_remaining_returns_unread_bytes_and_empties_the_reader() -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(AUTH_OK + READY[:2])
    assert reader.next_message() == Message(ord("R"), b"\x00\x00\x00\x00")
    rest = reader.take_remaining()
    assert rest == b"Z\x00"
    assert type(rest) is bytes
    assert reader.buffered == 0
    assert reader.take_remaining() == b""


def test_reader_starts_fresh_after_take_remaining() -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(b"garbage")
    assert reader.take_remaining() == b"garbage"
    reader.feed(READY)
    assert reader.next_message() == Message(ord("Z"), b"I")


# --- BoundaryTracker ------------------------------------------------------------

QUERY = b"Q\x00\x00\x00\x0dselect 1\x00"
SYNC = b"S\x00\x00\x00\x04"
TERMINATE = b"X\x00\x00\x00\x04"
CLIENT_STREAM = QUERY + SYNC + QUERY + TERMINATE


def test_tracker_is_at_a_boundary_before_any_bytes() -> None:
    tracker = BoundaryTracker(max_length=1024)
    assert tracker.at_boundary
    assert tracker.messages == 0


def test_tracker_is_at_a_boundary_after_whole_messages() -> None:
    tracker = BoundaryTracker(max_length=1024)
    assert tracker.feed(CLIENT_STREAM) == []
    assert tracker.at_boundary
    assert tracker.messages == 4


def test_tracker_is_not_at_a_boundary_in_the_middle_of_a_body() -> None:
    tracker = BoundaryTracker(max_length=1024)
    tracker.feed(QUERY[:8])
    assert not tracker.at_boundary
    assert tracker.messages == 0


def test_tracker_is_not_at_a_boundary_after_a_partial_header() -> None:
    tracker = BoundaryTracker(max_length=1024)
    tracker.feed(QUERY + SYNC[:3])
    assert not tracker.at_boundary
    assert tracker.messages == 1
    tracker.feed(SYNC[3:])
    assert tracker.at_boundary
    assert tracker.messages == 2


def test_tracker_reports_a_boundary_exactly_at_each_message_end_byte_by_byte() -> None:
    tracker = BoundaryTracker(max_length=1024)
    ends = {len(QUERY), len(QUERY + SYNC), len(QUERY + SYNC + QUERY), len(CLIENT_STREAM)}
    seen: list[int] = []
    for i, byte in enumerate(one_byte_at_a_time(CLIENT_STREAM), start=1):
        tracker.feed(byte)
        if tracker.at_boundary:
            seen.append(i)
    assert seen == sorted(ends)
    assert tracker.messages == 4


def test_tracker_returns_exact_bodies_of_tapped_types_only_in_order() -> None:
    tracker = BoundaryTracker(max_length=1024, tap=frozenset({ord("Q"), ord("X")}))
    assert tracker.feed(CLIENT_STREAM) == [
        TappedMessage(ord("Q"), b"select 1\x00"),
        TappedMessage(ord("Q"), b"select 1\x00"),
        TappedMessage(ord("X"), b""),
    ]
    assert tracker.messages == 4


def test_tracker_taps_the_same_messages_when_fed_one_byte_at_a_time() -> None:
    tracker = BoundaryTracker(max_length=1024, tap=frozenset({ord("Q")}))
    tapped: list[TappedMessage] = []
    for byte in one_byte_at_a_time(CLIENT_STREAM):
        tapped.extend(tracker.feed(byte))
    assert tapped == [
        TappedMessage(ord("Q"), b"select 1\x00", truncated=False),
        TappedMessage(ord("Q"), b"select 1\x00", truncated=False),
    ]
    assert tracker.messages == 4
    assert tracker.at_boundary


def test_tracker_returns_a_tapped_message_only_once_its_body_is_complete() -> None:
    tracker = BoundaryTracker(max_length=1024, tap=frozenset({ord("Q")}))
    assert tracker.feed(QUERY[:-1]) == []
    assert tracker.feed(QUERY[-1:]) == [TappedMessage(ord("Q"), b"select 1\x00")]


def test_tracker_truncates_a_tapped_body_over_the_tap_limit_and_flags_it() -> None:
    tracker = BoundaryTracker(max_length=1024, tap=frozenset({ord("Q")}), tap_limit=4)
    assert tracker.feed(QUERY + SYNC) == [
        TappedMessage(ord("Q"), b"sele", truncated=True),
    ]
    assert tracker.messages == 2
    assert tracker.at_boundary


def test_tracker_truncates_identically_when_fed_one_byte_at_a_time() -> None:
    tracker = BoundaryTracker(max_length=1024, tap=frozenset({ord("Q")}), tap_limit=4)
    tapped: list[TappedMessage] = []
    for byte in one_byte_at_a_time(QUERY):
        tapped.extend(tracker.feed(byte))
    assert tapped == [TappedMessage(ord("Q"), b"sele", truncated=True)]


def test_tracker_does_not_flag_a_body_exactly_at_the_tap_limit() -> None:
    tracker = BoundaryTracker(max_length=1024, tap=frozenset({ord("Q")}), tap_limit=9)
    assert tracker.feed(QUERY) == [TappedMessage(ord("Q"), b"select 1\x00", truncated=False)]


def test_tracker_accepts_bytearray_and_memoryview_input() -> None:
    tracker = BoundaryTracker(max_length=1024, tap=frozenset({ord("Q")}))
    data = bytearray(QUERY)
    assert tracker.feed(data) == [TappedMessage(ord("Q"), b"select 1\x00")]
    data += b"more"  # no view may outlive feed(), or resizing raises BufferError
    assert tracker.feed(memoryview(SYNC)) == []
    assert tracker.messages == 2


def test_tapped_bodies_are_bytes() -> None:
    tracker = BoundaryTracker(max_length=1024, tap=frozenset({ord("Q")}))
    (tapped,) = tracker.feed(bytearray(QUERY))
    assert type(tapped.body) is bytes


@pytest.mark.parametrize("length", [0, 3])
def test_tracker_rejects_a_length_below_four(length: int) -> None:
    tracker = BoundaryTracker(max_length=1024)
    with pytest.raises(ProtocolError, match=f"invalid length {length}"):
        tracker.feed(b"Q" + struct.pack("!I", length))


def test_tracker_rejects_a_length_over_its_limit_from_the_header_alone() -> None:
    tracker = BoundaryTracker(max_length=1024)
    with pytest.raises(ProtocolError, match=r"invalid length 1025 \(limit 1024\)"):
        tracker.feed(b"D" + struct.pack("!I", 1025))


def test_tracker_rejects_an_invalid_length_split_across_feeds() -> None:
    tracker = BoundaryTracker(max_length=1024)
    tracker.feed(b"D\xff")
    tracker.feed(b"\xff")
    with pytest.raises(ProtocolError):
        tracker.feed(b"\xff\xff")


# --- BoundaryTracker after a framing error --------------------------------------------------

BAD_HEADER = b"Q\x00\x00\x00\x02"  # a length below four


def test_a_bad_header_after_whole_messages_leaves_them_as_the_valid_prefix() -> None:
    tracker = BoundaryTracker(max_length=1024, tap=frozenset({ord("Q")}))
    tracker.feed(QUERY[:7])
    chunk = QUERY[7:] + SYNC + BAD_HEADER + b"rest"
    with pytest.raises(ProtocolError, match="invalid length 2"):
        tracker.feed(chunk)
    # The end of the Query and the Sync may still be forwarded; then the stream
    # stands at a boundary.
    assert tracker.valid_prefix == len(QUERY) - 7 + len(SYNC)
    assert [t.body for t in tracker.prefix_tapped] == [QUERY[5:]]
    assert tracker.at_boundary


def test_a_bad_header_at_the_start_of_a_chunk_has_an_empty_prefix_at_a_boundary() -> None:
    tracker = BoundaryTracker(max_length=1024)
    tracker.feed(QUERY)
    with pytest.raises(ProtocolError):
        tracker.feed(BAD_HEADER)
    assert tracker.valid_prefix == 0
    assert tracker.at_boundary


def test_a_bad_header_begun_in_an_earlier_chunk_is_never_a_boundary_again() -> None:
    tracker = BoundaryTracker(max_length=1024)
    tracker.feed(SYNC + BAD_HEADER[:2])  # these two bytes have gone on already
    with pytest.raises(ProtocolError):
        tracker.feed(BAD_HEADER[2:] + SYNC)
    assert tracker.valid_prefix == 0
    assert not tracker.at_boundary


def test_a_tracker_refuses_to_be_fed_after_a_framing_error() -> None:
    tracker = BoundaryTracker(max_length=1024)
    with pytest.raises(ProtocolError):
        tracker.feed(BAD_HEADER)
    with pytest.raises(ProtocolUsageError):
        tracker.feed(SYNC)

"""Property tests for the sans-IO protocol core (hypothesis).

Two properties, as the house style asks: any chunking of a valid stream gives
the same events, and random bytes give events or a ProtocolError, never any
other exception.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol import messages
from gateway.protocol.constants import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP_PACKET_LENGTH,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
)
from gateway.protocol.errors import ProtocolError
from gateway.protocol.framing import BoundaryTracker, Message, MessageReader, TappedMessage
from gateway.protocol.scram import ScramClient
from gateway.protocol.startup import parse_startup_packet

SETTINGS = settings(max_examples=200, deadline=None)

typed_messages = st.lists(
    st.builds(Message, type=st.integers(0, 255), body=st.binary(max_size=64)),
    max_size=12,
)


def chunk(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


cut_points = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=20)


# --- any chunking of a valid stream gives the same events -----------------------------


@SETTINGS
@given(msgs=typed_messages, cuts=cut_points)
def test_any_chunking_gives_the_same_messages_from_the_reader(
    msgs: list[Message], cuts: list[int]
) -> None:
    stream = b"".join(m.encode() for m in msgs)
    reader = MessageReader(max_length=1 << 16)
    out: list[Message] = []
    for piece in chunk(stream, cuts):
        reader.feed(piece)
        while (m := reader.next_message()) is not None:
            out.append(m)
    assert out == msgs
    assert reader.buffered == 0


@SETTINGS
@given(
    msgs=typed_messages,
    cuts=cut_points,
    tap=st.frozensets(st.integers(0, 255), max_size=8),
    tap_limit=st.integers(min_value=0, max_value=80),
)
def test_any_chunking_gives_the_same_taps_and_count_from_the_tracker(
    msgs: list[Message], cuts: list[int], tap: frozenset[int], tap_limit: int
) -> None:
    tap = tap | frozenset(m.type for m in msgs[::2])  # make sure something is tapped
    stream = b"".join(m.encode() for m in msgs)
    boundaries = {0}
    offset = 0
    for m in msgs:
        offset += len(m.encode())
        boundaries.add(offset)

    tracker = BoundaryTracker(max_length=1 << 16, tap=tap, tap_limit=tap_limit)
    tapped: list[TappedMessage] = []
    offset = 0
    for piece in chunk(stream, cuts):
        tapped.extend(tracker.feed(piece))
        offset += len(piece)
        assert tracker.at_boundary is (offset in boundaries)

    assert tapped == [
        TappedMessage(m.type, m.body[:tap_limit], truncated=len(m.body) > tap_limit)
        for m in msgs
        if m.type in tap
    ]
    assert tracker.messages == len(msgs)
    assert tracker.at_boundary


@SETTINGS
@given(
    params=st.dictionaries(
        st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), min_size=1, max_size=8),
        st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=8),
        max_size=5,
    ),
    cuts=cut_points,
)
def test_any_chunking_of_a_startup_message_gives_the_same_params(
    params: dict[str, str], cuts: list[int]
) -> None:
    packet = messages.startup_message(params)
    reader = MessageReader(max_length=1024)
    bodies: list[bytes] = []
    for piece in chunk(packet, cuts):
        reader.feed(piece)
        body = reader.next_startup_packet(MAX_STARTUP_PACKET_LENGTH)
        if body is not None:
            bodies.append(body)
    assert len(bodies) == 1
    parsed = parse_startup_packet(bodies[0])
    assert parsed == parse_startup_packet(packet[4:])
    assert getattr(parsed, "params", None) == params


# --- random bytes give events or ProtocolError, never another exception -----------------


def events_or_protocol_error(call: Callable[[], object]) -> None:
    with contextlib.suppress(ProtocolError):
        call()


@SETTINGS
@given(data=st.binary(max_size=200), cuts=cut_points, max_length=st.integers(0, 300))
def test_random_bytes_into_the_reader_give_messages_or_protocol_error(
    data: bytes, cuts: list[int], max_length: int
) -> None:
    reader = MessageReader(max_length=max_length)

    def run() -> None:
        for piece in chunk(data, cuts):
            reader.feed(piece)
            while (m := reader.next_message()) is not None:
                assert isinstance(m.body, bytes)
                assert len(m.body) + 4 <= max_length

    events_or_protocol_error(run)


@SETTINGS
@given(data=st.binary(max_size=200), cuts=cut_points, max_length=st.integers(0, 300))
def test_random_bytes_into_next_startup_packet_give_bodies_or_protocol_error(
    data: bytes, cuts: list[int], max_length: int
) -> None:
    reader = MessageReader(max_length=1024)

    def run() -> None:
        for piece in chunk(data, cuts):
            reader.feed(piece)
            while (body := reader.next_startup_packet(max_length)) is not None:
                assert 4 <= len(body) <= max_length - 4
                events_or_protocol_error(functools.partial(parse_startup_packet, body))

    events_or_protocol_error(run)


@SETTINGS
@given(
    data=st.binary(max_size=300),
    cuts=cut_points,
    max_length=st.integers(0, 300),
    tap=st.frozensets(st.integers(0, 255), max_size=64),
    tap_limit=st.integers(0, 40),
)
def test_random_bytes_into_the_tracker_give_taps_or_protocol_error(
    data: bytes, cuts: list[int], max_length: int, tap: frozenset[int], tap_limit: int
) -> None:
    tracker = BoundaryTracker(max_length=max_length, tap=tap, tap_limit=tap_limit)

    def run() -> None:
        for piece in chunk(data, cuts):
            for tapped in tracker.feed(piece):
                assert tapped.type in tap
                assert len(tapped.body) <= tap_limit

    events_or_protocol_error(run)


startup_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda code, rest: code.to_bytes(4, "big") + rest,
        st.sampled_from(
            [
                PROTOCOL_3_0,
                (3 << 16) | 2,
                CANCEL_REQUEST_CODE,
                SSL_REQUEST_CODE,
                GSSENC_REQUEST_CODE,
            ]
        ),
        st.binary(max_size=300),
    ),
)


@SETTINGS
@given(body=startup_bodies)
def test_random_startup_packets_give_a_packet_or_protocol_error(body: bytes) -> None:
    events_or_protocol_error(lambda: parse_startup_packet(body))


@SETTINGS
@given(body=st.binary(max_size=200))
def test_random_error_fields_give_fields_or_protocol_error(body: bytes) -> None:
    events_or_protocol_error(lambda: messages.parse_error_fields(body))


@SETTINGS
@given(body=st.binary(max_size=100))
def test_random_bodies_into_every_decoder_give_values_or_protocol_error(body: bytes) -> None:
    for decode in (
        messages.parse_authentication,
        messages.parse_sasl_mechanisms,
        messages.parse_parameter_status,
        messages.parse_backend_key_data,
        messages.parse_ready_for_query,
    ):
        events_or_protocol_error(functools.partial(decode, body))


@SETTINGS
@given(server_first=st.binary(max_size=120), server_final=st.binary(max_size=80))
def test_random_scram_server_messages_give_progress_or_protocol_error(
    server_first: bytes, server_final: bytes
) -> None:
    client = ScramClient("pencil", nonce="abc")
    client.client_first()

    def run() -> None:
        client.client_final(server_first)
        client.verify_server_final(server_final)

    events_or_protocol_error(run)

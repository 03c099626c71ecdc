"""Byte-exact tests of gateway.protocol.client_startup: the client's start as a
state machine (encryption requests, direct TLS, cancel, startup, refusals,
silent closes), fed whole and one byte at a time."""

from __future__ import annotations

import struct

import pytest

from gateway.protocol import messages
from gateway.protocol.client_startup import (
    NEED_DATA,
    TLS_ALERT_HANDSHAKE_FAILURE,
    AnswerEncryption,
    CancelRequested,
    ClientStartup,
    ClientStartupState,
    CloseSilently,
    Event,
    NeedData,
    Refuse,
    StartTLS,
    StartupReceived,
    cancel_key_length,
    effective_minor_version,
    negotiate_protocol_version,
    with_client_key,
)
from gateway.protocol.constants import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_3_0,
    PROTOCOL_3_2,
    SSL_REQUEST_CODE,
)
from gateway.protocol.errors import ProtocolUsageError
from gateway.protocol.framing import MessageReader
from gateway.protocol.messages import BackendKey, parse_error_fields
from gateway.protocol.startup import CancelRequest, StartupMessage

SSL_REQUEST = struct.pack("!II", 8, SSL_REQUEST_CODE)
GSSENC_REQUEST = struct.pack("!II", 8, GSSENC_REQUEST_CODE)
STARTUP = messages.startup_message({"user": "app", "database": "appdb"})
TERMINATE = b"X\x00\x00\x00\x04"


def events_of(machine: ClientStartup, data: bytes, *, one_byte: bool) -> list[Event]:
    """Feed ``data`` (whole or a byte at a time) and collect events until the
    machine needs data it will not get, or stops taking input."""
    chunks = [data[i : i + 1] for i in range(len(data))] if one_byte else [data]
    events: list[Event] = []
    for chunk in chunks:
        machine.receive_data(chunk)
        while machine.state is ClientStartupState.AWAITING_PACKET:
            event = machine.next_event()
            if isinstance(event, NeedData):
                break
            events.append(event)
        if machine.state is not ClientStartupState.AWAITING_PACKET:
            break
    return events


def error_of(event: Event) -> dict[str, str]:
    assert isinstance(event, Refuse)
    reader = MessageReader(max_length=1 << 16)
    reader.feed(event.data)
    message = reader.next_message()
    assert message is not None and message.type == ord("E")
    assert reader.buffered == 0
    fields = parse_error_fields(message.body)
    assert fields.sqlstate == event.sqlstate
    return {"S": fields.severity, "C": fields.sqlstate or "", "M": fields.message}


@pytest.fixture(params=[False, True], ids=["whole", "one-byte"])
def one_byte(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


# --- the StartupMessage --------------------------------------------------------------


def test_a_startup_message_is_received_and_pipelined_bytes_are_kept(one_byte: bool) -> None:
    machine = ClientStartup(tls_available=False)
    query = messages.encode_message(ord("Q"), b"select 1\x00")
    events = events_of(machine, STARTUP + query, one_byte=one_byte)
    assert events == [
        StartupReceived(StartupMessage(PROTOCOL_3_0, {"user": "app", "database": "appdb"}))
    ]
    assert machine.state is ClientStartupState.DONE
    # Fed whole, the query arrived with the startup; a byte at a time, it never did.
    assert machine.take_remaining() == (b"" if one_byte else query)


def test_a_partial_startup_needs_data_and_eof_then_closes_silently() -> None:
    machine = ClientStartup(tls_available=False)
    machine.receive_data(STARTUP[:6])
    assert machine.next_event() is NEED_DATA
    machine.receive_data(b"")
    assert machine.next_event() == CloseSilently("incomplete startup packet")
    assert machine.state is ClientStartupState.ERROR


def test_eof_before_any_byte_closes_silently() -> None:
    machine = ClientStartup(tls_available=False)
    machine.receive_data(b"")
    event = machine.next_event()
    assert isinstance(event, CloseSilently)
    assert machine.state is ClientStartupState.ERROR


# --- silence where the server is silent ------------------------------------------------


def test_terminate_before_startup_is_closed_without_a_reply(one_byte: bool) -> None:
    # node-postgres's quick-disconnect: the length word 0x58000000 cannot be a
    # startup packet; PostgreSQL logs it and sends nothing.
    machine = ClientStartup(tls_available=False)
    events = events_of(machine, TERMINATE, one_byte=one_byte)
    assert events == [CloseSilently("invalid startup packet length 1476395008 (allowed 8..10000)")]
    assert machine.state is ClientStartupState.ERROR


@pytest.mark.parametrize("length", [0, 4, 7, 10_001, 10 * 1024 * 1024])
def test_a_length_that_cannot_be_a_startup_packet_is_closed_silently_before_its_body(
    length: int,
) -> None:
    machine = ClientStartup(tls_available=False)
    machine.receive_data(struct.pack("!I", length))
    event = machine.next_event()
    assert isinstance(event, CloseSilently)
    assert f"invalid startup packet length {length}" in event.reason


@pytest.mark.parametrize("key_length", [0, 3, 257])
def test_a_malformed_cancel_request_is_closed_silently(key_length: int) -> None:
    body = struct.pack("!II", CANCEL_REQUEST_CODE, 7) + b"\x01" * key_length
    machine = ClientStartup(tls_available=False)
    events = events_of(machine, struct.pack("!I", len(body) + 4) + body, one_byte=False)
    assert events == [CloseSilently("CancelRequest has an invalid length")]


def test_a_cancel_request_is_delivered_and_ends_the_start(one_byte: bool) -> None:
    machine = ClientStartup(tls_available=True)
    events = events_of(machine, messages.cancel_request(42, b"\xaa\xbb\xcc\xdd"), one_byte=one_byte)
    assert events == [CancelRequested(CancelRequest(42, b"\xaa\xbb\xcc\xdd"))]
    assert machine.state is ClientStartupState.DONE


# --- refusals the server answers with a FATAL ---------------------------------------------


def test_protocol_2_is_refused_with_a_fatal_08p01(one_byte: bool) -> None:
    machine = ClientStartup(tls_available=False)
    [event] = events_of(machine, struct.pack("!II", 8, 2 << 16), one_byte=one_byte)
    assert error_of(event) == {
        "S": "FATAL",
        "C": "08P01",
        "M": "unsupported frontend protocol 2.0: this gateway supports protocol 3.0 and later 3.x",
    }
    assert machine.state is ClientStartupState.ERROR


def test_a_malformed_startup_message_is_refused() -> None:
    machine = ClientStartup(tls_available=False)
    [event] = events_of(machine, struct.pack("!II", 12, PROTOCOL_3_0) + b"user", one_byte=False)
    assert error_of(event)["C"] == "08P01"


@pytest.mark.parametrize("request_packet", [SSL_REQUEST, GSSENC_REQUEST], ids=["ssl", "gssenc"])
def test_bytes_after_an_encryption_request_are_refused(request_packet: bytes) -> None:
    machine = ClientStartup(tls_available=True)
    [event] = events_of(machine, request_packet + STARTUP, one_byte=False)
    assert error_of(event) == {
        "S": "FATAL",
        "C": "08P01",
        "M": "unexpected data after an encryption request",
    }


def test_a_timeout_is_refused_with_its_own_message() -> None:
    machine = ClientStartup(tls_available=False)
    assert error_of(machine.timed_out())["M"] == "timed out waiting for the startup packet"
    assert machine.state is ClientStartupState.ERROR


# --- encryption ------------------------------------------------------------------------


def test_ssl_request_without_tls_is_answered_n_and_startup_continues(one_byte: bool) -> None:
    machine = ClientStartup(tls_available=False)
    events = events_of(machine, SSL_REQUEST, one_byte=one_byte)
    assert events == [AnswerEncryption()]
    assert events[0].data == b"N"
    assert events_of(machine, STARTUP, one_byte=one_byte)[0] == StartupReceived(
        StartupMessage(PROTOCOL_3_0, {"user": "app", "database": "appdb"})
    )


def test_gssenc_request_is_answered_n_even_with_tls() -> None:
    machine = ClientStartup(tls_available=True)
    assert events_of(machine, GSSENC_REQUEST, one_byte=False) == [AnswerEncryption(b"N")]
    assert machine.state is ClientStartupState.AWAITING_PACKET


def test_ssl_request_with_tls_starts_tls_then_reads_the_startup_over_it(one_byte: bool) -> None:
    machine = ClientStartup(tls_available=True)
    events = events_of(machine, SSL_REQUEST, one_byte=one_byte)
    assert events == [StartTLS(b"S")]
    assert machine.state is ClientStartupState.AWAITING_TLS
    with pytest.raises(ProtocolUsageError):
        machine.receive_data(STARTUP)
    machine.tls_started(alpn=None)  # ALPN is optional after an SSLRequest
    assert machine.encrypted
    # A second SSLRequest over TLS is answered N, as before.
    assert events_of(machine, SSL_REQUEST, one_byte=one_byte) == [AnswerEncryption(b"N")]
    [received] = events_of(machine, STARTUP, one_byte=one_byte)
    assert isinstance(received, StartupReceived)


def test_a_peeked_client_hello_starts_direct_tls_when_tls_is_on_offer() -> None:
    machine = ClientStartup(tls_available=True)
    action = machine.first_byte_peeked(0x16)
    assert action == StartTLS(b"")
    assert action is not None and action.is_direct
    machine.tls_started(alpn="postgresql")
    [received] = events_of(machine, STARTUP, one_byte=True)
    assert isinstance(received, StartupReceived)


def test_direct_tls_without_the_postgresql_alpn_is_refused() -> None:
    machine = ClientStartup(tls_available=True)
    assert machine.first_byte_peeked(0x16) is not None
    machine.tls_started(alpn=None)
    event = machine.next_event()
    assert error_of(event)["C"] == "08P01"
    assert "ALPN" in error_of(event)["M"]
    assert machine.state is ClientStartupState.ERROR


def test_a_peeked_first_byte_of_a_startup_packet_changes_nothing() -> None:
    machine = ClientStartup(tls_available=True)
    assert machine.first_byte_peeked(STARTUP[0]) is None
    assert machine.state is ClientStartupState.AWAITING_PACKET


def test_a_client_hello_that_is_read_gets_a_tls_alert(one_byte: bool) -> None:
    machine = ClientStartup(tls_available=False)
    assert machine.first_byte_peeked(0x16) is None
    [event] = events_of(machine, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc", one_byte=one_byte)
    assert isinstance(event, Refuse)
    assert event.data == TLS_ALERT_HANDSHAKE_FAILURE


# --- misuse -----------------------------------------------------------------------------


def test_no_event_or_input_after_the_start_is_done() -> None:
    machine = ClientStartup(tls_available=False)
    events_of(machine, STARTUP, one_byte=False)
    with pytest.raises(ProtocolUsageError):
        machine.next_event()
    with pytest.raises(ProtocolUsageError):
        machine.receive_data(b"x")


def test_tls_started_without_being_asked_is_misuse() -> None:
    with pytest.raises(ProtocolUsageError):
        ClientStartup(tls_available=True).tls_started(alpn="postgresql")


def test_take_remaining_before_the_startup_is_misuse() -> None:
    with pytest.raises(ProtocolUsageError):
        ClientStartup(tls_available=False).take_remaining()


# --- protocol version negotiation and the cancel key ------------------------------------


def test_protocol_3_0_without_options_needs_no_negotiation() -> None:
    startup = StartupMessage(PROTOCOL_3_0, {"user": "u"})
    assert negotiate_protocol_version(startup) == b""
    assert cancel_key_length(effective_minor_version(startup)) == 4


def test_protocol_3_2_without_options_needs_no_negotiation_and_gets_a_32_byte_key() -> None:
    startup = StartupMessage(PROTOCOL_3_2, {"user": "u"})
    assert negotiate_protocol_version(startup) == b""
    assert cancel_key_length(effective_minor_version(startup)) == 32


def test_a_grease_version_and_options_are_negotiated_down_to_3_2() -> None:
    startup = StartupMessage((3 << 16) | 9999, {"user": "u", "_pq_.a": "1", "_pq_.b": "2"})
    assert negotiate_protocol_version(startup) == (
        b"v\x00\x00\x00\x1a\x00\x03\x00\x02\x00\x00\x00\x02_pq_.a\x00_pq_.b\x00"
    )


def test_protocol_3_1_is_negotiated_down_to_3_0() -> None:
    startup = StartupMessage((3 << 16) | 1, {"user": "u"})
    assert (
        negotiate_protocol_version(startup) == b"v\x00\x00\x00\x0c\x00\x03\x00\x00\x00\x00\x00\x00"
    )


def test_the_backend_key_is_swapped_for_the_clients_own() -> None:
    server_key = messages.backend_key_data(7, b"\x01\x02\x03\x04")
    ready = messages.encode_message(ord("Z"), b"I")
    swapped = with_client_key([server_key, ready], BackendKey(7, b"\x09\x09\x09\x09"))
    assert swapped == messages.backend_key_data(7, b"\x09\x09\x09\x09") + ready

"""Byte-exact tests for gateway.protocol.startup.parse_startup_packet.

Bodies are what follows the int32 length: an int32 code or version, then the rest.
"""

from __future__ import annotations

import pytest

from gateway.protocol import messages
from gateway.protocol.constants import MAX_STARTUP_PACKET_LENGTH
from gateway.protocol.errors import ProtocolError
from gateway.protocol.framing import MessageReader
from gateway.protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    parse_startup_packet,
)

V3_0 = b"\x00\x03\x00\x00"
SSL_CODE = b"\x04\xd2\x16\x2f"  # 1234 << 16 | 5679
GSSENC_CODE = b"\x04\xd2\x16\x30"  # 1234 << 16 | 5680
CANCEL_CODE = b"\x04\xd2\x16\x2e"  # 1234 << 16 | 5678


def startup(params: bytes, version: bytes = V3_0) -> StartupMessage:
    packet = parse_startup_packet(version + params)
    assert isinstance(packet, StartupMessage)
    return packet


# --- special requests --------------------------------------------------------------


def test_ssl_request_is_recognised() -> None:
    assert parse_startup_packet(SSL_CODE) == SSLRequest()


def test_gssenc_request_is_recognised() -> None:
    assert parse_startup_packet(GSSENC_CODE) == GSSENCRequest()


@pytest.mark.parametrize("code", [SSL_CODE, GSSENC_CODE])
def test_encryption_requests_with_trailing_bytes_are_rejected(code: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid length"):
        parse_startup_packet(code + b"\x00")


def test_ssl_request_read_from_the_encoder_bytes() -> None:
    reader = MessageReader(max_length=1024)
    reader.feed(messages.ssl_request())
    body = reader.next_startup_packet(MAX_STARTUP_PACKET_LENGTH)
    assert body is not None
    assert parse_startup_packet(body) == SSLRequest()


def test_cancel_request_with_a_four_byte_key() -> None:
    packet = parse_startup_packet(CANCEL_CODE + b"\x00\x00\x10\x92" + b"\xaa\xbb\xcc\xdd")
    assert packet == CancelRequest(4242, b"\xaa\xbb\xcc\xdd")


def test_cancel_request_with_a_thirty_two_byte_protocol_3_2_key() -> None:
    key = bytes(range(100, 132))
    packet = parse_startup_packet(CANCEL_CODE + b"\x00\x00\x00\x07" + key)
    assert packet == CancelRequest(7, key)
    assert isinstance(packet, CancelRequest)
    assert type(packet.secret) is bytes


def test_cancel_request_with_a_256_byte_key_is_accepted() -> None:
    key = b"\x01" * 256
    assert parse_startup_packet(CANCEL_CODE + b"\x00\x00\x00\x07" + key) == CancelRequest(7, key)


@pytest.mark.parametrize("key_length", [0, 3, 257])
def test_cancel_request_with_an_invalid_key_length_is_rejected(key_length: int) -> None:
    with pytest.raises(ProtocolError, match="CancelRequest has an invalid length"):
        parse_startup_packet(CANCEL_CODE + b"\x00\x00\x00\x07" + b"\x01" * key_length)


def test_cancel_request_repr_does_not_show_the_secret() -> None:
    assert repr(CancelRequest(7, b"\xaa\xbb\xcc\xdd")) == "CancelRequest(pid=7)"


def test_cancel_request_round_trips_the_encoder() -> None:
    encoded = messages.cancel_request(99, b"\x10\x20\x30\x40")
    assert parse_startup_packet(encoded[4:]) == CancelRequest(99, b"\x10\x20\x30\x40")


# --- StartupMessage -----------------------------------------------------------------


def test_startup_message_params_are_decoded_in_order() -> None:
    packet = startup(b"user\x00alice\x00database\x00app\x00application_name\x00psql\x00\x00")
    assert packet == StartupMessage(
        0x00030000, {"user": "alice", "database": "app", "application_name": "psql"}
    )
    assert list(packet.params) == ["user", "database", "application_name"]
    assert packet.user == "alice"
    assert packet.database == "app"
    assert packet.minor_version == 0
    assert not packet.is_replication


def test_startup_message_round_trips_the_encoder() -> None:
    encoded = messages.startup_message({"user": "bob", "options": "-c x=1"})
    assert parse_startup_packet(encoded[4:]) == StartupMessage(
        0x00030000, {"user": "bob", "options": "-c x=1"}
    )


def test_database_defaults_to_the_user_name() -> None:
    assert startup(b"user\x00alice\x00\x00").database == "alice"


def test_an_empty_database_defaults_to_the_user_name() -> None:
    assert startup(b"user\x00alice\x00database\x00\x00\x00").database == "alice"


def test_user_and_database_are_none_without_params() -> None:
    packet = startup(b"\x00")
    assert packet.params == {}
    assert packet.user is None
    assert packet.database is None


def test_utf8_values_are_decoded() -> None:
    assert startup(b"user\x00ren\xc3\xa9e\x00\x00").user == "renée"


@pytest.mark.parametrize(
    "value", [b"true", b"database", b"on", b"yes", b"1", b"TRUE", b"t", b"garbage", b""]
)
def test_replication_values_that_start_a_wal_sender_or_fail_are_replication(value: bytes) -> None:
    assert startup(b"user\x00u\x00replication\x00" + value + b"\x00\x00").is_replication


@pytest.mark.parametrize(
    "value", [b"false", b"off", b"no", b"0", b"FALSE", b"f", b"fal", b"n", b"of", b"Off"]
)
def test_replication_values_postgres_reads_as_false_are_not_replication(value: bytes) -> None:
    assert not startup(b"user\x00u\x00replication\x00" + value + b"\x00\x00").is_replication


@pytest.mark.parametrize("value", [b"o", b"falsey", b"nope", b"00"])
def test_replication_values_postgres_rejects_count_as_replication(value: bytes) -> None:
    assert startup(b"user\x00u\x00replication\x00" + value + b"\x00\x00").is_replication


def test_protocol_3_2_is_accepted_with_minor_version_two() -> None:
    packet = startup(b"user\x00u\x00\x00", version=b"\x00\x03\x00\x02")
    assert packet.version == (3 << 16) | 2
    assert packet.minor_version == 2


def test_a_grease_minor_version_is_accepted() -> None:
    packet = startup(b"user\x00u\x00\x00", version=b"\x00\x03\x27\x0f")
    assert packet.version == (3 << 16) | 9999
    assert packet.minor_version == 9999


def test_protocol_2_is_rejected() -> None:
    with pytest.raises(ProtocolError, match=r"unsupported frontend protocol 2\.0"):
        parse_startup_packet(b"\x00\x02\x00\x00user\x00u\x00\x00")


def test_protocol_4_is_rejected() -> None:
    with pytest.raises(ProtocolError, match=r"unsupported frontend protocol 4\.0"):
        parse_startup_packet(b"\x00\x04\x00\x00\x00")


def test_an_http_request_is_rejected_as_garbage() -> None:
    with pytest.raises(ProtocolError, match="unsupported frontend protocol"):
        parse_startup_packet(b"GET / HTTP/1.1\r\n")


@pytest.mark.parametrize("body", [b"", b"\x00", b"\x00\x03\x00"])
def test_a_body_shorter_than_four_bytes_is_rejected(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="too short"):
        parse_startup_packet(body)


def test_params_without_the_final_nul_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="not terminated"):
        startup(b"user\x00alice\x00")


def test_an_empty_param_list_without_terminator_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="not terminated"):
        startup(b"")


def test_a_name_without_a_value_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="'user' has no value"):
        startup(b"user\x00")


def test_an_unterminated_value_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="NUL-terminated"):
        startup(b"user\x00alice")


def test_an_unterminated_name_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="NUL-terminated"):
        startup(b"user")


def test_trailing_bytes_after_the_terminator_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="trailing bytes"):
        startup(b"user\x00alice\x00\x00x")


def test_invalid_utf8_in_a_param_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="UTF-8"):
        startup(b"user\x00\xff\x00\x00")

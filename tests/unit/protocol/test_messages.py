"""Byte-exact tests for gateway.protocol.messages encoders and decoders."""

from __future__ import annotations

import pytest

from gateway.protocol import messages
from gateway.protocol.constants import (
    PROTOCOL_3_2,
    AuthRequest,
    BackendType,
    FrontendType,
    TransactionStatus,
)
from gateway.protocol.errors import ProtocolError
from gateway.protocol.messages import AuthenticationRequest, BackendKey, ErrorFields

# --- framing helper ---------------------------------------------------------------


def test_encode_message_writes_type_byte_and_length_including_itself() -> None:
    assert messages.encode_message(FrontendType.QUERY, b"select 1\x00") == (
        b"Q\x00\x00\x00\x0dselect 1\x00"
    )


def test_encode_message_with_an_empty_body_has_length_four() -> None:
    assert messages.encode_message(FrontendType.SYNC, b"") == b"S\x00\x00\x00\x04"


# --- frontend encoders -------------------------------------------------------------


def test_ssl_request_is_the_eight_published_bytes() -> None:
    assert messages.ssl_request() == bytes.fromhex("0000000804d2162f")


def test_startup_message_lists_params_in_order_then_a_terminating_nul() -> None:
    assert messages.startup_message({"user": "alice", "database": "app"}) == (
        b"\x00\x00\x00\x21"  # 33 = 4 + 4 + 5 + 6 + 9 + 4 + 1
        b"\x00\x03\x00\x00"
        b"user\x00alice\x00"
        b"database\x00app\x00"
        b"\x00"
    )


def test_startup_message_with_no_params_is_nine_bytes() -> None:
    assert messages.startup_message({}) == b"\x00\x00\x00\x09\x00\x03\x00\x00\x00"


def test_startup_message_writes_the_requested_version() -> None:
    assert messages.startup_message({}, version=PROTOCOL_3_2) == (
        b"\x00\x00\x00\x09\x00\x03\x00\x02\x00"
    )


def test_startup_message_encodes_values_as_utf8() -> None:
    assert messages.startup_message({"application_name": "café"}) == (
        b"\x00\x00\x00\x20\x00\x03\x00\x00application_name\x00caf\xc3\xa9\x00\x00"
    )


def test_startup_message_refuses_a_nul_inside_a_value() -> None:
    with pytest.raises(ValueError, match="NUL"):
        messages.startup_message({"user": "a\x00b"})


def test_cancel_request_with_a_four_byte_key() -> None:
    assert messages.cancel_request(0x01020304, b"\xde\xad\xbe\xef") == (
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x01\x02\x03\x04\xde\xad\xbe\xef"
    )


def test_cancel_request_with_a_thirty_two_byte_key_has_length_forty_four() -> None:
    key = bytes(range(32))
    assert messages.cancel_request(7, key) == (
        b"\x00\x00\x00\x2c\x04\xd2\x16\x2e\x00\x00\x00\x07" + key
    )


def test_password_message_is_nul_terminated() -> None:
    assert messages.password_message(b"secret") == b"p\x00\x00\x00\x0bsecret\x00"


def test_sasl_initial_response_carries_mechanism_and_data_length() -> None:
    data = b"n,,n=,r=abc"
    assert messages.sasl_initial_response("SCRAM-SHA-256", data) == (
        b"p\x00\x00\x00\x21SCRAM-SHA-256\x00\x00\x00\x00\x0bn,,n=,r=abc"
    )


def test_sasl_response_is_the_bare_data() -> None:
    assert messages.sasl_response(b"c=biws") == b"p\x00\x00\x00\x0ac=biws"


def test_terminate_is_five_bytes() -> None:
    assert messages.terminate() == b"X\x00\x00\x00\x04"


# --- backend encoders --------------------------------------------------------------


def test_authentication_ok() -> None:
    assert messages.authentication_ok() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"


def test_ready_for_query_defaults_to_idle() -> None:
    assert messages.ready_for_query() == b"Z\x00\x00\x00\x05I"


@pytest.mark.parametrize(
    ("status", "byte"),
    [
        (TransactionStatus.IDLE, b"I"),
        (TransactionStatus.IN_TRANSACTION, b"T"),
        (TransactionStatus.FAILED, b"E"),
    ],
)
def test_ready_for_query_carries_the_status_byte(status: TransactionStatus, byte: bytes) -> None:
    assert messages.ready_for_query(status) == b"Z\x00\x00\x00\x05" + byte


def test_parameter_status() -> None:
    assert messages.parameter_status("server_version", "16.2") == (
        b"S\x00\x00\x00\x18server_version\x0016.2\x00"
    )


def test_backend_key_data() -> None:
    assert messages.backend_key_data(4242, b"\x01\x02\x03\x04") == (
        b"K\x00\x00\x00\x0c\x00\x00\x10\x92\x01\x02\x03\x04"
    )


def test_error_response_without_detail_or_hint_has_four_fields() -> None:
    assert messages.error_response("FATAL", "28000", "access denied") == (
        b"E\x00\x00\x00\x29"  # 41 = 4 + 7 + 7 + 7 + 15 + 1
        b"SFATAL\x00"
        b"VFATAL\x00"
        b"C28000\x00"
        b"Maccess denied\x00"
        b"\x00"
    )


def test_error_response_with_detail_and_hint_appends_d_then_h() -> None:
    assert messages.error_response("ERROR", "08P01", "bad", detail="why", hint="do this") == (
        b"E\x00\x00\x00\x2d"  # 45 = 4 + 7 + 7 + 7 + 5 + 5 + 9 + 1
        b"SERROR\x00"
        b"VERROR\x00"
        b"C08P01\x00"
        b"Mbad\x00"
        b"Dwhy\x00"
        b"Hdo this\x00"
        b"\x00"
    )


def test_error_response_with_only_a_hint_skips_detail() -> None:
    assert messages.error_response("ERROR", "42501", "no", hint="ask") == (
        b"E\x00\x00\x00\x23SERROR\x00VERROR\x00C42501\x00Mno\x00Hask\x00\x00"
    )


def test_error_response_strips_nul_from_field_values() -> None:
    assert messages.error_response("ERROR", "XX000", "a\x00b") == (
        b"E\x00\x00\x00\x1eSERROR\x00VERROR\x00CXX000\x00Mab\x00\x00"
    )


def test_notice_response_uses_type_n_and_the_same_fields() -> None:
    assert messages.notice_response("NOTICE", "00000", "hi", detail="d") == (
        b"N\x00\x00\x00\x23SNOTICE\x00VNOTICE\x00C00000\x00Mhi\x00Dd\x00\x00"
    )


# --- parse_error_fields -----------------------------------------------------------


def test_parse_error_fields_round_trips_error_response() -> None:
    encoded = messages.error_response("FATAL", "28P01", "auth failed", detail="d", hint="h")
    fields = messages.parse_error_fields(encoded[5:])
    assert fields == ErrorFields(
        {"S": "FATAL", "V": "FATAL", "C": "28P01", "M": "auth failed", "D": "d", "H": "h"}
    )
    assert fields.severity == "FATAL"
    assert fields.sqlstate == "28P01"
    assert fields.message == "auth failed"
    assert fields.detail == "d"
    assert fields.hint == "h"


def test_parse_error_fields_prefers_the_nonlocalized_severity() -> None:
    fields = messages.parse_error_fields(b"SFATAL-LOCALISE\x00VFATAL\x00\x00")
    assert fields.severity == "FATAL"


def test_parse_error_fields_falls_back_to_the_localized_severity() -> None:
    fields = messages.parse_error_fields(b"SERREUR\x00C42P01\x00\x00")
    assert fields.severity == "ERREUR"
    assert fields.detail is None
    assert fields.hint is None


def test_parse_error_fields_of_an_empty_list_has_empty_defaults() -> None:
    fields = messages.parse_error_fields(b"\x00")
    assert fields.fields == {}
    assert (fields.severity, fields.sqlstate, fields.message) == ("", "", "")


def test_parse_error_fields_keeps_unknown_field_codes() -> None:
    fields = messages.parse_error_fields(b"Rauth.c\x00L123\x00\x00")
    assert fields.fields == {"R": "auth.c", "L": "123"}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"SERROR\x00",  # no terminating NUL field code
        b"SERROR",  # unterminated string
        b"M\xff\xfe\x00\x00",  # not UTF-8
    ],
)
def test_parse_error_fields_rejects_malformed_bodies(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        messages.parse_error_fields(body)


# --- parse_authentication ---------------------------------------------------------


def test_parse_authentication_ok() -> None:
    assert messages.parse_authentication(b"\x00\x00\x00\x00") == AuthenticationRequest(0, b"")


def test_parse_authentication_md5_keeps_the_salt() -> None:
    request = messages.parse_authentication(b"\x00\x00\x00\x05\x01\x02\x03\x04")
    assert request == AuthenticationRequest(AuthRequest.MD5_PASSWORD, b"\x01\x02\x03\x04")


@pytest.mark.parametrize("body", [b"", b"\x00\x00\x00"])
def test_parse_authentication_rejects_a_body_shorter_than_four(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="too short"):
        messages.parse_authentication(body)


# --- parse_sasl_mechanisms --------------------------------------------------------


def test_parse_sasl_mechanisms_lists_every_name() -> None:
    data = b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
    assert messages.parse_sasl_mechanisms(data) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


def test_parse_sasl_mechanisms_of_an_empty_list() -> None:
    assert messages.parse_sasl_mechanisms(b"\x00") == []


def test_parse_sasl_mechanisms_rejects_an_unterminated_name() -> None:
    with pytest.raises(ProtocolError, match="NUL-terminated"):
        messages.parse_sasl_mechanisms(b"SCRAM-SHA-256")


# --- parse_parameter_status --------------------------------------------------------


def test_parse_parameter_status() -> None:
    assert messages.parse_parameter_status(b"TimeZone\x00Europe/Paris\x00") == (
        "TimeZone",
        "Europe/Paris",
    )


def test_parse_parameter_status_round_trips_the_encoder() -> None:
    encoded = messages.parameter_status("application_name", "psql")
    assert encoded[0] == BackendType.PARAMETER_STATUS
    assert messages.parse_parameter_status(encoded[5:]) == ("application_name", "psql")


@pytest.mark.parametrize("body", [b"", b"name", b"name\x00value"])
def test_parse_parameter_status_rejects_unterminated_fields(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        messages.parse_parameter_status(body)


# --- parse_backend_key_data --------------------------------------------------------


def test_parse_backend_key_data_with_a_four_byte_key() -> None:
    key = messages.parse_backend_key_data(b"\x00\x00\x10\x92\xaa\xbb\xcc\xdd")
    assert key == BackendKey(4242, b"\xaa\xbb\xcc\xdd")
    assert type(key.secret) is bytes


def test_parse_backend_key_data_with_a_thirty_two_byte_protocol_3_2_key() -> None:
    secret = bytes(range(32))
    assert messages.parse_backend_key_data(b"\x00\x00\x00\x01" + secret) == BackendKey(1, secret)


def test_parse_backend_key_data_accepts_a_256_byte_key() -> None:
    secret = b"\x5a" * 256
    assert messages.parse_backend_key_data(b"\x00\x00\x00\x01" + secret).secret == secret


@pytest.mark.parametrize("length", [0, 4, 7, 4 + 257])
def test_parse_backend_key_data_rejects_invalid_lengths(length: int) -> None:
    with pytest.raises(ProtocolError, match="invalid length"):
        messages.parse_backend_key_data(b"\x01" * length)


def test_backend_key_repr_does_not_show_the_secret() -> None:
    key = BackendKey(4242, b"\xaa\xbb\xcc\xdd")
    assert repr(key) == "BackendKey(pid=4242, secret=<4 bytes>)"
    assert "aa" not in repr(key).lower()
    assert "xaa" not in str(key)


# --- parse_ready_for_query ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"I", TransactionStatus.IDLE),
        (b"T", TransactionStatus.IN_TRANSACTION),
        (b"E", TransactionStatus.FAILED),
    ],
)
def test_parse_ready_for_query(body: bytes, status: TransactionStatus) -> None:
    assert messages.parse_ready_for_query(body) is status


@pytest.mark.parametrize("body", [b"", b"II"])
def test_parse_ready_for_query_rejects_a_body_not_one_byte_long(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="one status byte"):
        messages.parse_ready_for_query(body)


def test_parse_ready_for_query_rejects_an_unknown_status() -> None:
    with pytest.raises(ProtocolError, match=r"unknown transaction status b'X'"):
        messages.parse_ready_for_query(b"X")


# --- read_cstring ------------------------------------------------------------------


def test_read_cstring_returns_the_string_and_the_next_offset() -> None:
    assert messages.read_cstring(b"ab\x00cd\x00", 0) == ("ab", 3)
    assert messages.read_cstring(b"ab\x00cd\x00", 3) == ("cd", 6)


def test_read_cstring_of_an_empty_string() -> None:
    assert messages.read_cstring(b"\x00", 0) == ("", 1)


# --- a statement of the gateway's own (credential rotation) ----------------------


def test_query_is_the_sql_nul_terminated() -> None:
    assert messages.query("SHOW scram_iterations") == (
        b"Q\x00\x00\x00\x1aSHOW scram_iterations\x00"
    )


def test_a_query_cannot_carry_a_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        messages.query("select 1\x00; drop table x")


def test_a_data_row_gives_its_values_and_nulls() -> None:
    body = b"\x00\x03" + b"\x00\x00\x00\x044096" + b"\xff\xff\xff\xff" + b"\x00\x00\x00\x00"
    assert messages.parse_data_row(body) == [b"4096", None, b""]


@pytest.mark.parametrize(
    "body",
    [
        b"\x00",  # no column count
        b"\x00\x01\x00\x00",  # a column length cut short
        b"\x00\x01\x00\x00\x00\x05abc",  # a value shorter than its length
        b"\x00\x01\x00\x00\x00\x01ab",  # bytes after the last column
    ],
)
def test_a_malformed_data_row_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        messages.parse_data_row(body)

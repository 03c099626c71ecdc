"""Tests of gateway.audit.decoding: the fields of tapped bodies, byte-exact, including
bodies the tap cut off (nothing here may raise: the relay forwarded them already)."""

from __future__ import annotations

import struct

from gateway.audit.decoding import body_text, decode_parameters, read_cstring
from gateway.audit.redaction import Redactor

REDACTOR = Redactor.build((), ("hunter2",))


def bind_values(values: list[bytes | None], formats: tuple[int, ...] = ()) -> bytes:
    """The part of a Bind body from its format-code count on (55.7 "Bind")."""
    body = struct.pack(f"!h{len(formats)}h", len(formats), *formats)
    body += struct.pack("!h", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return body


def test_a_string_without_its_nul_runs_to_the_end_of_what_was_kept() -> None:
    assert read_cstring(b"abc\x00def", 0) == ("abc", 4)
    assert read_cstring(b"abc\x00def", 4) == ("def", 7)
    assert body_text(b"SELECT 1\x00") == "SELECT 1"
    assert body_text(b"SELECT 1") == "SELECT 1"


def test_parameters_carry_their_index_type_format_and_value() -> None:
    body = b"\x00\x00" + bind_values([b"42", None, b"\x00\x01"], formats=(0, 0, 1))
    assert decode_parameters(body, 2, (23, 25), True, 256, REDACTOR) == (
        (1, 23, "text", "42", False),
        (2, 25, "null", None, False),
        (3, None, "binary", REDACTOR.binary(b"\x00\x01"), False),
    )


def test_values_are_left_out_when_not_wanted() -> None:
    body = bind_values([b"42"])
    assert decode_parameters(body, 0, (23,), False, 256, REDACTOR) == (
        (1, 23, "text", None, False),
    )


def test_a_value_longer_than_the_limit_is_cut_and_marked() -> None:
    body = bind_values([b"abcdef"])
    assert decode_parameters(body, 0, (), True, 4, REDACTOR) == ((1, None, "text", "abcd", True),)


def test_a_secret_value_is_redacted() -> None:
    body = bind_values([b"hunter2"])
    ((_, _, _, value, _),) = decode_parameters(body, 0, (), True, 256, REDACTOR) or ()
    assert value is not None
    assert "hunter2" not in value


def test_a_bind_cut_off_by_the_tap_logs_what_it_cannot_see_as_truncated() -> None:
    body = bind_values([b"42", b"x" * 100])[:-90]
    assert decode_parameters(body, 0, (), True, 256, REDACTOR) == (
        (1, None, "text", "42", False),
        (2, None, "text", "x" * 10, True),
    )
    # Cut inside the second value's length: no value at all, still no exception.
    short = bind_values([b"42", b"x"])[:-3]
    assert decode_parameters(short, 0, (), True, 256, REDACTOR) == (
        (1, None, "text", "42", False),
        (2, None, "text", None, True),
    )
    assert decode_parameters(b"\x00", 0, (), True, 256, REDACTOR) is None

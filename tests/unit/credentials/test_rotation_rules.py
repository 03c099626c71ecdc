"""The pure parts of rotation: generated passwords and the settings that shape
them, SQL quoting, and reading the server's major version. The flow itself runs
against a real PostgreSQL in tests/integration/test_rotation.py."""

from __future__ import annotations

import math
import string
from collections import Counter

import pytest
from pydantic import ValidationError

from gateway.config import PASSWORD_SAFE_CHARACTERS, GatewaySettings
from gateway.credentials.rotation import _major_version, generate_password
from gateway.credentials.statements import quote_identifier, quote_literal
from gateway.errors import InvalidRequest


def test_a_generated_password_has_the_length_and_only_the_alphabet_asked_for() -> None:
    password = generate_password(40, "abc")
    assert len(password) == 40 and set(password) <= {"a", "b", "c"}


def test_generated_passwords_use_every_character_of_the_alphabet_alike() -> None:
    alphabet = string.ascii_letters + string.digits
    counts = Counter("".join(generate_password(64, alphabet) for _ in range(500)))
    assert set(counts) == set(alphabet)
    expected = 64 * 500 / len(alphabet)
    # Far looser than chance allows (about 6 standard deviations): a bias such
    # as `alphabet[byte % 62]` or a missing character would still show.
    assert all(abs(n - expected) < 6 * math.sqrt(expected) for n in counts.values())


def test_the_default_settings_give_a_password_of_190_bits_that_needs_no_quoting() -> None:
    settings = GatewaySettings()
    assert settings.rotation_password_length == 32
    bits = settings.rotation_password_length * math.log2(len(settings.rotation_password_alphabet))
    assert bits > 190
    assert set(settings.rotation_password_alphabet) <= set(PASSWORD_SAFE_CHARACTERS)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"rotation_password_alphabet": "abc'def"}, "letters, digits and -._~"),
        ({"rotation_password_alphabet": "abc def"}, "letters, digits and -._~"),
        ({"rotation_password_alphabet": "aabbccddeeffgghh"}, "twice"),
        ({"rotation_password_alphabet": "0123456789"}, "at least 128"),
        ({"rotation_password_length": 8}, "greater than or equal to 16"),
    ],
)
def test_settings_refuse_a_weak_or_unsafe_password_shape(
    update: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        GatewaySettings.model_validate(update)


def test_a_long_enough_password_of_digits_is_allowed() -> None:
    settings = GatewaySettings.model_validate(
        {"rotation_password_alphabet": "0123456789", "rotation_password_length": 40}
    )
    assert settings.rotation_password_length == 40


def test_identifiers_and_literals_are_quoted_whatever_they_hold() -> None:
    assert quote_identifier('we"ird role') == '"we""ird role"'
    assert quote_literal("it's") == "'it''s'"
    for bad in ("a\x00b",):
        with pytest.raises(InvalidRequest):
            quote_identifier(bad)
        with pytest.raises(InvalidRequest):
            quote_literal(bad)
    with pytest.raises(InvalidRequest):
        quote_literal("back\\slash")


@pytest.mark.parametrize(
    ("version", "major"),
    [("15.18", 15), ("16.2 (Debian 16.2-1.pgdg120+2)", 16), ("17beta1", 17), (None, 0), ("", 0)],
)
def test_the_major_version_is_read_from_server_version(version: str | None, major: int) -> None:
    assert _major_version(version) == major

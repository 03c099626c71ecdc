"""Tests of gateway.identity.hashing: argon2id passwords, token digests."""

from __future__ import annotations

import hashlib
from typing import Literal

import pytest
from argon2 import PasswordHasher

import gateway.identity.hashing as hashing
from gateway.identity.hashing import (
    TOKEN_PREFIX,
    hash_password,
    new_token,
    token_digest,
    verify_password,
)


def test_password_hash_is_argon2id_and_salted() -> None:
    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first.startswith("$argon2id$")
    assert "correct horse" not in first
    assert first != second


def test_verify_accepts_the_password_and_refuses_another() -> None:
    stored = hash_password("correct horse")
    assert verify_password(stored, "correct horse") is True
    assert verify_password(stored, "correct horsE") is False
    assert verify_password(stored, "") is False


def test_a_malformed_hash_is_a_refusal_not_an_error() -> None:
    assert verify_password("not-a-hash", "whatever") is False


def test_unknown_user_runs_one_dummy_verification_and_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    verified: list[str] = []

    class CountingHasher(PasswordHasher):
        def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
            verified.append(str(hash))
            return super().verify(hash, password)

    monkeypatch.setattr(hashing, "_hasher", CountingHasher())
    assert verify_password(None, "anything") is False
    assert verified == [hashing._DUMMY_HASH]
    assert verified[0].startswith("$argon2id$")


def test_tokens_are_random_prefixed_and_kept_as_sha256() -> None:
    token = new_token()
    assert token.startswith(TOKEN_PREFIX)
    assert len(token) > len(TOKEN_PREFIX) + 40
    assert token != new_token()
    assert token_digest(token) == hashlib.sha256(token.encode()).hexdigest()
    assert token not in token_digest(token)

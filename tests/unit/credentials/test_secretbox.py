"""Tests of gateway.credentials.secretbox: the master key file and SecretBox."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.credentials.secretbox import (
    MASTER_KEY_BYTES,
    SecretBox,
    SecretDecryptError,
    generate_master_key,
    load_master_key,
)
from gateway.errors import AlreadyExists, ConfigError, GatewayError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
AAD = b"pam/account/0123456789abcdef0123456789abcdef"
PLAINTEXT = b"correct horse battery staple"


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """A umask of 0, so only the code under test can make the key file private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- master key file ----------------------------------------------------------------


@pytest.mark.usefixtures("permissive_umask")
def test_generate_master_key_creates_a_0600_file_holding_32_base64_bytes(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    generate_master_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_bytes().strip(), validate=True)) == MASTER_KEY_BYTES
    assert load_master_key(path) == base64.b64decode(path.read_bytes().strip())


def test_generated_keys_differ(tmp_path: Path) -> None:
    generate_master_key(tmp_path / "a.key")
    generate_master_key(tmp_path / "b.key")
    assert load_master_key(tmp_path / "a.key") != load_master_key(tmp_path / "b.key")


def test_generate_master_key_refuses_to_overwrite_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    generate_master_key(path)
    before = path.read_bytes()
    with pytest.raises(AlreadyExists, match="already exists"):
        generate_master_key(path)
    assert path.read_bytes() == before


def test_generate_master_key_in_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create master key file"):
        generate_master_key(tmp_path / "missing" / "master.key")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700 | 0o001])
def test_load_master_key_refuses_a_file_others_can_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    generate_master_key(path)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        load_master_key(path)
    assert str(path) in info.value.message
    assert f"chmod 600 {path}" in info.value.message


def test_load_master_key_accepts_an_owner_only_file(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    generate_master_key(path)
    path.chmod(0o400)
    assert len(load_master_key(path)) == MASTER_KEY_BYTES


@pytest.mark.parametrize(
    "content",
    [
        b"",
        base64.b64encode(bytes(16)) + b"\n",
        base64.b64encode(bytes(33)) + b"\n",
        b"not base64 at all!!\n",
    ],
    ids=["empty", "16-bytes", "33-bytes", "not-base64"],
)
def test_load_master_key_refuses_a_file_without_a_32_byte_key(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "master.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="does not hold a base64-encoded 32-byte key") as info:
        load_master_key(path)
    assert str(path) in info.value.message


def test_load_master_key_reports_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(ConfigError, match="does not exist"):
        load_master_key(path)


def test_load_master_key_refuses_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "dir.key"
    path.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_master_key(path)


# -- SecretBox ----------------------------------------------------------------------


def test_secret_box_round_trips() -> None:
    box = SecretBox(KEY)
    assert box.decrypt(box.encrypt(PLAINTEXT, aad=AAD), aad=AAD) == PLAINTEXT
    assert box.decrypt(box.encrypt(b"", aad=AAD), aad=AAD) == b""


def test_secret_box_blob_is_version_nonce_ciphertext_and_tag() -> None:
    blob = SecretBox(KEY).encrypt(PLAINTEXT, aad=AAD)
    assert blob[0] == 0x01
    assert len(blob) == 1 + 12 + len(PLAINTEXT) + 16
    # The layout is plain AES-256-GCM, with the version byte authenticated as aad.
    assert AESGCM(KEY).decrypt(blob[1:13], blob[13:], b"\x01" + AAD) == PLAINTEXT


def test_secret_box_uses_a_fresh_nonce_per_call() -> None:
    box = SecretBox(KEY)
    blobs = {box.encrypt(PLAINTEXT, aad=AAD) for _ in range(50)}
    assert len(blobs) == 50
    assert len({blob[1:13] for blob in blobs}) == 50


def test_secret_box_refuses_another_aad() -> None:
    box = SecretBox(KEY)
    blob = box.encrypt(PLAINTEXT, aad=AAD)
    with pytest.raises(SecretDecryptError):
        box.decrypt(blob, aad=AAD[:-1] + b"0")


def test_secret_box_refuses_another_key() -> None:
    blob = SecretBox(KEY).encrypt(PLAINTEXT, aad=AAD)
    with pytest.raises(SecretDecryptError):
        SecretBox(OTHER_KEY).decrypt(blob, aad=AAD)


def test_secret_box_detects_a_flipped_bit_anywhere() -> None:
    box = SecretBox(KEY)
    blob = box.encrypt(PLAINTEXT, aad=AAD)
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(SecretDecryptError):
            box.decrypt(bytes(tampered), aad=AAD)


@pytest.mark.parametrize("length", [0, 1, 13, 28])
def test_secret_box_refuses_a_truncated_blob(length: int) -> None:
    box = SecretBox(KEY)
    blob = box.encrypt(PLAINTEXT, aad=AAD)
    with pytest.raises(SecretDecryptError, match="truncated"):
        box.decrypt(blob[:length], aad=AAD)


def test_secret_box_refuses_an_unknown_version() -> None:
    box = SecretBox(KEY)
    blob = box.encrypt(PLAINTEXT, aad=AAD)
    with pytest.raises(SecretDecryptError, match="unknown format version 3"):
        box.decrypt(b"\x03" + blob[1:], aad=AAD)


def test_decrypt_errors_reveal_neither_key_nor_plaintext() -> None:
    blob = SecretBox(KEY).encrypt(PLAINTEXT, aad=AAD)
    with pytest.raises(SecretDecryptError) as info:
        SecretBox(OTHER_KEY).decrypt(blob, aad=AAD)
    error = info.value
    assert isinstance(error, GatewayError)
    for text in (str(error), repr(error), error.message, error.hint or ""):
        assert PLAINTEXT.decode() not in text
        assert KEY.hex() not in text
        assert OTHER_KEY.hex() not in text
    assert error.__cause__ is None
    assert error.__suppress_context__


@pytest.mark.parametrize("length", [0, 16, 24, 31, 33])
def test_secret_box_needs_a_32_byte_key(length: int) -> None:
    with pytest.raises(ConfigError, match="32 bytes"):
        SecretBox(bytes(length))


def test_secret_box_repr_hides_the_key() -> None:
    box = SecretBox(KEY)
    assert KEY.hex() not in repr(box)
    assert not hasattr(box, "__dict__")

"""Secrets at rest: the master key file and the authenticated box that seals passwords.

Role: the state store keeps upstream account passwords only as ciphertext made by
:class:`SecretBox`; the key never leaves this process and never touches the database.

Invariants:

* The master key is exactly :data:`MASTER_KEY_BYTES` random bytes from :mod:`secrets`,
  stored base64-encoded in a file that only its owner can read (mode 0600). A key
  file readable by group or others is refused, not silently used.
* A key file is never overwritten: replacing the key would make every stored
  password unreadable, so that must be a deliberate act outside this code.
* Every sealed blob is ``version (1 byte) || nonce (12 bytes) || ciphertext || tag``
  under AES-256-GCM with a fresh random nonce per call, and is bound to its owner
  by the associated data (``aad``) so a blob copied to another row fails to open.
* Nothing here logs, and no error message contains key material or plaintext.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from gateway.errors import AlreadyExists, ConfigError, GatewayError

__all__ = [
    "DERIVED_KEY_BYTES",
    "MASTER_KEY_BYTES",
    "SecretBox",
    "SecretDecryptError",
    "generate_master_key",
    "load_master_key",
]

#: AES-256 needs a 256-bit key.
MASTER_KEY_BYTES: Final = 32

#: First byte of every blob; lets a future format (another cipher, a key id for
#: rotation) coexist with rows written by this one.
_FORMAT_V1: Final = 0x01
#: 96-bit nonces are what GCM is specified for (NIST SP 800-38D, section 8.2);
#: random ones are safe far beyond the number of passwords we will ever seal.
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
_MIN_BLOB_BYTES: Final = 1 + _NONCE_BYTES + _TAG_BYTES

#: Length of keys made by :meth:`SecretBox.derive_key` (one SHA-256 output).
DERIVED_KEY_BYTES: Final = 32

#: Mode bits that must be clear on the key file: any access by group or others.
_GROUP_OTHER_BITS: Final = 0o077


class SecretDecryptError(GatewayError):
    """A sealed secret could not be opened.

    Raised for every failure alike (wrong key, wrong ``aad``, altered bytes, unknown
    format) because telling them apart would help nobody but an attacker, and the
    operator's fix is the same: check the master key and the database.
    """


def generate_master_key(path: Path) -> None:
    """Create a new master key file at *path* with mode 0600.

    Raises :class:`AlreadyExists` if *path* exists (never overwrites) and
    :class:`ConfigError` if the file cannot be created.
    """
    key = secrets.token_bytes(MASTER_KEY_BYTES)
    # O_EXCL makes "does it exist?" and "create it" one atomic step, and passing
    # 0o600 to open() means the file is never readable by others, not even for the
    # moment between creation and a later chmod.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise AlreadyExists(
            f"master key file {path} already exists; refusing to overwrite it",
            hint="every stored password is sealed with that key; move the file away "
            "first only if you really mean to discard them",
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot create master key file {path}: {exc.strerror}") from None
    try:
        # A restrictive umask can only remove bits; this makes the mode exactly 0600.
        os.fchmod(fd, 0o600)
        data = base64.b64encode(key) + b"\n"
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        # A half-written key file would be refused later anyway; removing it lets
        # the operator simply retry.
        path.unlink(missing_ok=True)
        raise ConfigError(f"cannot write master key file {path}: {exc.strerror}") from None
    os.close(fd)


def load_master_key(path: Path) -> bytes:
    """Read the master key from *path*, refusing a file that others could read.

    Raises :class:`ConfigError` naming the path and the fix.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"master key file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot open master key file {path}: {exc.strerror}") from None
    try:
        # fstat on the opened descriptor checks the very file we read, not whatever
        # the path points to a moment later.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"master key file {path} is not a regular file")
        if st.st_mode & _GROUP_OTHER_BITS:
            raise ConfigError(
                f"master key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it. "
                f"Fix: chmod 600 {path}",
                hint="the key opens every stored password; only the gateway's user may read it",
            )
        # Base64 of 32 bytes plus a newline and some slack; anything far larger is
        # not a key file and is not worth reading into memory.
        raw = os.read(fd, 256)
    finally:
        os.close(fd)
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != MASTER_KEY_BYTES:
        raise ConfigError(
            f"master key file {path} does not hold a base64-encoded {MASTER_KEY_BYTES}-byte key",
            hint="restore the original key file; generating a new one makes every "
            "stored password unreadable",
        )
    return key


class SecretBox:
    """Seal and open small secrets with AES-256-GCM under the master key.

    The key is handed to the AEAD object and not kept as an attribute, so it does
    not show up in ``vars()`` or a debugger's view of this object. For
    :meth:`derive_key` only HKDF's pseudorandom key (the extract step's output) is
    kept; the master key cannot be recovered from it.
    """

    __slots__ = ("_aead", "_prk")

    def __init__(self, key: bytes) -> None:
        if len(key) != MASTER_KEY_BYTES:
            raise ConfigError(f"the master key must be exactly {MASTER_KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        # HKDF-Extract with no salt (RFC 5869, section 2.2: a string of HashLen
        # zeros), done once so that derive_key needs only the Expand step.
        self._prk = hmac.digest(bytes(hashlib.sha256().digest_size), key, "sha256")

    def derive_key(self, info: bytes) -> bytes:
        """A :data:`DERIVED_KEY_BYTES`-byte key for one purpose, named by *info*.

        HKDF-SHA256 of the master key with no salt: equal to
        ``HKDF(SHA256(), 32, salt=None, info=info).derive(master_key)``. Different
        *info* strings give independent keys, so a key handed to one component
        (the audit chain's MAC) reveals nothing about the sealing key or another.
        """
        if not isinstance(info, bytes) or not info:
            raise ConfigError("derive_key needs a non-empty info label")
        return HKDFExpand(algorithm=hashes.SHA256(), length=DERIVED_KEY_BYTES, info=info).derive(
            self._prk
        )

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> bytes:
        """Seal *plaintext*, bound to *aad*; returns ``version || nonce || ct || tag``."""
        # A fresh random nonce per call: GCM loses both confidentiality and integrity
        # if a (key, nonce) pair is ever reused.
        nonce = secrets.token_bytes(_NONCE_BYTES)
        # The version byte is authenticated too (it is part of the aad), so it cannot
        # be flipped to steer a future decoder.
        header = bytes((_FORMAT_V1,))
        return header + nonce + self._aead.encrypt(nonce, plaintext, header + aad)

    def decrypt(self, blob: bytes, *, aad: bytes) -> bytes:
        """Open a blob made by :meth:`encrypt` with the same *aad*.

        Raises :class:`SecretDecryptError` if the blob was altered, belongs to another
        *aad*, was sealed under another key, or has an unknown format.
        """
        if len(blob) < _MIN_BLOB_BYTES:
            raise SecretDecryptError("cannot decrypt secret: the stored value is truncated")
        if blob[0] != _FORMAT_V1:
            raise SecretDecryptError(f"cannot decrypt secret: unknown format version {blob[0]}")
        header = blob[:1]
        nonce = blob[1 : 1 + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[1 + _NONCE_BYTES :], header + aad)
        except InvalidTag:
            raise SecretDecryptError(
                "cannot decrypt secret: wrong master key, or the stored value was "
                "altered or belongs to another record"
            ) from None

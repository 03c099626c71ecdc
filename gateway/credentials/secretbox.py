"""Secrets at rest: the master key file and the authenticated box that seals passwords.

Role: the state store keeps upstream account passwords only as ciphertext made by
:class:`SecretBox`; the key never leaves this process and never touches the database.

Invariants:

* The master key is exactly :data:`MASTER_KEY_BYTES` random bytes from :mod:`secrets`,
  stored base64-encoded in a file that only its owner can read (mode 0600). A key
  file readable by group or others is refused, not silently used.
* A key file is never overwritten: replacing a key would make everything sealed
  with it unreadable. Rotation adds a new key version instead
  (:mod:`gateway.credentials.keyring`).
* A box holds a *key ring*: master keys by version (a small positive integer;
  the key of a state directory from before rotation is version 1), one of which
  is *active*. It seals with the active key and opens with whichever key the
  blob names (:mod:`gateway.credentials.keyring` keeps the ring's files).
* Every sealed blob is ``format (1 byte) [|| key version (4 bytes, big-endian)]
  || nonce (12 bytes) || ciphertext || tag`` under AES-256-GCM with a fresh random
  nonce per call, and is bound to its owner by the associated data (``aad``) so
  a blob copied to another row fails to open. Format 1 (:data:`_FORMAT_V1`) has
  no version field and means key version 1; format 2 names its key version.
  A blob sealed under version 1 is still written in format 1, so a gateway that
  never rotated writes exactly what older code reads. The header is part of the
  associated data, so a blob cannot be steered to another key.
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
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from gateway.errors import AlreadyExists, ConfigError, GatewayError

__all__ = [
    "DERIVED_KEY_BYTES",
    "FIRST_KEY_VERSION",
    "MASTER_KEY_BYTES",
    "SecretBox",
    "SecretDecryptError",
    "UnknownKeyVersion",
    "check_key_version",
    "generate_master_key",
    "key_version_of",
    "load_master_key",
]

#: AES-256 needs a 256-bit key.
MASTER_KEY_BYTES: Final = 32

#: First byte of every blob; lets a future format (another cipher) coexist with
#: rows written by these. Format 1 blobs are sealed under key version 1.
_FORMAT_V1: Final = 0x01
#: Format 2: the format byte is followed by the key version (:data:`_VERSION`).
_FORMAT_V2: Final = 0x02
_VERSION: Final = struct.Struct("!I")
#: The key version of every format 1 blob (and of a state directory's first key).
FIRST_KEY_VERSION: Final = 1
#: 96-bit nonces are what GCM is specified for (NIST SP 800-38D, section 8.2);
#: random ones are safe far beyond the number of passwords we will ever seal.
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
_MIN_BLOB_BYTES: Final = 1 + _NONCE_BYTES + _TAG_BYTES
_MAX_VERSION: Final = 2**32 - 1

#: Length of keys made by :meth:`SecretBox.derive_key` (one SHA-256 output).
DERIVED_KEY_BYTES: Final = 32

#: HKDF ``info`` of :meth:`SecretBox.key_id`.
_KEY_ID_INFO: Final = b"pam master key id v1"

#: Mode bits that must be clear on the key file: any access by group or others.
_GROUP_OTHER_BITS: Final = 0o077


class SecretDecryptError(GatewayError):
    """A sealed secret could not be opened.

    Raised for every failure alike (wrong key, wrong ``aad``, altered bytes, unknown
    format) because telling them apart would help nobody but an attacker, and the
    operator's fix is the same: check the master key and the database. The one
    exception is :class:`UnknownKeyVersion`: which key version a blob names is no
    secret, and it tells the operator which key file is missing.
    """


class UnknownKeyVersion(SecretDecryptError):
    """A blob (or the store) names a master key version this key ring lacks."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"cannot decrypt secret: it is sealed under master key version {version},"
            " which this gateway's key ring does not hold",
            hint=f"copy master.keys/{version}.key from a gateway that has it into this"
            " gateway's state directory (mode 0600)",
        )
        self.version = version


def key_version_of(blob: bytes) -> int:
    """The master key version *blob* names (format 1: version 1).

    Raises :class:`SecretDecryptError` for a blob too short or of an unknown format.
    """
    if len(blob) < _MIN_BLOB_BYTES:
        raise SecretDecryptError("cannot decrypt secret: the stored value is truncated")
    if blob[0] == _FORMAT_V1:
        return FIRST_KEY_VERSION
    if blob[0] == _FORMAT_V2 and len(blob) >= _MIN_BLOB_BYTES + _VERSION.size:
        version: int = _VERSION.unpack_from(blob, 1)[0]
        return version
    raise SecretDecryptError(f"cannot decrypt secret: unknown format version {blob[0]}")


def _header(version: int) -> bytes:
    if version == FIRST_KEY_VERSION:
        return bytes((_FORMAT_V1,))
    return bytes((_FORMAT_V2,)) + _VERSION.pack(version)


def check_key_version(version: object) -> int:
    """*version* if it is a valid key version (1 to 2**32-1), else :class:`ConfigError`."""
    if type(version) is not int or not FIRST_KEY_VERSION <= version <= _MAX_VERSION:
        raise ConfigError(f"a master key version is a whole number from 1, not {version!r}")
    return version


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


class _Key:
    """One master key, held only inside its AEAD object and HKDF's PRK."""

    __slots__ = ("aead", "prk")

    def __init__(self, key: bytes) -> None:
        if len(key) != MASTER_KEY_BYTES:
            raise ConfigError(f"the master key must be exactly {MASTER_KEY_BYTES} bytes")
        self.aead = AESGCM(key)
        # HKDF-Extract with no salt (RFC 5869, section 2.2: a string of HashLen
        # zeros), done once so that derive_key needs only the Expand step.
        self.prk = hmac.digest(bytes(hashlib.sha256().digest_size), key, "sha256")


class SecretBox:
    """Seal and open small secrets with AES-256-GCM under a ring of master keys.

    ``SecretBox(key)`` is a ring of one key, version 1; :meth:`from_ring` makes one
    of several. Keys are handed to AEAD objects and not kept as attributes, so
    they do not show up in ``vars()`` or a debugger's view of this object. For
    :meth:`derive_key` only HKDF's pseudorandom key (the extract step's output) is
    kept; a master key cannot be recovered from it.

    The ring may change while the box is in use (:meth:`add_keys`,
    :meth:`remove_key`, :meth:`activate`): each replaces a whole attribute, so a
    thread sealing or opening at the same time sees the ring before or after,
    never half of it.
    """

    __slots__ = ("_active", "_keys")

    def __init__(self, key: bytes) -> None:
        self._keys: dict[int, _Key] = {FIRST_KEY_VERSION: _Key(key)}
        self._active = FIRST_KEY_VERSION

    @classmethod
    def from_ring(cls, keys: Mapping[int, bytes], active: int) -> SecretBox:
        """A box over *keys* (version -> key) that seals with version *active*."""
        if active not in keys:
            raise ConfigError(f"the key ring has no master key version {active}")
        box = cls(keys[active])
        box._keys = {check_key_version(v): _Key(k) for v, k in keys.items()}
        box._active = active
        return box

    @property
    def active_version(self) -> int:
        """The version new blobs are sealed under."""
        return self._active

    @property
    def versions(self) -> tuple[int, ...]:
        """Every version this ring holds, ascending."""
        return tuple(sorted(self._keys))

    def has_version(self, version: int) -> bool:
        return version in self._keys

    def activate(self, version: int) -> None:
        """Seal with *version* from now on; :class:`UnknownKeyVersion` if absent."""
        if version not in self._keys:
            raise UnknownKeyVersion(version)
        self._active = version

    def add_keys(self, keys: Mapping[int, bytes]) -> None:
        """Hold *keys* too (a version already held keeps its key)."""
        added = {check_key_version(v): _Key(k) for v, k in keys.items() if v not in self._keys}
        if added:
            self._keys = {**self._keys, **added}

    def remove_key(self, version: int) -> None:
        """Forget *version*; the active one cannot be removed."""
        if version == self._active:
            raise ConfigError(f"master key version {version} is the active one")
        self._keys = {v: k for v, k in self._keys.items() if v != version}

    def derive_key(self, info: bytes, *, version: int | None = None) -> bytes:
        """A :data:`DERIVED_KEY_BYTES`-byte key for one purpose, named by *info*,
        from the master key of *version* (default: the active one).

        HKDF-SHA256 of the master key with no salt: equal to
        ``HKDF(SHA256(), 32, salt=None, info=info).derive(master_key)``. Different
        *info* strings give independent keys, so a key handed to one component
        (the audit chain's MAC) reveals nothing about the sealing key or another.
        """
        if not isinstance(info, bytes) or not info:
            raise ConfigError("derive_key needs a non-empty info label")
        return HKDFExpand(algorithm=hashes.SHA256(), length=DERIVED_KEY_BYTES, info=info).derive(
            self._key(self._active if version is None else version).prk
        )

    def key_id(self, version: int) -> str:
        """A public fingerprint of key *version* (16 hex digits of a key derived
        for no other use): two rings hold the same key under a version only if
        their ids match. Says nothing about the key itself."""
        return self.derive_key(_KEY_ID_INFO, version=version)[:8].hex()

    def _key(self, version: int) -> _Key:
        key = self._keys.get(version)
        if key is None:
            raise UnknownKeyVersion(version)
        return key

    def __repr__(self) -> str:
        return f"SecretBox(<keys hidden>, versions={self.versions}, active={self._active})"

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> bytes:
        """Seal *plaintext*, bound to *aad*, under the active key; returns
        ``header || nonce || ct || tag`` (the header names the key version)."""
        version = self._active
        key = self._keys[version]
        # A fresh random nonce per call: GCM loses both confidentiality and integrity
        # if a (key, nonce) pair is ever reused.
        nonce = secrets.token_bytes(_NONCE_BYTES)
        # The header is authenticated too (it is part of the aad), so it cannot
        # be flipped to steer a future decoder.
        header = _header(version)
        return header + nonce + key.aead.encrypt(nonce, plaintext, header + aad)

    def decrypt(self, blob: bytes, *, aad: bytes) -> bytes:
        """Open a blob made by :meth:`encrypt` (under any key of the ring) with the
        same *aad*.

        Raises :class:`UnknownKeyVersion` if the ring lacks the key the blob names,
        and :class:`SecretDecryptError` if the blob was altered, belongs to another
        *aad*, was sealed under another key, or has an unknown format.
        """
        version = key_version_of(blob)
        key = self._key(version)
        header = _header(version)
        nonce = blob[len(header) : len(header) + _NONCE_BYTES]
        try:
            return key.aead.decrypt(nonce, blob[len(header) + _NONCE_BYTES :], header + aad)
        except InvalidTag:
            raise SecretDecryptError(
                "cannot decrypt secret: wrong master key, or the stored value was "
                "altered or belongs to another record"
            ) from None

    def reseal(self, blob: bytes, *, aad: bytes) -> bytes | None:
        """*blob* sealed anew under the active key, or None if it already is."""
        if key_version_of(blob) == self._active:
            return None
        return self.encrypt(self.decrypt(blob, aad=aad), aad=aad)

"""SCRAM-SHA-256 client (RFC 5802, RFC 7677), as PostgreSQL speaks it.

A stage-checked object: ``client_first()``, then ``client_final(server_first)``,
then ``verify_server_final(server_final)``; any other order raises
:class:`ProtocolUsageError`. The server's signature is always verified, with
``hmac.compare_digest``. PostgreSQL ignores the SCRAM user name (it uses the
startup packet's), so the client-first message carries an empty ``n=`` by
default (PostgreSQL 15 docs, 55.3.1 "SCRAM-SHA-256 Authentication"); the
``username`` keyword exists for other servers and for the RFC 7677 test vector.

Channel binding ``tls-server-end-point`` (RFC 5929) is used when the caller
passes the binding data, selecting SCRAM-SHA-256-PLUS. A caller that could bind
but whose server did not offer -PLUS says so with ``binding_supported=True``:
the GS2 header is then ``y,,`` (RFC 5802, 6), which lets a server that does
support binding detect a mechanism list stripped by a man in the middle.

The password is normalised with SASLprep (RFC 4013); as in libpq, a password
that SASLprep rejects is used as raw UTF-8 bytes.

:func:`scram_secret` is the other side's half: the secret (salt, iterations,
StoredKey, ServerKey) a server keeps for a password, so that credential rotation
can set a password upstream without the server ever seeing it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections.abc import MutableMapping
from enum import Enum, auto

from gateway.protocol.errors import ProtocolError, ProtocolUsageError
from gateway.protocol.sqlstate import SqlState

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
_NONCE_BYTES = 18
#: A server asking for more than this many PBKDF2 iterations is treated as hostile
#: (PostgreSQL's default is 4096).
MAX_ITERATIONS = 1_000_000


class _Stage(Enum):
    INITIAL = auto()
    FIRST_SENT = auto()
    FINAL_SENT = auto()
    DONE = auto()


class ScramAuthenticationError(ProtocolError):
    """The server failed SCRAM verification or sent a SCRAM error."""

    sqlstate = SqlState.INVALID_AUTHORIZATION_SPECIFICATION


def saslprep(password: str) -> str:
    """RFC 4013 SASLprep, "stored strings" profile as PostgreSQL applies it.

    Raises ValueError when the string is not allowed (prohibited or unassigned
    code points, or bidirectional rule violations).
    """
    # 2.1 Mapping: non-ASCII space to SPACE; "commonly mapped to nothing" removed.
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if not stringprep.in_table_b1(ch)
    )
    # 2.2 Normalisation: NFKC.
    normalized = unicodedata.normalize("NFKC", mapped)
    if not normalized:
        return normalized
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21,
        stringprep.in_table_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    for ch in normalized:
        if any(check(ch) for check in prohibited):
            raise ValueError("password contains a character SASLprep prohibits")
    # 2.5 / RFC 3454 section 6: bidirectional characters.
    has_randal = any(stringprep.in_table_d1(ch) for ch in normalized)
    if has_randal:
        if any(stringprep.in_table_d2(ch) for ch in normalized):
            raise ValueError("password mixes right-to-left and left-to-right characters")
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            raise ValueError("right-to-left password must start and end with RandALCat")
    return normalized


def normalize_password(password: str) -> bytes:
    try:
        return saslprep(password).encode()
    except ValueError:
        return password.encode()


def _escape_username(username: str) -> str:
    """RFC 5802, 5.1: SASLprep the name (raw if it fails), then escape ``=`` and ``,``."""
    try:
        prepared = saslprep(username)
    except ValueError:
        prepared = username
    return prepared.replace("=", "=3D").replace(",", "=2C")


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _parse_attributes(message: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ProtocolError("malformed SCRAM message")
        attrs[part[0]] = part[2:]
    return attrs


class ScramClient:
    """One SCRAM-SHA-256(-PLUS) exchange from the client side."""

    def __init__(
        self,
        password: str,
        *,
        channel_binding: bytes | None = None,
        nonce: str | None = None,
        salted_password_cache: MutableMapping[tuple[bytes, int], bytes] | None = None,
        username: str = "",
        binding_supported: bool = False,
    ) -> None:
        self._password = normalize_password(password)
        self._channel_binding = channel_binding
        self._binding_supported = binding_supported
        self._username = _escape_username(username)
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(_NONCE_BYTES)).decode()
        self._cache = salted_password_cache
        self._stage = _Stage.INITIAL
        self._client_first_bare = ""
        self._expected_server_signature = b""

    @property
    def mechanism(self) -> str:
        return SCRAM_SHA_256_PLUS if self._channel_binding is not None else SCRAM_SHA_256

    @property
    def _gs2_header(self) -> str:
        # "p=" binds the channel; "y" says the client could bind but the server did
        # not offer it (downgrade detection); "n" says the client cannot bind.
        if self._channel_binding is not None:
            return "p=tls-server-end-point,,"
        return "y,," if self._binding_supported else "n,,"

    def _expect(self, stage: _Stage) -> None:
        if self._stage is not stage:
            raise ProtocolUsageError(f"SCRAM step called in stage {self._stage.name}")

    @property
    def is_done(self) -> bool:
        return self._stage is _Stage.DONE

    def client_first(self) -> bytes:
        self._expect(_Stage.INITIAL)
        self._client_first_bare = f"n={self._username},r={self._nonce}"
        self._stage = _Stage.FIRST_SENT
        return (self._gs2_header + self._client_first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        self._expect(_Stage.FIRST_SENT)
        try:
            server_first_text = server_first.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ProtocolError("SCRAM server-first-message is not ASCII") from exc
        attrs = _parse_attributes(server_first_text)
        if "e" in attrs:
            raise ScramAuthenticationError(f"server refused SCRAM: {attrs['e']}")
        if "m" in attrs:
            # RFC 5802, 5.1: an unknown mandatory extension must fail authentication.
            raise ProtocolError("SCRAM server-first-message has a mandatory extension")
        try:
            server_nonce = attrs["r"]
            salt = base64.b64decode(attrs["s"], validate=True)
            iterations = int(attrs["i"])
        except (KeyError, ValueError) as exc:
            raise ProtocolError("SCRAM server-first-message is malformed") from exc
        if not server_nonce.startswith(self._nonce) or len(server_nonce) <= len(self._nonce):
            raise ScramAuthenticationError("SCRAM server nonce does not extend the client nonce")
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise ProtocolError(f"SCRAM iteration count {iterations} is out of range")

        salted = self._salted_password(salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        server_key = _hmac(salted, b"Server Key")

        cbind_input = self._gs2_header.encode() + (self._channel_binding or b"")
        channel = base64.b64encode(cbind_input).decode()
        final_without_proof = f"c={channel},r={server_nonce}"
        auth_message = ",".join(
            (self._client_first_bare, server_first_text, final_without_proof)
        ).encode()
        client_signature = _hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
        self._expected_server_signature = _hmac(server_key, auth_message)
        self._stage = _Stage.FINAL_SENT
        return f"{final_without_proof},p={base64.b64encode(proof).decode()}".encode()

    def _salted_password(self, salt: bytes, iterations: int) -> bytes:
        key = (salt, iterations)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        salted = hashlib.pbkdf2_hmac("sha256", self._password, salt, iterations)
        if self._cache is not None:
            self._cache[key] = salted
        return salted

    def verify_server_final(self, server_final: bytes) -> None:
        self._expect(_Stage.FINAL_SENT)
        try:
            attrs = _parse_attributes(server_final.decode("ascii"))
        except UnicodeDecodeError as exc:
            raise ProtocolError("SCRAM server-final-message is not ASCII") from exc
        if "e" in attrs:
            raise ScramAuthenticationError(f"server refused SCRAM: {attrs['e']}")
        try:
            signature = base64.b64decode(attrs["v"], validate=True)
        except (KeyError, ValueError) as exc:
            raise ProtocolError("SCRAM server-final-message is malformed") from exc
        if not hmac.compare_digest(signature, self._expected_server_signature):
            raise ScramAuthenticationError(
                "the server's SCRAM signature is wrong: it does not know the password"
                " (possible impostor server)"
            )
        self._stage = _Stage.DONE


#: PostgreSQL's salt length for the SCRAM secrets it makes (scram-common.h,
#: SCRAM_DEFAULT_SALT_LEN).
SCRAM_SALT_BYTES = 16
#: PostgreSQL's iteration count for the SCRAM secrets it makes; fixed before
#: version 16, the default of the ``scram_iterations`` setting since.
SCRAM_DEFAULT_ITERATIONS = 4096
SCRAM_SECRET_PREFIX = "SCRAM-SHA-256$"


def scram_secret(password: str, *, iterations: int, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 secret of *password* as PostgreSQL stores it.

    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64 each;
    PostgreSQL 15 docs, 53.9 "pg_authid", after RFC 5803). StoredKey and
    ServerKey are RFC 5802's (section 3): the server keeps only these and
    verifies a client's proof with them, so a secret is what ``ALTER ROLE ...
    PASSWORD`` can be given instead of the password itself. The password is
    SASLprep-normalised as a client normalises it. A fresh random salt of
    :data:`SCRAM_SALT_BYTES` unless *salt* is given (tests).
    """
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ProtocolUsageError(f"SCRAM iteration count {iterations} is out of range")
    salt = secrets.token_bytes(SCRAM_SALT_BYTES) if salt is None else salt
    if not salt:
        raise ProtocolUsageError("a SCRAM salt cannot be empty")
    salted = hashlib.pbkdf2_hmac("sha256", normalize_password(password), salt, iterations)
    stored_key = hashlib.sha256(_hmac(salted, b"Client Key")).digest()
    server_key = _hmac(salted, b"Server Key")
    return f"{SCRAM_SECRET_PREFIX}{iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")

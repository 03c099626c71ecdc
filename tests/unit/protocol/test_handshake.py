"""Playbook tests for gateway.protocol.handshake.UpstreamHandshake.

Each test scripts the server side: server messages are built with
``messages.encode_message`` and read back through ``MessageReader``, and the
server's half of SCRAM is computed here with hashlib/hmac (RFC 5802, section 3).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest

from gateway.protocol import messages
from gateway.protocol.constants import AuthRequest, BackendType, FrontendType
from gateway.protocol.errors import ProtocolError, ProtocolUsageError
from gateway.protocol.framing import Message, MessageReader
from gateway.protocol.handshake import (
    HandshakeState,
    StartupRejected,
    UnsupportedAuthentication,
    UpstreamHandshake,
    md5_password,
)
from gateway.protocol.messages import BackendKey
from gateway.protocol.scram import ScramAuthenticationError

PASSWORD = "s3cr3t-pa55"
SALT = bytes(range(16))
ITERATIONS = 4096
BINDING = hashlib.sha256(b"upstream certificate").digest()


# --- helpers ----------------------------------------------------------------------


def msg(raw: bytes) -> Message:
    """Read one whole message back out of ``raw``, as the network shell would."""
    reader = MessageReader(max_length=1 << 16)
    reader.feed(raw)
    message = reader.next_message()
    assert message is not None
    assert reader.buffered == 0
    return message


def auth(code: int, data: bytes = b"") -> bytes:
    return messages.encode_message(BackendType.AUTHENTICATION, struct.pack("!I", code) + data)


def sasl(*mechanisms: str) -> bytes:
    return auth(AuthRequest.SASL, b"".join(m.encode() + b"\x00" for m in mechanisms) + b"\x00")


AUTH_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
PARAM_VERSION = messages.encode_message(BackendType.PARAMETER_STATUS, b"server_version\x0016.2\x00")
PARAM_ENCODING = messages.encode_message(
    BackendType.PARAMETER_STATUS, b"client_encoding\x00UTF8\x00"
)
KEY_DATA = messages.encode_message(
    BackendType.BACKEND_KEY_DATA, b"\x00\x00\x30\x39\xca\xfe\xba\xbe"
)
NOTICE = messages.encode_message(
    BackendType.NOTICE_RESPONSE, b"SNOTICE\x00VNOTICE\x00C00000\x00Mhello\x00\x00"
)
READY = messages.encode_message(BackendType.READY_FOR_QUERY, b"I")
AUTH_ERROR = messages.encode_message(
    BackendType.ERROR_RESPONSE,
    b'SFATAL\x00VFATAL\x00C28P01\x00Mpassword authentication failed for user "app"\x00\x00',
)


def handshake(
    *,
    encrypted: bool = False,
    channel_binding: bytes | None = None,
    salted_password_cache: dict[tuple[bytes, int], bytes] | None = None,
) -> UpstreamHandshake:
    hs = UpstreamHandshake(
        user="app",
        database="appdb",
        password=PASSWORD,
        encrypted=encrypted,
        channel_binding=channel_binding,
        salted_password_cache=salted_password_cache,
    )
    hs.start()
    return hs


def client_message(raw: bytes, expected_type: int = FrontendType.PASSWORD_MESSAGE) -> bytes:
    message = msg(raw)
    assert message.type == expected_type
    return message.body


class ScramServer:
    """The server side of SCRAM-SHA-256, from RFC 5802 section 3."""

    def __init__(self, password: str) -> None:
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), SALT, ITERATIONS)
        self.client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        self.stored_key = hashlib.sha256(self.client_key).digest()
        self.server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def on_initial_response(self, raw: bytes, mechanism: str) -> bytes:
        body = client_message(raw)
        name, rest = body.split(b"\x00", 1)
        assert name.decode() == mechanism
        (length,) = struct.unpack_from("!i", rest)
        client_first = rest[4:]
        assert length == len(client_first)
        gs2_end = client_first.index(b",", client_first.index(b",") + 1) + 1
        self.gs2_header = client_first[:gs2_end]
        self.client_first_bare = client_first[gs2_end:].decode()
        assert self.client_first_bare.startswith("n=,r=")  # PostgreSQL: empty user name
        self.nonce = self.client_first_bare[len("n=,r=") :] + "3rfcNHYJY1ZVvWVs7j"
        salt = base64.b64encode(SALT).decode()
        self.server_first = f"r={self.nonce},s={salt},i={ITERATIONS}"
        return auth(AuthRequest.SASL_CONTINUE, self.server_first.encode())

    def on_response(self, raw: bytes, binding: bytes = b"") -> bytes:
        client_final = client_message(raw).decode()
        without_proof, proof_b64 = client_final.rsplit(",p=", 1)
        channel = base64.b64encode(self.gs2_header + binding).decode()
        assert without_proof == f"c={channel},r={self.nonce}"
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        signature = hmac.new(self.stored_key, auth_message, hashlib.sha256).digest()
        proof = base64.b64decode(proof_b64)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        assert hmac.compare_digest(hashlib.sha256(client_key).digest(), self.stored_key)
        verifier = hmac.new(self.server_key, auth_message, hashlib.sha256).digest()
        return auth(AuthRequest.SASL_FINAL, b"v=" + base64.b64encode(verifier))


# --- start ----------------------------------------------------------------------------


def test_start_sends_a_startup_message_with_user_database_and_params() -> None:
    hs = UpstreamHandshake(
        user="app",
        database="appdb",
        password=PASSWORD,
        params={"application_name": "pam", "user": "ignored", "database": "ignored"},
    )
    assert hs.start() == (
        b"\x00\x00\x00\x36\x00\x03\x00\x00"  # 54 = 4 + 4 + 9 + 15 + 21 + 1
        b"user\x00app\x00database\x00appdb\x00application_name\x00pam\x00\x00"
    )


def test_start_twice_is_a_usage_error() -> None:
    hs = handshake()
    with pytest.raises(ProtocolUsageError, match="already started"):
        hs.start()


def test_receive_before_start_is_a_usage_error() -> None:
    hs = UpstreamHandshake(user="app", database="appdb", password=PASSWORD)
    with pytest.raises(ProtocolUsageError):
        hs.receive(msg(AUTH_OK))


def test_repr_shows_neither_the_password_nor_the_cancel_secret() -> None:
    hs = handshake()
    for raw in (AUTH_OK, KEY_DATA, READY):
        hs.receive(msg(raw))
    text = repr(hs)
    assert PASSWORD not in text
    assert "\\xca\\xfe" not in text
    assert "cafebabe" not in text
    assert "BackendKey(pid=12345, secret=<4 bytes>)" in text


# --- SCRAM ----------------------------------------------------------------------------


def test_scram_full_flow_against_an_independent_server() -> None:
    hs = handshake()
    server = ScramServer(PASSWORD)
    initial = hs.receive(msg(sasl("SCRAM-SHA-256")))
    assert initial[:1] == b"p"
    continue_ = server.on_initial_response(initial, "SCRAM-SHA-256")
    assert server.gs2_header == b"n,,"
    final = server.on_response(hs.receive(msg(continue_)))
    assert hs.receive(msg(final)) == b""
    assert hs.receive(msg(AUTH_OK)) == b""
    assert hs.auth_method == "scram-sha-256"
    assert not hs.is_ready


def test_scram_fills_the_shared_salted_password_cache() -> None:
    cache: dict[tuple[bytes, int], bytes] = {}
    hs = handshake(salted_password_cache=cache)
    server = ScramServer(PASSWORD)
    continue_ = server.on_initial_response(hs.receive(msg(sasl("SCRAM-SHA-256"))), "SCRAM-SHA-256")
    hs.receive(msg(server.on_response(hs.receive(msg(continue_)))))
    expected = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), SALT, ITERATIONS)
    assert cache == {(SALT, ITERATIONS): expected}


def test_scram_plus_is_chosen_when_binding_is_given_and_the_server_lists_it() -> None:
    hs = handshake(encrypted=True, channel_binding=BINDING)
    server = ScramServer(PASSWORD)
    initial = hs.receive(msg(sasl("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")))
    continue_ = server.on_initial_response(initial, "SCRAM-SHA-256-PLUS")
    assert server.gs2_header == b"p=tls-server-end-point,,"
    final = server.on_response(hs.receive(msg(continue_)), binding=BINDING)
    hs.receive(msg(final))
    hs.receive(msg(AUTH_OK))
    assert hs.auth_method == "scram-sha-256-plus"


def test_plain_scram_is_chosen_without_binding_even_if_the_server_lists_plus() -> None:
    hs = handshake(encrypted=True)
    server = ScramServer(PASSWORD)
    initial = hs.receive(msg(sasl("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")))
    server.on_initial_response(initial, "SCRAM-SHA-256")
    assert server.gs2_header == b"n,,"
    assert hs.auth_method == "scram-sha-256"


def test_plain_scram_with_y_is_chosen_when_the_server_does_not_list_plus() -> None:
    hs = handshake(encrypted=True, channel_binding=BINDING)
    server = ScramServer(PASSWORD)
    initial = hs.receive(msg(sasl("SCRAM-SHA-256")))
    continue_ = server.on_initial_response(initial, "SCRAM-SHA-256")
    # RFC 5802, 6: "y" tells a binding-capable server that -PLUS was stripped.
    assert server.gs2_header == b"y,,"
    hs.receive(msg(server.on_response(hs.receive(msg(continue_)))))
    hs.receive(msg(AUTH_OK))
    assert hs.auth_method == "scram-sha-256"


def test_scram_plus_alone_without_binding_is_unsupported() -> None:
    hs = handshake()
    with pytest.raises(UnsupportedAuthentication, match=r"SASL \(SCRAM-SHA-256-PLUS\)") as info:
        hs.receive(msg(sasl("SCRAM-SHA-256-PLUS")))
    assert info.value.method == "SASL (SCRAM-SHA-256-PLUS)"


def test_an_empty_sasl_mechanism_list_is_unsupported() -> None:
    with pytest.raises(UnsupportedAuthentication, match=r"SASL \(no mechanism\)"):
        handshake().receive(msg(sasl()))


def test_authentication_ok_before_sasl_final_is_rejected() -> None:
    hs = handshake()
    server = ScramServer(PASSWORD)
    continue_ = server.on_initial_response(hs.receive(msg(sasl("SCRAM-SHA-256"))), "SCRAM-SHA-256")
    hs.receive(msg(continue_))
    with pytest.raises(ProtocolError, match="before completing SCRAM"):
        hs.receive(msg(AUTH_OK))


def test_authentication_ok_right_after_sasl_is_rejected() -> None:
    hs = handshake()
    hs.receive(msg(sasl("SCRAM-SHA-256")))
    with pytest.raises(ProtocolError, match="before completing SCRAM"):
        hs.receive(msg(AUTH_OK))


def test_a_wrong_server_signature_fails_the_handshake() -> None:
    hs = handshake()
    server = ScramServer("another password")
    continue_ = server.on_initial_response(hs.receive(msg(sasl("SCRAM-SHA-256"))), "SCRAM-SHA-256")
    hs.receive(msg(continue_))
    forged = auth(AuthRequest.SASL_FINAL, b"v=" + base64.b64encode(b"\x00" * 32))
    with pytest.raises(ScramAuthenticationError, match="signature is wrong"):
        hs.receive(msg(forged))


def test_sasl_continue_twice_is_the_servers_fault() -> None:
    hs = handshake()
    server = ScramServer(PASSWORD)
    continue_ = server.on_initial_response(hs.receive(msg(sasl("SCRAM-SHA-256"))), "SCRAM-SHA-256")
    hs.receive(msg(continue_))
    with pytest.raises(ProtocolError, match="SASLContinue out of order") as info:
        hs.receive(msg(continue_))
    assert not isinstance(info.value, ProtocolUsageError)


def test_sasl_final_before_sasl_continue_is_the_servers_fault() -> None:
    hs = handshake()
    hs.receive(msg(sasl("SCRAM-SHA-256")))
    with pytest.raises(ProtocolError, match="SASLFinal out of order"):
        hs.receive(msg(auth(AuthRequest.SASL_FINAL, b"v=AAAA")))


def test_sasl_continue_without_sasl_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="SASLContinue without SASL"):
        handshake().receive(msg(auth(AuthRequest.SASL_CONTINUE, b"r=x,s=AAAA,i=1")))


def test_sasl_final_without_sasl_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="SASLFinal without SASL"):
        handshake().receive(msg(auth(AuthRequest.SASL_FINAL, b"v=AAAA")))


def test_a_second_sasl_request_is_rejected() -> None:
    hs = handshake()
    hs.receive(msg(sasl("SCRAM-SHA-256")))
    with pytest.raises(ProtocolError, match="restarted SASL"):
        hs.receive(msg(sasl("SCRAM-SHA-256")))


# --- MD5 and cleartext -------------------------------------------------------------------


def test_md5_password_matches_an_independent_computation() -> None:
    inner = hashlib.md5(b"secret" + b"md5_app", usedforsecurity=False).hexdigest().encode()
    outer = hashlib.md5(inner + b"\x01\x02\x03\x04", usedforsecurity=False).hexdigest().encode()
    assert md5_password("md5_app", "secret", b"\x01\x02\x03\x04") == b"md5" + outer
    assert md5_password("md5_app", "secret", b"\x01\x02\x03\x04") == (
        b"md539225df3db7633451d98add8c2151451"
    )


def test_md5_flow_sends_the_exact_password_message() -> None:
    hs = UpstreamHandshake(user="md5_app", database="db", password="secret")
    hs.start()
    reply = hs.receive(msg(auth(AuthRequest.MD5_PASSWORD, b"\x01\x02\x03\x04")))
    assert reply == b"p\x00\x00\x00\x28md539225df3db7633451d98add8c2151451\x00"
    assert hs.auth_method == "md5"
    assert hs.receive(msg(AUTH_OK)) == b""


@pytest.mark.parametrize("salt", [b"", b"\x01\x02\x03", b"\x01\x02\x03\x04\x05"])
def test_md5_with_a_salt_not_four_bytes_long_is_rejected(salt: bytes) -> None:
    with pytest.raises(ProtocolError, match="4-byte salt"):
        handshake().receive(msg(auth(AuthRequest.MD5_PASSWORD, salt)))


def test_cleartext_is_refused_on_an_unencrypted_leg() -> None:
    with pytest.raises(UnsupportedAuthentication, match="only sends over TLS") as info:
        handshake(encrypted=False).receive(msg(auth(AuthRequest.CLEARTEXT_PASSWORD)))
    assert info.value.method == "cleartext password"
    assert PASSWORD not in str(info.value)


def test_cleartext_is_sent_on_an_encrypted_leg() -> None:
    hs = handshake(encrypted=True)
    reply = hs.receive(msg(auth(AuthRequest.CLEARTEXT_PASSWORD)))
    assert reply == b"p\x00\x00\x00\x10s3cr3t-pa55\x00"
    assert hs.auth_method == "password"


# --- unsupported methods -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (AuthRequest.KERBEROS_V5, "Kerberos V5"),
        (AuthRequest.GSS, "GSSAPI"),
        (AuthRequest.SSPI, "SSPI"),
        (99, "an unknown method (code 99)"),
    ],
)
def test_unsupported_methods_are_refused_by_name(code: int, name: str) -> None:
    with pytest.raises(UnsupportedAuthentication) as info:
        handshake().receive(msg(auth(code)))
    assert info.value.method == name
    assert str(info.value).startswith(f"upstream server requested {name} authentication,")
    assert info.value.sqlstate == "08004"


# --- errors from the server ------------------------------------------------------------------


def test_an_error_during_authentication_is_startup_rejected_with_raw_bytes() -> None:
    hs = handshake()
    with pytest.raises(StartupRejected) as info:
        hs.receive(msg(AUTH_ERROR))
    error = info.value
    assert error.during_auth is True
    assert error.raw == AUTH_ERROR
    assert error.fields.fields == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28P01",
        "M": 'password authentication failed for user "app"',
    }
    assert error.sqlstate == "28P01"
    assert error.message == 'password authentication failed for user "app"'


def test_an_error_after_authentication_is_not_during_auth() -> None:
    hs = handshake()
    hs.receive(msg(AUTH_OK))
    raw = messages.error_response("FATAL", "3D000", 'database "appdb" does not exist')
    with pytest.raises(StartupRejected) as info:
        hs.receive(msg(raw))
    assert info.value.during_auth is False
    assert info.value.raw == raw
    assert info.value.sqlstate == "3D000"


def test_an_error_without_sqlstate_defaults_to_08000() -> None:
    raw = messages.encode_message(BackendType.ERROR_RESPONSE, b"SFATAL\x00Mno\x00\x00")
    with pytest.raises(StartupRejected) as info:
        handshake().receive(msg(raw))
    assert info.value.sqlstate == "08000"


# --- after AuthenticationOk ---------------------------------------------------------------------


def test_startup_messages_after_auth_are_collected_in_order_as_original_bytes() -> None:
    hs = handshake()
    assert hs.receive(msg(AUTH_OK)) == b""
    for raw in (PARAM_VERSION, NOTICE, PARAM_ENCODING, KEY_DATA, READY):
        assert hs.receive(msg(raw)) == b""
    assert hs.forward == [PARAM_VERSION, NOTICE, PARAM_ENCODING, KEY_DATA, READY]
    assert hs.parameters == {"server_version": "16.2", "client_encoding": "UTF8"}
    assert hs.backend_key == BackendKey(12345, b"\xca\xfe\xba\xbe")
    assert hs.is_ready
    assert hs.auth_method == "trust"


def test_not_ready_until_ready_for_query() -> None:
    hs = handshake()
    for raw in (AUTH_OK, PARAM_VERSION, KEY_DATA):
        hs.receive(msg(raw))
    assert not hs.is_ready


def test_receive_after_ready_is_a_usage_error() -> None:
    hs = handshake()
    hs.receive(msg(AUTH_OK))
    hs.receive(msg(READY))
    with pytest.raises(ProtocolUsageError, match="not expecting messages"):
        hs.receive(msg(READY))


def test_a_notice_before_authentication_is_not_forwarded() -> None:
    hs = handshake()
    assert hs.receive(msg(NOTICE)) == b""
    hs.receive(msg(AUTH_OK))
    assert hs.forward == []


def test_an_unexpected_message_before_authentication_is_a_protocol_error() -> None:
    raw = messages.encode_message(BackendType.DATA_ROW, b"\x00\x00")
    with pytest.raises(ProtocolError, match=r"unexpected message b'D' from server before auth"):
        handshake().receive(msg(raw))


def test_an_unexpected_message_after_authentication_is_a_protocol_error() -> None:
    hs = handshake()
    hs.receive(msg(AUTH_OK))
    raw = messages.encode_message(BackendType.ROW_DESCRIPTION, b"\x00\x00")
    with pytest.raises(ProtocolError, match=r"unexpected message b'T' during startup"):
        hs.receive(msg(raw))


def test_a_malformed_ready_for_query_is_a_protocol_error() -> None:
    hs = handshake()
    hs.receive(msg(AUTH_OK))
    with pytest.raises(ProtocolError):
        hs.receive(msg(messages.encode_message(BackendType.READY_FOR_QUERY, b"Q")))
    assert not hs.is_ready


def test_authentication_ok_twice_is_a_protocol_error() -> None:
    hs = handshake()
    hs.receive(msg(AUTH_OK))
    with pytest.raises(ProtocolError, match="AuthenticationOk twice"):
        hs.receive(msg(AUTH_OK))


def test_an_authentication_request_after_ok_is_a_protocol_error() -> None:
    hs = handshake()
    hs.receive(msg(AUTH_OK))
    with pytest.raises(ProtocolError, match="after AuthenticationOk"):
        hs.receive(msg(auth(AuthRequest.MD5_PASSWORD, b"\x01\x02\x03\x04")))


def test_a_short_authentication_message_is_a_protocol_error() -> None:
    raw = messages.encode_message(BackendType.AUTHENTICATION, b"\x00\x00")
    with pytest.raises(ProtocolError, match="too short"):
        handshake().receive(msg(raw))


# --- the state enum ---------------------------------------------------------------------


def test_states_run_new_authenticating_authenticated_ready() -> None:
    hs = UpstreamHandshake(user="app", database="appdb", password=PASSWORD)
    assert hs.state is HandshakeState.NEW
    hs.start()
    assert hs.state is HandshakeState.AUTHENTICATING
    hs.receive(msg(AUTH_OK))
    assert hs.state is HandshakeState.AUTHENTICATED
    hs.receive(msg(KEY_DATA))
    hs.receive(msg(READY))
    assert hs.state is HandshakeState.READY
    assert hs.is_ready


@pytest.mark.parametrize(
    "raw",
    [AUTH_ERROR, READY, auth(AuthRequest.GSS)],
    ids=["error-response", "ready-before-auth", "unsupported-method"],
)
def test_a_refusal_or_violation_leaves_the_error_state_and_takes_no_more(raw: bytes) -> None:
    hs = handshake()
    with pytest.raises((StartupRejected, ProtocolError, UnsupportedAuthentication)):
        hs.receive(msg(raw))
    assert hs.state is HandshakeState.ERROR
    assert not hs.is_ready
    with pytest.raises(ProtocolUsageError, match="not expecting messages"):
        hs.receive(msg(AUTH_OK))

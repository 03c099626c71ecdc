"""Tests for gateway.protocol.scram: RFC 7677 vector, PostgreSQL's variant, SASLprep.

The expected values on the server side are computed here with hashlib/hmac, from
RFC 5802 section 3, independently of the client under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable

import pytest

from gateway.protocol.errors import ProtocolError, ProtocolUsageError
from gateway.protocol.scram import (
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    ScramAuthenticationError,
    ScramClient,
    normalize_password,
    saslprep,
    scram_secret,
)

# RFC 7677, section 3.
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

SALT = b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10"
ITERATIONS = 4096


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class ScramServer:
    """An independent RFC 5802 server side for one exchange."""

    def __init__(self, password: bytes, salt: bytes = SALT, iterations: int = ITERATIONS) -> None:
        salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        self.client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        self.stored_key = hashlib.sha256(self.client_key).digest()
        self.server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self.salt = salt
        self.iterations = iterations

    def first(self, client_first: bytes, server_nonce_suffix: str = "SrvNonce") -> bytes:
        gs2_end = client_first.index(b",", client_first.index(b",") + 1) + 1
        self.gs2_header = client_first[:gs2_end]
        self.client_first_bare = client_first[gs2_end:].decode()
        client_nonce = self.client_first_bare.split(",r=", 1)[1]
        self.nonce = client_nonce + server_nonce_suffix
        self.server_first = f"r={self.nonce},s={b64(self.salt)},i={self.iterations}"
        return self.server_first.encode()

    def final(self, client_final: bytes, binding: bytes = b"") -> bytes:
        without_proof, proof_attr = client_final.decode().rsplit(",p=", 1)
        assert without_proof == f"c={b64(self.gs2_header + binding)},r={self.nonce}"
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        signature = hmac.new(self.stored_key, auth_message, hashlib.sha256).digest()
        proof = base64.b64decode(proof_attr)
        recovered_client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        assert hashlib.sha256(recovered_client_key).digest() == self.stored_key
        server_signature = hmac.new(self.server_key, auth_message, hashlib.sha256).digest()
        return f"v={b64(server_signature)}".encode()


def run_exchange(client: ScramClient, server: ScramServer, binding: bytes = b"") -> None:
    server_first = server.first(client.client_first())
    server_final = server.final(client.client_final(server_first), binding)
    client.verify_server_final(server_final)


# --- RFC 7677 test vector ---------------------------------------------------------


def test_rfc7677_client_first_message() -> None:
    client = ScramClient("pencil", nonce=RFC_NONCE, username="user")
    assert client.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"


def test_rfc7677_client_final_message_is_byte_exact() -> None:
    client = ScramClient("pencil", nonce=RFC_NONCE, username="user")
    client.client_first()
    assert client.client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL


def test_rfc7677_server_final_message_is_accepted() -> None:
    client = ScramClient("pencil", nonce=RFC_NONCE, username="user")
    client.client_first()
    client.client_final(RFC_SERVER_FIRST)
    assert not client.is_done
    client.verify_server_final(RFC_SERVER_FINAL)
    assert client.is_done


# --- PostgreSQL's variant: empty user name ------------------------------------------


def test_postgres_client_first_message_has_an_empty_user_name() -> None:
    client = ScramClient("pencil", nonce=RFC_NONCE)
    assert client.client_first() == b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"


def test_postgres_client_final_with_the_rfc_server_first_has_its_own_proof() -> None:
    # Same inputs as RFC 7677 but "n=," in the auth message: computed independently.
    salted = hashlib.pbkdf2_hmac(
        "sha256", b"pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096
    )
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = RFC_CLIENT_FINAL.rsplit(b",p=", 1)[0]
    auth_message = b"n=,r=" + RFC_NONCE.encode() + b"," + RFC_SERVER_FIRST + b"," + without_proof
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))

    client = ScramClient("pencil", nonce=RFC_NONCE)
    client.client_first()
    assert client.client_final(RFC_SERVER_FIRST) == without_proof + b",p=" + b64(proof).encode()
    # The RFC's server signature was computed over "n=user": it must not verify here.
    with pytest.raises(ScramAuthenticationError):
        client.verify_server_final(RFC_SERVER_FINAL)


def test_full_exchange_against_an_independent_server() -> None:
    client = ScramClient("correct horse", nonce="fyko+d2lbbFgONRv9qkxdawL")
    run_exchange(client, ScramServer(b"correct horse"))
    assert client.is_done


def test_user_name_is_escaped_per_rfc5802() -> None:
    client = ScramClient("pw", nonce="abc", username="a=b,c")
    assert client.client_first() == b"n,,n=a=3Db=2Cc,r=abc"


def test_user_name_is_saslprepped_before_escaping() -> None:
    client = ScramClient("pw", nonce="abc", username="I\u00adX=")
    assert client.client_first() == b"n,,n=IX=3D,r=abc"


def test_a_user_name_saslprep_rejects_is_sent_raw() -> None:
    client = ScramClient("pw", nonce="abc", username="a\u0007,")
    assert client.client_first() == b"n,,n=a\x07=2C,r=abc"


def test_mechanism_is_plain_without_channel_binding() -> None:
    assert ScramClient("pw").mechanism == SCRAM_SHA_256 == "SCRAM-SHA-256"


def test_random_nonces_are_24_base64_characters_and_differ() -> None:
    first = ScramClient("pw").client_first()
    second = ScramClient("pw").client_first()
    assert first.startswith(b"n,,n=,r=")
    nonce = first[len(b"n,,n=,r=") :]
    assert len(nonce) == 24
    assert len(base64.b64decode(nonce, validate=True)) == 18
    assert first != second


# --- verification failures -----------------------------------------------------------


def started_client() -> ScramClient:
    client = ScramClient("pencil", nonce=RFC_NONCE, username="user")
    client.client_first()
    return client


def test_a_wrong_server_signature_is_refused() -> None:
    client = started_client()
    client.client_final(RFC_SERVER_FIRST)
    wrong = b"v=" + b64(b"\x00" * 32).encode()
    with pytest.raises(ScramAuthenticationError, match="signature is wrong"):
        client.verify_server_final(wrong)
    assert not client.is_done


def test_a_server_that_does_not_know_the_password_is_refused() -> None:
    client = ScramClient("pencil", nonce="clientnonce")
    server = ScramServer(b"not pencil")
    server_first = server.first(client.client_first())
    client_final = client.client_final(server_first)
    without_proof = client_final.rsplit(b",p=", 1)[0].decode()
    auth = f"{server.client_first_bare},{server.server_first},{without_proof}".encode()
    forged = b"v=" + b64(hmac.new(server.server_key, auth, hashlib.sha256).digest()).encode()
    with pytest.raises(ScramAuthenticationError):
        client.verify_server_final(forged)


def test_a_server_nonce_not_extending_the_client_nonce_is_refused() -> None:
    client = started_client()
    with pytest.raises(ScramAuthenticationError, match="does not extend"):
        client.client_final(b"r=someoneElsesNonce123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")


def test_a_server_nonce_equal_to_the_client_nonce_is_refused() -> None:
    client = started_client()
    with pytest.raises(ScramAuthenticationError, match="does not extend"):
        client.client_final(b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")


def test_a_server_error_in_server_first_is_an_authentication_error() -> None:
    client = started_client()
    with pytest.raises(ScramAuthenticationError, match="server refused SCRAM: unknown-user"):
        client.client_final(b"e=unknown-user")


def test_a_server_error_in_server_final_is_an_authentication_error() -> None:
    client = started_client()
    client.client_final(RFC_SERVER_FIRST)
    with pytest.raises(ScramAuthenticationError, match="server refused SCRAM: invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")


def test_scram_authentication_error_is_a_protocol_error_with_sqlstate_28000() -> None:
    assert issubclass(ScramAuthenticationError, ProtocolError)
    assert ScramAuthenticationError("x").sqlstate == "28000"


@pytest.mark.parametrize(
    "server_first",
    [
        b"",
        b"garbage",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,i=4096",  # no salt
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==",  # no iteration count
        b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # no nonce
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=not*base64,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=many",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1000001",
        b"r=rOprNGfwEbeRWgbNEkqO\xc3\xa9,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # not ASCII
        b"m=ext,r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    ],
)
def test_a_malformed_server_first_message_is_a_protocol_error(server_first: bytes) -> None:
    with pytest.raises(ProtocolError):
        started_client().client_final(server_first)


def test_a_mandatory_extension_in_server_first_is_refused() -> None:
    with pytest.raises(ProtocolError, match="mandatory extension"):
        started_client().client_final(
            b"m=ext,r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        )


@pytest.mark.parametrize("server_final", [b"", b"x=1", b"v=not*base64", b"v=\xff", b"garbage"])
def test_a_malformed_server_final_message_is_a_protocol_error(server_final: bytes) -> None:
    client = started_client()
    client.client_final(RFC_SERVER_FIRST)
    with pytest.raises(ProtocolError):
        client.verify_server_final(server_final)
    assert not client.is_done


# --- stage checks --------------------------------------------------------------------


def test_client_final_before_client_first_is_a_usage_error() -> None:
    with pytest.raises(ProtocolUsageError, match="stage INITIAL"):
        ScramClient("pencil").client_final(RFC_SERVER_FIRST)


def test_verify_before_client_final_is_a_usage_error() -> None:
    with pytest.raises(ProtocolUsageError, match="stage FIRST_SENT"):
        started_client().verify_server_final(RFC_SERVER_FINAL)


def test_client_first_twice_is_a_usage_error() -> None:
    client = started_client()
    with pytest.raises(ProtocolUsageError, match="stage FIRST_SENT"):
        client.client_first()


def test_client_final_twice_is_a_usage_error() -> None:
    client = started_client()
    client.client_final(RFC_SERVER_FIRST)
    with pytest.raises(ProtocolUsageError, match="stage FINAL_SENT"):
        client.client_final(RFC_SERVER_FIRST)


def test_verify_after_done_is_a_usage_error() -> None:
    client = started_client()
    client.client_final(RFC_SERVER_FIRST)
    client.verify_server_final(RFC_SERVER_FINAL)
    with pytest.raises(ProtocolUsageError, match="stage DONE"):
        client.verify_server_final(RFC_SERVER_FINAL)


# --- channel binding ------------------------------------------------------------------

BINDING = hashlib.sha256(b"server certificate DER").digest()


def test_channel_binding_selects_the_plus_mechanism() -> None:
    assert ScramClient("pw", channel_binding=BINDING).mechanism == SCRAM_SHA_256_PLUS


def test_channel_binding_gs2_header_names_tls_server_end_point() -> None:
    client = ScramClient("pw", channel_binding=BINDING, nonce="abc")
    assert client.client_first() == b"p=tls-server-end-point,,n=,r=abc"


def test_channel_binding_c_attribute_is_gs2_header_plus_binding_data() -> None:
    client = ScramClient("pw", channel_binding=BINDING, nonce="abc")
    client.client_first()
    final = client.client_final(b"r=abcdef,s=" + b64(SALT).encode() + b",i=4096")
    expected_c = b64(b"p=tls-server-end-point,," + BINDING)
    assert final.startswith(f"c={expected_c},r=abcdef,p=".encode())


def test_channel_bound_exchange_against_an_independent_server() -> None:
    client = ScramClient("pw", channel_binding=BINDING)
    run_exchange(client, ScramServer(b"pw"), binding=BINDING)
    assert client.is_done


def test_a_client_able_to_bind_but_not_offered_plus_sends_y() -> None:
    client = ScramClient("pw", nonce="abc", binding_supported=True)
    assert client.mechanism == SCRAM_SHA_256
    assert client.client_first() == b"y,,n=,r=abc"
    final = client.client_final(b"r=abcdef,s=" + b64(SALT).encode() + b",i=4096")
    assert final.startswith(b"c=eSws,r=abcdef,p=")  # base64("y,,")


def test_without_channel_binding_the_c_attribute_is_biws() -> None:
    client = ScramClient("pw", nonce="abc")
    client.client_first()
    final = client.client_final(b"r=abcdef,s=" + b64(SALT).encode() + b",i=4096")
    assert final.startswith(b"c=biws,r=abcdef,p=")  # base64("n,,")


# --- salted password cache ---------------------------------------------------------------


def test_the_cache_is_filled_with_the_salted_password() -> None:
    cache: dict[tuple[bytes, int], bytes] = {}
    run_exchange(ScramClient("pw", salted_password_cache=cache), ScramServer(b"pw"))
    assert cache == {(SALT, ITERATIONS): hashlib.pbkdf2_hmac("sha256", b"pw", SALT, ITERATIONS)}


def test_a_second_exchange_with_the_same_salt_reuses_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache: dict[tuple[bytes, int], bytes] = {}
    run_exchange(ScramClient("pw", salted_password_cache=cache), ScramServer(b"pw"))
    # Build the second server before patching: it derives its keys with pbkdf2 too.
    server = ScramServer(b"pw")
    calls: list[tuple[bytes, int]] = []
    real: Callable[..., bytes] = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append((salt, iterations))
        return real(name, password, salt, iterations)

    monkeypatch.setattr("gateway.protocol.scram.hashlib.pbkdf2_hmac", counting)
    client = ScramClient("pw", salted_password_cache=cache)
    run_exchange(client, server)
    assert client.is_done
    assert calls == []


def test_a_different_iteration_count_is_derived_and_cached_separately() -> None:
    cache: dict[tuple[bytes, int], bytes] = {}
    run_exchange(ScramClient("pw", salted_password_cache=cache), ScramServer(b"pw"))
    run_exchange(
        ScramClient("pw", salted_password_cache=cache), ScramServer(b"pw", iterations=4097)
    )
    assert sorted(cache) == [(SALT, 4096), (SALT, 4097)]


def test_without_a_cache_every_exchange_derives_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    server = ScramServer(b"pw")
    calls: list[int] = []
    real: Callable[..., bytes] = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append(iterations)
        return real(name, password, salt, iterations)

    monkeypatch.setattr("gateway.protocol.scram.hashlib.pbkdf2_hmac", counting)
    run_exchange(ScramClient("pw"), server)
    assert calls == [ITERATIONS]


# --- SASLprep (RFC 4013, section 3 examples and more) ---------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("I\u00adX", "IX"),  # soft hyphen mapped to nothing
        ("user", "user"),
        ("USER", "USER"),
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("a\u00a0b", "a b"),  # non-ASCII space mapped to SPACE
        ("a\u3000b", "a b"),  # ideographic space mapped to SPACE
        ("a\u200bb", "ab"),  # zero width space mapped to nothing
        ("", ""),
        ("\u0627", "\u0627"),  # right-to-left only is fine
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628"),
    ],
)
def test_saslprep_maps_and_normalises(given: str, expected: str) -> None:
    assert saslprep(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        "\u0007",  # ASCII control
        "a\u0000b",
        "\u0627\u0031",  # RandALCat string must end with RandALCat
        "\u0627a\u0627",  # RandALCat and LCat mixed
        "a\ue000",  # private use
        "\u0221",  # unassigned in Unicode 3.2
        "a\ufffd",  # replacement character: inappropriate for plain text
    ],
)
def test_saslprep_rejects_prohibited_strings(given: str) -> None:
    with pytest.raises(ValueError):
        saslprep(given)


def test_normalize_password_applies_saslprep() -> None:
    assert normalize_password("I\u00adX") == b"IX"
    assert normalize_password("\u2168") == b"IX"


def test_normalize_password_falls_back_to_raw_utf8_for_prohibited_input() -> None:
    assert normalize_password("\u0007") == b"\x07"
    assert normalize_password("\u0627\u0031") == b"\xd8\xa7\x31"


def test_a_saslprepped_password_authenticates_with_its_normalised_form() -> None:
    client = ScramClient("I\u00adX")
    run_exchange(client, ScramServer(b"IX"))
    assert client.is_done


# --- the secret a server keeps ----------------------------------------------------------


def _secret_parts(secret: str) -> tuple[int, bytes, bytes, bytes]:
    mechanism, rest = secret.split("$", 1)
    assert mechanism == "SCRAM-SHA-256"
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored, server = keys.split(":")
    return (
        int(iterations),
        base64.b64decode(salt, validate=True),
        base64.b64decode(stored, validate=True),
        base64.b64decode(server, validate=True),
    )


def test_the_secret_of_the_rfc_7677_password_verifies_its_published_proof_and_signature() -> None:
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    secret = scram_secret("pencil", iterations=4096, salt=salt)
    iterations, got_salt, stored_key, server_key = _secret_parts(secret)
    assert (iterations, got_salt) == (4096, salt)
    # A server holding only the secret checks the RFC's client proof (RFC 5802, 3)...
    final_without_proof, proof = RFC_CLIENT_FINAL.rsplit(b",p=", 1)
    auth_message = b",".join(
        (b"n=user,r=" + RFC_NONCE.encode(), RFC_SERVER_FIRST, final_without_proof)
    )
    client_signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    client_key = bytes(
        a ^ b for a, b in zip(base64.b64decode(proof), client_signature, strict=True)
    )
    assert hashlib.sha256(client_key).digest() == stored_key
    # ...and signs as the RFC's server did.
    signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
    assert b"v=" + base64.b64encode(signature) == RFC_SERVER_FINAL


def test_a_secret_has_a_fresh_16_byte_salt_and_the_iterations_asked_for() -> None:
    first, second = scram_secret("pw", iterations=4096), scram_secret("pw", iterations=10000)
    assert first != second
    (i1, salt1, *_), (i2, salt2, *_) = _secret_parts(first), _secret_parts(second)
    assert (i1, i2) == (4096, 10000)
    assert len(salt1) == len(salt2) == 16 and salt1 != salt2
    assert "pw" not in first.split("$", 1)[1]


def test_a_client_signs_in_against_a_secret_it_was_made_from() -> None:
    secret = scram_secret("Ünïcode pässword", iterations=ITERATIONS, salt=SALT)
    _, _, stored_key, server_key = _secret_parts(secret)
    server = ScramServer(normalize_password("Ünïcode pässword"))
    assert (server.stored_key, server.server_key) == (stored_key, server_key)


@pytest.mark.parametrize("iterations", [0, -1, 1_000_001])
def test_a_secret_with_an_iteration_count_out_of_range_is_refused(iterations: int) -> None:
    with pytest.raises(ProtocolUsageError):
        scram_secret("pw", iterations=iterations)

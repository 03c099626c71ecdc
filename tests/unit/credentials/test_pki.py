"""The gateway CA, its server certificate and grant certificates, on real keys."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.credentials import pki
from gateway.credentials.secretbox import SecretBox
from gateway.errors import ConfigError, InvalidRequest


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(bytes(range(32)))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


def _expiry(minutes: int = 30) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)


def test_init_makes_a_ten_year_p256_ca_whose_key_is_only_kept_sealed(
    home: Path, box: SecretBox
) -> None:
    made = pki.ensure_pki(home, box, ())
    cert = x509.load_pem_x509_certificate((home / pki.CA_CERT_FILE).read_bytes())
    assert cert.subject == cert.issuer
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime >= dt.timedelta(days=3650)
    sealed = (home / pki.CA_KEY_FILE).read_bytes()
    assert b"PRIVATE KEY" not in sealed
    raw = made.ca_key.private_numbers().private_value.to_bytes(32, "big")
    for path in home.iterdir():
        assert b"PRIVATE KEY" not in path.read_bytes(), path
        assert raw not in path.read_bytes(), path
    assert (home / pki.CA_KEY_FILE).stat().st_mode & 0o077 == 0
    assert "key hidden" in repr(made)


def test_a_second_init_keeps_the_ca_and_reissues_the_server_certificate(
    home: Path, box: SecretBox
) -> None:
    first = pki.ensure_pki(home, box, ("gw.example",))
    server_before = (home / pki.SERVER_CERT_FILE).read_bytes()
    second = pki.ensure_pki(home, box, ("gw.example", "10.0.0.5"))
    assert second.ca_pem == first.ca_pem
    assert (home / pki.SERVER_CERT_FILE).read_bytes() != server_before


def test_the_ca_key_does_not_open_under_another_master_key(home: Path, box: SecretBox) -> None:
    pki.ensure_pki(home, box, ())
    from gateway.credentials.secretbox import SecretDecryptError

    with pytest.raises(SecretDecryptError):
        pki.load_pki(home, SecretBox(bytes(32)))


def test_server_certificate_names_every_public_host_and_loopback(
    home: Path, box: SecretBox
) -> None:
    made = pki.ensure_pki(home, box, ("gw.example", "10.0.0.5"))
    cert = x509.load_pem_x509_certificate((home / pki.SERVER_CERT_FILE).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"gw.example", "localhost"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {
        "10.0.0.5",
        "127.0.0.1",
        "::1",
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    made.ca_cert.public_key().verify(  # type: ignore[call-arg,union-attr]
        cert.signature,
        cert.tbs_certificate_bytes,
        ec.ECDSA(cert.signature_hash_algorithm),  # type: ignore[arg-type]
    )


def test_ca_cert_of_an_uninitialised_home_is_a_config_error(home: Path) -> None:
    with pytest.raises(ConfigError, match="no gateway CA") as caught:
        pki.load_ca_certificate(home)
    assert caught.value.hint is not None and "pam gateway init" in caught.value.hint


def _csr_asking_for_names(key: ec.EllipticCurvePrivateKey) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("urn:pam:grant:someone-elses"),
                    x509.DNSName("gw.example"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def test_a_grant_certificate_names_the_grant_only_and_expires_with_it(
    home: Path, box: SecretBox
) -> None:
    ca = pki.ensure_pki(home, box, ())
    key = pki.new_key()
    expires = _expiry().replace(microsecond=0)
    pem = ca.sign_grant_csr(_csr_asking_for_names(key), "s-123", expires)
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.public_key() == key.public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("urn:pam:grant:s-123")]
    assert cert.subject.rfc4514_string() == "CN=urn:pam:grant:s-123"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc == expires
    now = dt.datetime.now(dt.UTC)
    assert now - dt.timedelta(minutes=2) < cert.not_valid_before_utc < now
    assert cert.issuer == ca.ca_cert.subject
    der = cert.public_bytes(serialization.Encoding.DER)
    assert pki.grant_id_of(der) == "s-123"
    assert pki.is_within_validity(der)
    assert not pki.is_within_validity(der, now=expires + dt.timedelta(seconds=1))


def test_a_csr_with_a_bad_signature_is_refused(home: Path, box: SecretBox) -> None:
    ca = pki.ensure_pki(home, box, ())
    good = x509.load_pem_x509_csr(pki.csr_for(pki.new_key()).encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidRequest, match="signature"):
        ca.sign_grant_csr(tampered, "s-1", _expiry())


def test_garbage_an_rsa_csr_and_a_past_expiry_are_refused(home: Path, box: SecretBox) -> None:
    ca = pki.ensure_pki(home, box, ())
    with pytest.raises(InvalidRequest, match="not a PEM CSR"):
        ca.sign_grant_csr("hello", "s-1", _expiry())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(rsa_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(InvalidRequest, match="P-256"):
        ca.sign_grant_csr(rsa_csr, "s-1", _expiry())
    with pytest.raises(InvalidRequest, match="expired"):
        ca.sign_grant_csr(pki.csr_for(pki.new_key()), "s-1", _expiry(-1))


def test_a_certificate_without_a_grant_uri_names_no_grant(home: Path, box: SecretBox) -> None:
    ca = pki.ensure_pki(home, box, ())
    assert pki.grant_id_of(ca.ca_cert.public_bytes(serialization.Encoding.DER)) is None
    assert pki.grant_id_of(b"not der") is None


async def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[str | None, bytes | None, bytes]:
    seen: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        seen.set_result(ssl_object.getpeercert(binary_form=True))
        writer.write(b"x")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        try:
            got = await reader.read(1)
        except (ssl.SSLError, ConnectionError):
            got = b""
        version = writer.get_extra_info("ssl_object").version()
        writer.close()
        return version, (await seen if seen.done() or got else None), got


def test_tunnel_contexts_do_mutual_tls_13_with_keys_held_in_memory(
    home: Path, box: SecretBox
) -> None:
    ca = pki.ensure_pki(home, box, ())
    server_ctx = pki.tunnel_server_context(pki.load_server_identity(home, box), ca.ca_pem)
    key = pki.new_key()
    cert_pem = ca.sign_grant_csr(pki.csr_for(key), "s-9", _expiry())
    client_ctx = pki.tunnel_client_context(cert_pem, key, ca.ca_pem)
    version, peer, got = asyncio.run(_handshake(server_ctx, client_ctx))
    assert version == "TLSv1.3"
    assert got == b"x"
    assert peer is not None and pki.grant_id_of(peer) == "s-9"


def test_the_server_context_refuses_a_client_of_another_ca(
    home: Path, box: SecretBox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ca = pki.ensure_pki(home, box, ())
    server_ctx = pki.tunnel_server_context(pki.load_server_identity(home, box), ca.ca_pem)
    other = pki.ensure_pki(tmp_path_factory.mktemp("other"), box, ())
    key = pki.new_key()
    cert_pem = other.sign_grant_csr(pki.csr_for(key), "s-9", _expiry())
    client_ctx = pki.tunnel_client_context(cert_pem, key, ca.ca_pem)
    # TLS 1.3: the client's handshake ends before the server checks its
    # certificate; the server then drops the connection unserved.
    _version, peer, got = asyncio.run(_handshake(server_ctx, client_ctx))
    assert (peer, got) == (None, b"")

"""TLS material for the throwaway cluster: a CA, a server certificate, an unrelated CA.

:func:`generate_tls_material` returns PEM bytes only; writing them (with the
right owner and modes) is the cluster's job.

Invariants:

* The server certificate is signed by the CA, names ``localhost`` (DNS SAN)
  and ``127.0.0.1`` (IP SAN), and is for server authentication only, so
  ``sslmode=verify-full`` against the loopback address works with libpq and with
  Python's :mod:`ssl`.
* The "other" CA has never signed anything the server presents: verifying the
  server against it must fail.
* Keys are fresh P-256 keys on every call, PKCS#8 PEM without encryption (the
  files are private to the server user instead). Certificates are valid from an
  hour ago for a year.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.testing.net import LOOPBACK_HOST

__all__ = ["TlsMaterial", "generate_tls_material"]

CA_COMMON_NAME = "pam test CA"
OTHER_CA_COMMON_NAME = "pam unrelated test CA"
SERVER_COMMON_NAME = "localhost"

_CERT_VALIDITY = datetime.timedelta(days=365)
# Backdate certificates so a client whose clock lags a little still accepts them.
_CERT_BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """PEM certificates and keys; ``repr`` shows no private key."""

    ca_cert: bytes
    ca_key: bytes = field(repr=False)
    other_ca_cert: bytes
    other_ca_key: bytes = field(repr=False)
    #: The leaf alone; the CA is what clients are told to trust.
    server_cert: bytes
    server_key: bytes = field(repr=False)


def generate_tls_material() -> TlsMaterial:
    """A new CA, a server certificate it signed, and a CA unrelated to both."""
    ca_key, ca_cert = _make_ca(CA_COMMON_NAME)
    other_key, other_cert = _make_ca(OTHER_CA_COMMON_NAME)
    server_key, server_cert = _issue_server_cert(ca_key, ca_cert)
    return TlsMaterial(
        ca_cert=_cert_pem(ca_cert),
        ca_key=_key_pem(ca_key),
        other_ca_cert=_cert_pem(other_cert),
        other_ca_key=_key_pem(other_key),
        server_cert=_cert_pem(server_cert),
        server_key=_key_pem(server_key),
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: accepted by every libpq/OpenSSL build and far quicker to generate than RSA.
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    # A CA signs certificates and CRLs; a TLS server key only signs handshakes
    # (ECDHE with an ECDSA key needs digital_signature and nothing else).
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CERT_BACKDATE)
        .not_valid_after(now + _CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_COMMON_NAME)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CERT_BACKDATE)
        .not_valid_after(now + _CERT_VALIDITY)
        # verify-full checks SANs (RFC 6125); IP SANs are what make
        # "host=127.0.0.1" verifiable, the DNS name covers "host=localhost".
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(SERVER_COMMON_NAME),
                    x509.IPAddress(ipaddress.ip_address(LOOPBACK_HOST)),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)

"""The certificate the gateway shows local clients that insist on TLS.

The local leg is loopback, so the printed URLs say ``sslmode=disable``; but some
clients (or their defaults) require TLS. For them the gateway answers SSLRequest
with ``S`` and serves a self-signed certificate for ``localhost``/``127.0.0.1``,
made once and kept in the state directory (key mode 0600), renewed when it is
about to expire. Clients can pin it with ``sslrootcert`` for verify-full.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config import write_private_file

CERT_FILE = "local-tls.crt"
KEY_FILE = "local-tls.key"
VALIDITY = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)


def _is_fresh(cert_path: Path) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_BEFORE


def loopback_certificate(
    common_name: str, validity: dt.timedelta = VALIDITY
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed certificate (and its new P-256 key) for ``localhost``,
    ``127.0.0.1`` and ``::1``, usable as its own root (``sslrootcert``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def ensure_local_certificate(home: Path) -> tuple[Path, Path]:
    """Create (or renew) the local TLS certificate; returns (cert, key) paths."""
    cert_path, key_path = home / CERT_FILE, home / KEY_FILE
    if key_path.exists() and _is_fresh(cert_path):
        return cert_path, key_path
    cert, key = loopback_certificate("pam gateway (local)")
    write_private_file(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_private_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    # Clients using direct TLS negotiation (PostgreSQL 17+) must offer this ALPN.
    ctx.set_alpn_protocols(["postgresql"])
    return ctx

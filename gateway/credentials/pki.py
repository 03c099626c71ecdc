"""The gateway's certificate authority, its server certificate, and grant certificates.

Role: ``pam gateway init`` makes a CA (ECDSA P-256, self-signed, 10 years) and a
server certificate for the tunnel and the control API; for each grant opened
from another host the CA signs the CLI's certificate signing request, and the
certificate it issues is what the tunnel endpoint admits.

Invariants:

* The CA's and the server's private keys are kept in the state directory only
  sealed with the master key (:class:`~gateway.credentials.secretbox.SecretBox`,
  each bound to its own file name as associated data); certificates are plain
  PEM. Nothing here writes a private key in the clear, to disk or to a log.
* A grant certificate names nothing the CSR asked for: its subject and its only
  SAN are the grant's (``urn:pam:grant:<session id>``), its only extended key
  usage is clientAuth, it is not a CA, and it is valid from one minute ago (clock
  skew) until the grant's expiry and no longer. The CSR's own signature is
  checked, so a CSR proves possession of its key.
* A TLS context needs its key from a path (the :mod:`ssl` module has no other
  way): keys are handed over through an anonymous memory file
  (``os.memfd_create``), never a file on disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config import write_private_file
from gateway.credentials.secretbox import SecretBox
from gateway.errors import ConfigError, InvalidRequest
from gateway.net.tls import loopback_certificate

__all__ = [
    "CA_CERT_FILE",
    "GRANT_URI_PREFIX",
    "GatewayPki",
    "ServerIdentity",
    "csr_for",
    "ensure_pki",
    "grant_id_of",
    "is_within_validity",
    "load_ca_certificate",
    "load_pki",
    "load_server_identity",
    "new_key",
    "public_key_of",
    "tunnel_client_context",
    "tunnel_server_context",
]

CA_CERT_FILE: Final = "gateway-ca.crt"
CA_KEY_FILE: Final = "gateway-ca.key.sealed"
SERVER_CERT_FILE: Final = "gateway-server.crt"
SERVER_KEY_FILE: Final = "gateway-server.key.sealed"
CA_VALIDITY: Final = dt.timedelta(days=3650)
SERVER_VALIDITY: Final = dt.timedelta(days=825)
#: a grant certificate is valid from this long before it is issued (clock skew)
BACKDATE: Final = dt.timedelta(minutes=1)
GRANT_URI_PREFIX: Final = "urn:pam:grant:"
#: names every server certificate carries, whatever --public-host says
LOOPBACK_HOSTS: Final = ("localhost", "127.0.0.1", "::1")
#: The forwarder's local certificate lives as long as one `pam db access` at most.
EPHEMERAL_VALIDITY: Final = dt.timedelta(days=2)
#: a CSR is a few hundred bytes; anything much larger is not one of ours
MAX_CSR_BYTES: Final = 16 * 1024


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _seal(box: SecretBox, path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_private_file(path, box.encrypt(_private_pem(key), aad=path.name.encode()))


def _unseal(box: SecretBox, path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        sealed = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist", hint="run `pam gateway init` to create the gateway CA"
        ) from None
    key = serialization.load_pem_private_key(box.decrypt(sealed, aad=path.name.encode()), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} does not hold an ECDSA key")
    return key


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _make_ca(now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pam gateway CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class ServerIdentity:
    """The server certificate (PEM) and its key, for the tunnel and the API."""

    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:
        return "ServerIdentity(<key hidden>)"


@dataclass(frozen=True)
class GatewayPki:
    """The CA (certificate and key) of one gateway; signs server and grant certificates."""

    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:
        return f"GatewayPki({self.ca_cert.subject.rfc4514_string()}, <key hidden>)"

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def issue_server(
        self, public_hosts: tuple[str, ...], *, now: dt.datetime | None = None
    ) -> ServerIdentity:
        """A server certificate for every public host plus the loopback names."""
        now = now or dt.datetime.now(dt.UTC)
        key = new_key()
        hosts = list(dict.fromkeys((*public_hosts, *LOOPBACK_HOSTS)))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + SERVER_VALIDITY, self.ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([_host_name(h) for h in hosts]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(self.ca_key, hashes.SHA256())
        )
        return ServerIdentity(cert.public_bytes(serialization.Encoding.PEM), key)

    def check_csr(self, csr_pem: str | bytes) -> ec.EllipticCurvePublicKey:
        """The key of a CSR whose signature verifies; its names are ignored.

        Raises :class:`InvalidRequest` for a CSR that does not parse, whose
        signature is wrong, or whose key is not ECDSA P-256.
        """
        raw = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        if len(raw) > MAX_CSR_BYTES:
            raise InvalidRequest("the certificate signing request is too large")
        try:
            csr = x509.load_pem_x509_csr(raw)
        except ValueError:
            raise InvalidRequest("the certificate signing request is not a PEM CSR") from None
        if not csr.is_signature_valid:
            raise InvalidRequest("the certificate signing request's signature does not verify")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise InvalidRequest("the certificate signing request must be for an ECDSA P-256 key")
        return public_key

    def issue_grant(
        self, public_key: ec.EllipticCurvePublicKey, session_id: str, expires_at: dt.datetime
    ) -> bytes:
        """The client certificate (PEM) of grant ``session_id``, for ``public_key``."""
        now = dt.datetime.now(dt.UTC)
        if expires_at <= now:
            raise InvalidRequest("the grant has already expired")
        uri = f"{GRANT_URI_PREFIX}{session_id}"
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, uri)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(expires_at)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(self.ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def sign_grant_csr(
        self, csr_pem: str | bytes, session_id: str, expires_at: dt.datetime
    ) -> bytes:
        """:meth:`check_csr` then :meth:`issue_grant`."""
        return self.issue_grant(self.check_csr(csr_pem), session_id, expires_at)


def public_key_of(cert: bytes) -> bytes:
    """The public key (DER SubjectPublicKeyInfo) of a certificate in PEM or DER."""
    loaded = (
        x509.load_pem_x509_certificate(cert)
        if cert.startswith(b"-----")
        else x509.load_der_x509_certificate(cert)
    )
    return loaded.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def grant_id_of(cert_der: bytes) -> str | None:
    """The grant a (verified) client certificate names; None when it names none."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    grants = [u.removeprefix(GRANT_URI_PREFIX) for u in uris if u.startswith(GRANT_URI_PREFIX)]
    return grants[0] if len(grants) == 1 and grants[0] else None


def csr_for(key: ec.EllipticCurvePrivateKey) -> str:
    """A CSR (PEM) for ``key``; its names are ignored by the gateway."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pam cli")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def ensure_pki(home: Path, box: SecretBox, public_hosts: tuple[str, ...]) -> GatewayPki:
    """Create the CA when it is missing, and (re)issue the server certificate for
    ``public_hosts``; an existing CA is kept (grants and CLIs pin it)."""
    ca_cert_path, ca_key_path = home / CA_CERT_FILE, home / CA_KEY_FILE
    if ca_key_path.exists() and ca_cert_path.exists():
        pki = load_pki(home, box)
    else:
        cert, key = _make_ca(dt.datetime.now(dt.UTC))
        _seal(box, ca_key_path, key)
        write_private_file(ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        ca_cert_path.chmod(0o644)  # public by nature; the key beside it is sealed
        pki = GatewayPki(cert, key)
    server = pki.issue_server(public_hosts)
    _seal(box, home / SERVER_KEY_FILE, server.key)
    write_private_file(home / SERVER_CERT_FILE, server.cert_pem)
    return pki


def load_ca_certificate(home: Path) -> bytes:
    """The CA certificate (PEM), as ``pam gateway ca-cert`` prints it."""
    path = home / CA_CERT_FILE
    try:
        pem = path.read_bytes()
        x509.load_pem_x509_certificate(pem)
    except FileNotFoundError:
        raise ConfigError(
            f"{home} has no gateway CA ({CA_CERT_FILE})",
            hint="run `pam gateway init` (with --force on an existing state directory)",
        ) from None
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate") from None
    return pem


def load_pki(home: Path, box: SecretBox) -> GatewayPki:
    cert = x509.load_pem_x509_certificate(load_ca_certificate(home))
    return GatewayPki(cert, _unseal(box, home / CA_KEY_FILE))


def load_server_identity(home: Path, box: SecretBox) -> ServerIdentity:
    try:
        cert_pem = (home / SERVER_CERT_FILE).read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{home} has no server certificate ({SERVER_CERT_FILE})",
            hint="run `pam gateway init --force` to create the gateway CA and certificate",
        ) from None
    return ServerIdentity(cert_pem, _unseal(box, home / SERVER_KEY_FILE))


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key: ec.EllipticCurvePrivateKey) -> None:
    """Load a certificate and its key into ``ctx`` through anonymous memory."""
    if not hasattr(os, "memfd_create"):
        raise ConfigError("pam's tunnel needs Linux (os.memfd_create) to hold keys in memory")
    fd = os.memfd_create("pam-tls", os.MFD_CLOEXEC)
    try:
        data = cert_pem + _private_pem(key)
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def api_server_context(server: ServerIdentity) -> ssl.SSLContext:
    """The control API's HTTPS: TLS 1.2 or newer with the gateway's server
    certificate (clients pin the gateway CA: ``pam login --ca-cert``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, server.cert_pem, server.key)
    return ctx


def ephemeral_local_context() -> ssl.SSLContext:
    """A TLS server context with a throwaway self-signed certificate for the
    loopback names, made in memory: for local clients that insist on TLS to the
    CLI's forwarder (``sslmode=require`` encrypts but verifies nothing)."""
    cert, key = loopback_certificate("pam forwarder (ephemeral)", EPHEMERAL_VALIDITY)
    return api_server_context(ServerIdentity(cert.public_bytes(serialization.Encoding.PEM), key))


def tunnel_server_context(server: ServerIdentity, ca_pem: bytes) -> ssl.SSLContext:
    """TLS 1.3 only; a client certificate signed by the CA is required.

    OpenSSL's own time check is off (``X509_V_FLAG_NO_CHECK_TIME``): a grant's
    certificate expires with the grant, and its holder should hear the grant's
    end as a FATAL naming it, not a TLS alert. The tunnel checks the validity
    period itself (:func:`is_within_validity`) before it looks the grant up.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca_pem.decode())
    ctx.verify_flags = ssl.VerifyFlags(ctx.verify_flags | _X509_V_FLAG_NO_CHECK_TIME)
    _load_chain(ctx, server.cert_pem, server.key)
    return ctx


#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME (x509_vfy.h); the ssl module has no name for it.
_X509_V_FLAG_NO_CHECK_TIME: Final = 0x200000


def is_within_validity(cert_der: bytes, *, now: dt.datetime | None = None) -> bool:
    cert = x509.load_der_x509_certificate(cert_der)
    now = now or dt.datetime.now(dt.UTC)
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def tunnel_client_context(
    cert_pem: bytes, key: ec.EllipticCurvePrivateKey, ca_pem: bytes
) -> ssl.SSLContext:
    """TLS 1.3 only, the gateway CA pinned (and nothing else trusted), host names checked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=ca_pem.decode())
    _load_chain(ctx, cert_pem, key)
    return ctx

"""Connecting and authenticating to the upstream PostgreSQL server (asyncio shell).

Drives the sans-IO :class:`~gateway.protocol.handshake.UpstreamHandshake` over an
asyncio stream: TCP connect, SSLRequest and TLS per the resource's ssl mode (with
libpq's meanings), startup, authentication with the stored credentials.

Invariants:
* No silent downgrade: modes ``require``, ``verify-ca`` and ``verify-full`` fail
  when the server answers ``N``; ``verify-full`` checks the chain and host name.
  ``prefer`` and ``disable`` are explicit, logged choices.
* Bytes the server sends after ``S`` and before the TLS handshake are refused
  (they would otherwise be read as if they came over TLS; CVE-2021-23222).
* Every failure becomes an :class:`~gateway.errors.UpstreamError` with a SQLSTATE,
  the resource's host:port and the cause, and never the password.
* Every network wait has a deadline.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import socket
import ssl
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway.errors import UpstreamError
from gateway.net.relay import unread_bytes
from gateway.protocol import messages
from gateway.protocol.constants import MAX_AUTH_MESSAGE_LENGTH, SSL_ACCEPTED, SSL_REFUSED
from gateway.protocol.errors import ProtocolError
from gateway.protocol.framing import MessageReader
from gateway.protocol.handshake import StartupRejected, UnsupportedAuthentication, UpstreamHandshake
from gateway.protocol.scram import ScramAuthenticationError
from gateway.protocol.sqlstate import SqlState

log = structlog.get_logger(__name__)

#: libpq's ``sslmode`` values, minus ``allow`` (it prefers plaintext, which an
#: access gateway never wants). See libpq "SSL Support", table 34.1.
SslMode = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]
SSL_MODES: frozenset[str] = frozenset(get_args(SslMode))
_TLS_REQUIRED: frozenset[str] = frozenset({"require", "verify-ca", "verify-full"})
_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class UpstreamTarget:
    """Everything needed to reach one account on one resource."""

    resource: str
    account: str
    host: str
    port: int
    database: str
    username: str
    password: str = field(repr=False)
    ssl_mode: SslMode = "verify-full"
    ca_cert: str | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class UpstreamConnection:
    """An authenticated upstream session, ready to relay."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    handshake: UpstreamHandshake
    #: bytes read from the server after ReadyForQuery (normally empty)
    leftover: bytes
    tls_version: str | None
    cipher: str | None
    connect_ms: float

    @property
    def server_version(self) -> str | None:
        return self.handshake.parameters.get("server_version")


def build_tls_context(target: UpstreamTarget) -> ssl.SSLContext:
    """An SSL context that implements the libpq meaning of the target's ssl mode.

    Contexts are immutable once built and cached per (mode, CA): loading a CA
    bundle for every upstream connection would cost more than the handshake.
    """
    return _tls_context(target.ssl_mode, target.ca_cert)


@functools.lru_cache(maxsize=64)
def _tls_context(mode: str, ca_cert: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode in ("verify-ca", "verify-full") or (mode == "require" and ca_cert):
        # libpq: with a root certificate available, "require" behaves as verify-ca.
        if ca_cert:
            ctx.load_verify_locations(cadata=ca_cert)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = mode == "verify-full"
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_server_end_point(der_cert: bytes) -> bytes:
    """RFC 5929 section 4.1 channel binding data: the certificate's hash, with
    MD5 and SHA-1 replaced by SHA-256."""
    cert = x509.load_der_x509_certificate(der_cert)
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        return hashlib.sha256(der_cert).digest()
    digest = hashes.Hash(algorithm)
    digest.update(der_cert)
    return digest.finalize()


async def connect_upstream(
    target: UpstreamTarget,
    *,
    params: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    salted_password_cache: MutableMapping[tuple[bytes, int], bytes] | None = None,
) -> UpstreamConnection:
    """Open an authenticated session to ``target``, or raise UpstreamError."""
    started = time.perf_counter()
    where = f"upstream {target.resource} at {target.address}"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _open_tcp(target, where)
            tls_version, cipher, binding = await _negotiate_tls(target, reader, writer, where)
            handshake = UpstreamHandshake(
                user=target.username,
                database=target.database,
                password=target.password,
                params=dict(params or {}),
                encrypted=tls_version is not None,
                channel_binding=binding,
                salted_password_cache=salted_password_cache,
            )
            leftover = await _run_handshake(handshake, reader, writer)
    except _FAILURES as exc:
        _abort(writer)
        raise _upstream_error(exc, target, where, timeout) from None
    return UpstreamConnection(
        reader=reader,
        writer=writer,
        handshake=handshake,
        leftover=leftover,
        tls_version=tls_version,
        cipher=cipher,
        connect_ms=(time.perf_counter() - started) * 1000,
    )


#: What reaching and signing in to the server can raise; each becomes an UpstreamError.
_FAILURES = (
    TimeoutError,
    UpstreamError,
    StartupRejected,
    UnsupportedAuthentication,
    ScramAuthenticationError,
    ProtocolError,
    ConnectionError,
    OSError,
)


def _upstream_error(
    exc: BaseException, target: UpstreamTarget, where: str, timeout: float
) -> UpstreamError:
    """The UpstreamError (SQLSTATE, kind, hint) for a failure of connect_upstream.
    TimeoutError is an OSError: it is tested first."""
    if isinstance(exc, TimeoutError):
        return UpstreamError(
            f"timed out after {timeout:g}s connecting to {where}",
            kind="timeout",
            hint="check that the host is reachable from the gateway and the port is open",
        )
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, StartupRejected):
        return _rejection_error(target, exc)
    if isinstance(exc, UnsupportedAuthentication):
        return UpstreamError(
            f"{where}: {exc.message}",
            kind="unsupported_auth",
            sqlstate=SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
        )
    if isinstance(exc, ScramAuthenticationError):
        return UpstreamError(
            f"SCRAM authentication with {where} failed: {exc.message}", kind="auth"
        )
    if isinstance(exc, ProtocolError):
        return UpstreamError(
            f"{where} violated the protocol: {exc.message}",
            kind="protocol",
            sqlstate=SqlState.PROTOCOL_VIOLATION,
        )
    assert isinstance(exc, OSError)
    return UpstreamError(f"connection to {where} failed: {exc.strerror or exc}", kind="refused")


def _abort(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.transport.abort()


async def _open_tcp(
    target: UpstreamTarget, where: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port, limit=_READ_SIZE)
    except socket.gaierror as exc:
        raise UpstreamError(
            f"could not resolve host name {target.host!r} of upstream {target.resource}:"
            f" {exc.strerror}",
            kind="dns",
            hint="check the resource's --host",
        ) from None
    except ConnectionRefusedError:
        raise UpstreamError(
            f"could not connect to {where}: connection refused",
            kind="refused",
            hint="is PostgreSQL running there and accepting TCP connections on that port?",
        ) from None
    except OSError as exc:
        raise UpstreamError(
            f"could not connect to {where}: {exc.strerror or exc}", kind="refused"
        ) from None
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def _negotiate_tls(
    target: UpstreamTarget,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    where: str,
) -> tuple[str | None, str | None, bytes | None]:
    mode = target.ssl_mode
    if mode == "disable":
        log.warning("upstream_tls_disabled", resource=target.resource, ssl_mode=mode)
        return None, None, None
    writer.write(messages.ssl_request())
    await writer.drain()
    answer = await reader.readexactly(1)
    if answer == SSL_REFUSED:
        if mode in _TLS_REQUIRED:
            raise UpstreamError(
                f"{where} does not accept TLS, and the resource's ssl mode {mode!r} requires it",
                kind="tls",
                hint="enable ssl on the server, or (not recommended) change the resource's"
                " --ssl-mode",
            )
        log.warning("upstream_tls_unavailable_plaintext", resource=target.resource, ssl_mode=mode)
        return None, None, None
    if answer != SSL_ACCEPTED:
        raise UpstreamError(
            f"{where} answered the SSLRequest with {answer!r}; is it a PostgreSQL server?",
            kind="protocol",
            sqlstate=SqlState.PROTOCOL_VIOLATION,
        )
    if unread_bytes(reader):
        raise UpstreamError(
            f"{where} sent unencrypted data after accepting TLS; refusing the connection",
            kind="tls",
            sqlstate=SqlState.PROTOCOL_VIOLATION,
        )
    ctx = build_tls_context(target)
    try:
        await writer.start_tls(ctx, server_hostname=target.host)
    except ssl.SSLCertVerificationError as exc:
        raise UpstreamError(
            # "certificate verify failed" is OpenSSL's and libpq's wording: searchable.
            f"TLS verification of {where} failed: certificate verify failed:"
            f" {exc.verify_message or exc.reason}",
            kind="tls",
            hint="pass the server's CA with `pam resource add --ca-cert FILE`, and check that"
            " the certificate names the host",
        ) from None
    except ssl.SSLError as exc:
        raise UpstreamError(
            f"TLS handshake with {where} failed: {exc.reason or exc}", kind="tls"
        ) from None
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        raise UpstreamError(f"TLS with {where} did not start", kind="tls")
    if mode in ("prefer", "require") and ctx.verify_mode == ssl.CERT_NONE:
        log.warning("upstream_tls_unverified", resource=target.resource, ssl_mode=mode)
    der = ssl_object.getpeercert(binary_form=True)
    binding = tls_server_end_point(der) if der else None
    cipher = ssl_object.cipher()
    return ssl_object.version(), cipher[0] if cipher else None, binding


async def _run_handshake(
    handshake: UpstreamHandshake,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bytes:
    inbound = MessageReader(max_length=MAX_AUTH_MESSAGE_LENGTH)
    writer.write(handshake.start())
    await writer.drain()
    while not handshake.is_ready:
        message = inbound.next_message()
        if message is None:
            data = await reader.read(_READ_SIZE)
            if not data:
                raise ProtocolError("server closed the connection during startup")
            inbound.feed(data)
            continue
        reply = handshake.receive(message)
        if reply:
            writer.write(reply)
            await writer.drain()
    return inbound.take_remaining()


def _rejection_error(target: UpstreamTarget, exc: StartupRejected) -> UpstreamError:
    fields = exc.fields
    if exc.during_auth and fields.sqlstate in (
        SqlState.INVALID_PASSWORD,
        SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
    ):
        return UpstreamError(
            f"upstream {target.resource} rejected the stored credentials of account"
            f" {target.account!r} (user {target.username!r}): {fields.message}",
            kind="auth",
            sqlstate=fields.sqlstate,
            hint=f"run `pam resource verify {target.resource} --account {target.account}`;"
            f" if the password changed, `pam account rotate {target.resource} {target.account}`",
        )
    return UpstreamError(
        f"upstream {target.resource} refused the session: {fields.message}",
        kind="server",
        sqlstate=fields.sqlstate or SqlState.SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION,
        hint=fields.hint,
        raw_error=exc.raw,
    )


async def send_cancel(
    target: UpstreamTarget, pid: int, secret: bytes, *, timeout: float = 5.0
) -> None:
    """Deliver a CancelRequest to the upstream server over the resource's TLS mode."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _open_tcp(target, f"upstream {target.resource}")
            await _negotiate_tls(target, reader, writer, f"upstream {target.resource}")
            writer.write(messages.cancel_request(pid, secret))
            await writer.drain()
            # The server closes the connection without replying (55.2.7).
            await reader.read(1)
    finally:
        _abort(writer)

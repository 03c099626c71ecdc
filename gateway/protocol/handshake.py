"""Client side of the startup and authentication exchange with an upstream server.

Sans-IO: :meth:`UpstreamHandshake.start` gives the StartupMessage bytes, then each
message from the server goes to :meth:`UpstreamHandshake.receive` which returns
the bytes to send back (possibly none). When :attr:`is_ready` turns true the
server has sent ReadyForQuery and the session can be relayed.

:class:`HandshakeState` names where the exchange is (all transitions are in
:class:`UpstreamHandshake`): NEW, AUTHENTICATING (StartupMessage sent),
AUTHENTICATED (AuthenticationOk received, collecting ParameterStatus and
BackendKeyData), READY (ReadyForQuery received) and ERROR (the server refused
or misbehaved: the handshake raised and takes no more messages).

Authentication methods (PostgreSQL 15 docs, 55.2.1 and 55.3): SCRAM-SHA-256
(with -PLUS channel binding when the caller offers binding data and the server
lists it), MD5, and cleartext only when the leg is encrypted (the caller says so).
Any other method is refused with :class:`UnsupportedAuthentication`.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

from gateway.errors import GatewayError
from gateway.protocol import messages
from gateway.protocol.constants import AuthRequest, BackendType
from gateway.protocol.errors import ProtocolError, ProtocolUsageError
from gateway.protocol.framing import Message
from gateway.protocol.messages import BackendKey, ErrorFields
from gateway.protocol.scram import SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramClient
from gateway.protocol.sqlstate import SqlState

_AUTH_NAMES = {
    AuthRequest.KERBEROS_V5: "Kerberos V5",
    AuthRequest.GSS: "GSSAPI",
    AuthRequest.SSPI: "SSPI",
}


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """PostgreSQL's MD5 response: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5(password.encode() + user.encode(), usedforsecurity=False).hexdigest()
    outer = hashlib.md5(inner.encode() + salt, usedforsecurity=False).hexdigest()
    return b"md5" + outer.encode()


class HandshakeState(enum.Enum):
    """Where the startup and authentication exchange with the server is."""

    NEW = enum.auto()
    #: StartupMessage sent; the server is authenticating us
    AUTHENTICATING = enum.auto()
    #: AuthenticationOk received; reading the server's parameters and key
    AUTHENTICATED = enum.auto()
    #: ReadyForQuery received: the session can be relayed
    READY = enum.auto()
    #: the server refused or violated the protocol; no more messages
    ERROR = enum.auto()


class StartupRejected(GatewayError):
    """The server answered the startup or authentication with an ErrorResponse."""

    def __init__(self, fields: ErrorFields, raw: bytes, *, during_auth: bool) -> None:
        super().__init__(fields.message, sqlstate=fields.sqlstate or SqlState.CONNECTION_EXCEPTION)
        self.fields = fields
        #: the original ErrorResponse message, to relay byte for byte when fitting
        self.raw = raw
        self.during_auth = during_auth


class UnsupportedAuthentication(GatewayError):
    """The server asked for an authentication method the gateway won't perform."""

    sqlstate = SqlState.SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION

    def __init__(self, method: str, reason: str) -> None:
        super().__init__(f"upstream server requested {method} authentication, {reason}")
        self.method = method


@dataclass
class UpstreamHandshake:
    user: str
    database: str
    password: str = field(repr=False)
    #: extra startup parameters (application_name, client_encoding, options, ...)
    params: Mapping[str, str] = field(default_factory=dict)
    #: whether the leg to the server is TLS-encrypted (cleartext passwords need it)
    encrypted: bool = False
    #: tls-server-end-point hash of the server certificate, when on TLS
    channel_binding: bytes | None = field(default=None, repr=False)
    salted_password_cache: MutableMapping[tuple[bytes, int], bytes] | None = field(
        default=None, repr=False
    )

    auth_method: str = "trust"
    state: HandshakeState = HandshakeState.NEW
    backend_key: BackendKey | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    #: server messages after AuthenticationOk, original bytes, in order, for the client
    #: (kept out of repr: BackendKeyData carries the cancel secret)
    forward: list[bytes] = field(default_factory=list, repr=False)
    _scram: ScramClient | None = field(default=None, repr=False)

    @property
    def is_ready(self) -> bool:
        """Whether the server sent ReadyForQuery: the session can be relayed."""
        return self.state is HandshakeState.READY

    def start(self) -> bytes:
        if self.state is not HandshakeState.NEW:
            raise ProtocolUsageError("handshake already started")
        self.state = HandshakeState.AUTHENTICATING
        params = {"user": self.user, "database": self.database}
        params.update({k: v for k, v in self.params.items() if k not in ("user", "database")})
        return messages.startup_message(params)

    def receive(self, message: Message) -> bytes:
        """The reply to one server message (possibly empty).

        Whatever the server did wrong raises (StartupRejected, ProtocolError,
        UnsupportedAuthentication, a SCRAM error) and leaves the handshake in
        :attr:`HandshakeState.ERROR`.
        """
        if self.state not in (HandshakeState.AUTHENTICATING, HandshakeState.AUTHENTICATED):
            raise ProtocolUsageError("handshake is not expecting messages")
        try:
            return self._receive(message)
        except GatewayError as exc:
            if not isinstance(exc, ProtocolUsageError):
                self.state = HandshakeState.ERROR
            raise

    def _receive(self, message: Message) -> bytes:
        mtype = message.type
        authenticated = self.state is HandshakeState.AUTHENTICATED
        if mtype == BackendType.ERROR_RESPONSE:
            raise StartupRejected(
                messages.parse_error_fields(message.body),
                message.encode(),
                during_auth=not authenticated,
            )
        if mtype == BackendType.AUTHENTICATION:
            return self._on_authentication(message.body)
        if not authenticated:
            if mtype in (BackendType.NOTICE_RESPONSE, BackendType.NEGOTIATE_PROTOCOL_VERSION):
                return b""
            raise ProtocolError(
                f"unexpected message {bytes((mtype,))!r} from server before authentication"
            )
        if mtype == BackendType.PARAMETER_STATUS:
            name, value = messages.parse_parameter_status(message.body)
            self.parameters[name] = value
        elif mtype == BackendType.BACKEND_KEY_DATA:
            self.backend_key = messages.parse_backend_key_data(message.body)
        elif mtype == BackendType.READY_FOR_QUERY:
            messages.parse_ready_for_query(message.body)
            self.state = HandshakeState.READY
        elif mtype not in (BackendType.NOTICE_RESPONSE, BackendType.NEGOTIATE_PROTOCOL_VERSION):
            raise ProtocolError(f"unexpected message {bytes((mtype,))!r} during startup")
        self.forward.append(message.encode())
        return b""

    def _on_authentication(self, body: bytes) -> bytes:
        request = messages.parse_authentication(body)
        code = request.code
        if code == AuthRequest.OK:
            if self.state is HandshakeState.AUTHENTICATED:
                raise ProtocolError("server sent AuthenticationOk twice")
            if self._scram is not None and not self._scram.is_done:
                raise ProtocolError("server sent AuthenticationOk before completing SCRAM")
            self.state = HandshakeState.AUTHENTICATED
            return b""
        if self.state is HandshakeState.AUTHENTICATED:
            raise ProtocolError("authentication request after AuthenticationOk")
        if code == AuthRequest.CLEARTEXT_PASSWORD:
            if not self.encrypted:
                raise UnsupportedAuthentication(
                    "cleartext password",
                    "which pam only sends over TLS; set the resource's ssl mode to"
                    " require or verify-full, or use scram-sha-256 in pg_hba.conf",
                )
            self.auth_method = "password"
            return messages.password_message(self.password.encode())
        if code == AuthRequest.MD5_PASSWORD:
            if len(request.data) != 4:
                raise ProtocolError("AuthenticationMD5Password needs a 4-byte salt")
            self.auth_method = "md5"
            return messages.password_message(md5_password(self.user, self.password, request.data))
        if code == AuthRequest.SASL:
            return self._start_scram(messages.parse_sasl_mechanisms(request.data))
        if code == AuthRequest.SASL_CONTINUE:
            if self._scram is None:
                raise ProtocolError("SASLContinue without SASL")
            try:
                return messages.sasl_response(self._scram.client_final(request.data))
            except ProtocolUsageError as exc:
                # The server sent SCRAM steps out of order: its fault, not ours.
                raise ProtocolError("server sent AuthenticationSASLContinue out of order") from exc
        if code == AuthRequest.SASL_FINAL:
            if self._scram is None:
                raise ProtocolError("SASLFinal without SASL")
            try:
                self._scram.verify_server_final(request.data)
            except ProtocolUsageError as exc:
                raise ProtocolError("server sent AuthenticationSASLFinal out of order") from exc
            return b""
        method = _AUTH_NAMES.get(code, f"an unknown method (code {code})")  # type: ignore[call-overload]
        raise UnsupportedAuthentication(
            method, "which pam does not support; use scram-sha-256 for this account"
        )

    def _start_scram(self, mechanisms: list[str]) -> bytes:
        if self._scram is not None:
            raise ProtocolError("server restarted SASL authentication")
        binding = self.channel_binding
        # Able to bind but not offered -PLUS: say so ("y"), so a server that does
        # support binding can detect a stripped mechanism list (RFC 5802, 6).
        binding_supported = binding is not None
        if binding is not None and SCRAM_SHA_256_PLUS in mechanisms:
            self.auth_method = "scram-sha-256-plus"
        elif SCRAM_SHA_256 in mechanisms:
            binding = None
            self.auth_method = "scram-sha-256"
        else:
            raise UnsupportedAuthentication(
                f"SASL ({', '.join(mechanisms) or 'no mechanism'})",
                "and pam supports only SCRAM-SHA-256",
            )
        self._scram = ScramClient(
            self.password,
            channel_binding=binding,
            salted_password_cache=self.salted_password_cache,
            binding_supported=binding_supported,
        )
        return messages.sasl_initial_response(self._scram.mechanism, self._scram.client_first())

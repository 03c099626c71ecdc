"""A throwaway PostgreSQL cluster, for ``pam demo`` and the integration tests.

:class:`TempCluster` runs ``initdb`` into a private directory, writes a TLS
certificate chain and a fixed ``pg_hba.conf``, starts the server on a free
loopback port and, on :meth:`TempCluster.stop`, shuts it down and deletes what it
created. It is single-use: ``start()`` once, ``stop()`` as often as you like.

Invariants:

* No process outlives the cluster: ``start()`` either returns with a running
  server or stops whatever it started, removes its directory and raises with the
  server log tail; ``stop()`` is idempotent and also runs at interpreter exit.
* As root, every file the server reads or writes is owned by the ``postgres`` OS
  user (override with ``PAM_PG_USER``) and every server command runs as that
  user; otherwise everything runs as the current user.
* The server certificate chains to :attr:`TempCluster.ca_cert_path` and names
  ``localhost`` and ``127.0.0.1``, so ``sslmode=verify-full`` against the
  loopback address works with libpq and with Python's :mod:`ssl`.
* The unix socket directory is private (mode 0700): it is the only way in with
  ``trust``, so only the server user (and root) may use it.
* No password appears in a ``repr``, an exception message or a command line.

Authentication (``pg_hba.conf``, first match wins, see "The pg_hba.conf File"
in the PostgreSQL documentation): roles whose name starts with ``md5_`` use
``md5``, ``plain_`` use cleartext ``password`` over TLS, ``plainnossl_`` use
``password`` over any TCP connection; everything else uses ``scram-sha-256``
over TCP (with or without TLS) and ``trust`` over the unix socket. PostgreSQL 15
cannot match user names by regular expression (that arrived in 16), so the
prefix rules are group rules (``+pam_hba_md5``) and :meth:`TempCluster.create_role`
adds a role to the group its name prefix selects.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import GatewayError
from gateway.testing.net import LOOPBACK_HOST, free_port

__all__ = [
    "ClusterError",
    "PasswordEncryption",
    "PgRole",
    "PostgresNotInstalled",
    "TempCluster",
    "find_pg_bin_dir",
]

PasswordEncryption = Literal["scram-sha-256", "md5"]

#: Environment variable naming the directory that holds initdb, pg_ctl and postgres.
PG_BIN_ENV = "PAM_PG_BIN"
#: Environment variable naming the OS user the server runs as when we are root.
PG_USER_ENV = "PAM_PG_USER"
DEFAULT_SERVER_OS_USER = "postgres"
SUPERUSER = "postgres"
INSTALL_HINT = (
    "install the server with `apt-get install postgresql-15` (Debian/Ubuntu), "
    f"or set {PG_BIN_ENV} to the directory that holds initdb, pg_ctl and postgres"
)

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")

# Seconds. initdb without fsync takes about a second; the rest are generous
# upper bounds so that a wedged server fails the run instead of hanging it.
_INITDB_TIMEOUT_S = 120.0
_PG_CTL_WAIT_S = 60
_PG_CTL_SLACK_S = 30.0
_PSQL_TIMEOUT_S = 60.0
_PG_CONFIG_TIMEOUT_S = 10.0
_KILL_WAIT_S = 10.0
_KILL_POLL_S = 0.05

# Another process may grab the port between our probe and the server's bind().
_PORT_ATTEMPTS = 5
_PORT_IN_USE_MARKERS = ("Address already in use", "could not bind")

_LOG_TAIL_LINES = 60
# sizeof(sockaddr_un.sun_path) is 108 on Linux, one byte of which is the NUL.
_UNIX_SOCKET_PATH_MAX = 107
_LONGEST_SOCKET_NAME = ".s.PGSQL.65535.lock"

_CERT_VALIDITY = datetime.timedelta(days=365)
# Backdate certificates so a client whose clock lags a little still accepts them.
_CERT_BACKDATE = datetime.timedelta(hours=1)
_SUPERUSER_PASSWORD_BYTES = 24

_PRIVATE_DIR_MODE = 0o700
_PRIVATE_FILE_MODE = 0o600
_PUBLIC_FILE_MODE = 0o644

# Name prefix -> group role that a pg_hba.conf line matches with "+group".
# "plainnossl_" is tested before "plain_" only for readability: neither is a
# prefix of the other.
_HBA_GROUP_BY_PREFIX: tuple[tuple[str, str], ...] = (
    ("md5_", "pam_hba_md5"),
    ("plainnossl_", "pam_hba_plainnossl"),
    ("plain_", "pam_hba_plain"),
    # GSSAPI, a method the gateway refuses: lets tests see that refusal.
    ("gss_", "pam_hba_gss"),
)

_PG_HBA_CONF = """\
# Written by gateway.testing.pgcluster; first matching line wins.
# TYPE   DATABASE  USER                 ADDRESS        METHOD
local    all       all                                 trust
hostssl  all       +pam_hba_plain       127.0.0.1/32   password
host     all       +pam_hba_plainnossl  127.0.0.1/32   password
host     all       +pam_hba_md5         127.0.0.1/32   md5
host     all       +pam_hba_gss         127.0.0.1/32   gss
hostssl  all       all                  127.0.0.1/32   scram-sha-256
host     all       all                  127.0.0.1/32   scram-sha-256
"""

_CONF_INCLUDE_NAME = "pam.conf"


class ClusterError(GatewayError):
    """The throwaway cluster could not be set up, started, stopped or queried."""


class PostgresNotInstalled(ClusterError):
    """The PostgreSQL server binaries (initdb, pg_ctl, postgres) are missing."""

    def __init__(self, detail: str = "PostgreSQL server binaries not found") -> None:
        # The instructions are the message's second half, not also a hint: the
        # CLI prints both, and saying it twice on one line helps nobody.
        super().__init__(f"{detail}; {INSTALL_HINT}")


def find_pg_bin_dir() -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Looks, in order, at ``$PAM_PG_BIN``, ``pg_config --bindir``, the highest
    version under ``/usr/lib/postgresql/*/bin`` (Debian's layout) and ``initdb``
    on ``PATH``. Raises :class:`PostgresNotInstalled` if none qualifies.
    """
    explicit = os.environ.get(PG_BIN_ENV)
    if explicit:
        candidate = Path(explicit)
        if _has_server_binaries(candidate):
            return candidate
        # An explicit choice that is wrong is an error, not a reason to guess.
        raise PostgresNotInstalled(
            f"{PG_BIN_ENV}={explicit} does not contain {', '.join(_REQUIRED_BINARIES)}"
        )
    for candidate in _candidate_bin_dirs():
        if _has_server_binaries(candidate):
            return candidate
    raise PostgresNotInstalled()


def _candidate_bin_dirs() -> Iterable[Path]:
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=_PG_CONFIG_TIMEOUT_S,
                check=True,
            ).stdout.strip()
            if out:
                yield Path(out)
    if _DEBIAN_PG_ROOT.is_dir():
        versions = [p for p in _DEBIAN_PG_ROOT.iterdir() if _version_key(p.name) is not None]
        versions.sort(key=lambda p: _version_key(p.name) or (), reverse=True)
        for version_dir in versions:
            yield version_dir / "bin"
    initdb = shutil.which("initdb")
    if initdb is not None:
        # /usr/local/bin/initdb may be a lone symlink; its target's directory
        # is the one that also holds pg_ctl and postgres.
        yield Path(initdb).resolve().parent
        yield Path(initdb).parent


def _version_key(name: str) -> tuple[int, ...] | None:
    if not re.fullmatch(r"\d+(\.\d+)*", name):
        return None
    return tuple(int(part) for part in name.split("."))


def _has_server_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in _REQUIRED_BINARIES)


@dataclass(frozen=True, slots=True)
class _OsUser:
    name: str
    uid: int
    gid: int
    groups: frozenset[int]


def _server_os_user() -> _OsUser | None:
    """The OS user to run the server as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get(PG_USER_ENV, DEFAULT_SERVER_OS_USER)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ClusterError(
            f"running as root, but there is no OS user {name!r} to run PostgreSQL as "
            "(PostgreSQL refuses to run as root)",
            hint=f"create the user, or set {PG_USER_ENV} to an existing unprivileged user",
        ) from None
    groups = frozenset(os.getgrouplist(name, entry.pw_gid))
    return _OsUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups)


def _is_traversable_by(path: Path, user: _OsUser) -> bool:
    st = path.stat()
    if st.st_uid == user.uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid in user.groups:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def _clean_env() -> dict[str, str]:
    # PG* variables (PGPORT, PGDATA, PGSSLMODE, PGOPTIONS...) would silently
    # redirect or reconfigure our commands; C locale keeps messages parseable.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_literal(value: str) -> str:
    # standard_conforming_strings is on (the default since 9.1): only ' needs doubling.
    if "\0" in value:
        raise ClusterError("SQL string literals cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(name: str) -> str:
    if "\0" in name:
        raise ClusterError("SQL identifiers cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _redact(text: str, secrets_: Iterable[str]) -> str:
    for secret in secrets_:
        if secret:
            text = text.replace(secret, "***")
    return text


# --- TLS material -----------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: accepted by every libpq/OpenSSL build and far quicker to generate than RSA.
    return ec.generate_private_key(ec.SECP256R1())


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
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
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
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address(LOOPBACK_HOST)),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
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


@dataclass(frozen=True, slots=True)
class PgRole:
    """A login role and how the server authenticates it.

    ``method`` is the pg_hba.conf method the role logs in with over TLS:
    ``scram-sha-256``, ``md5`` or ``password`` (cleartext). ``repr`` hides the
    password.
    """

    name: str
    password: str = field(repr=False)
    method: str


# --- the cluster ------------------------------------------------------------------

# "active": stop() has something to undo (a directory, maybe a server).
_State = Literal["new", "active", "stopped"]


# eq=False: a cluster is a resource with identity, not a value.
@dataclass(eq=False)
class TempCluster:
    """A private PostgreSQL server on 127.0.0.1 with TLS; see the module docstring.

    ``base_dir`` must not exist or be empty; if it is None a temporary directory
    is created (and deleted by :meth:`stop`). A directory you pass is kept.
    """

    base_dir: Path | None = None
    superuser_password: str = field(
        default_factory=lambda: secrets.token_urlsafe(_SUPERUSER_PASSWORD_BYTES),
        repr=False,
    )
    host: str = field(default=LOOPBACK_HOST, init=False)
    #: 0 until :meth:`start` picked a free port.
    port: int = field(default=0, init=False)
    #: e.g. "15.18"; empty until started.
    server_version: str = field(default="", init=False)
    bin_dir: Path | None = field(default=None, init=False)

    _state: _State = field(default="new", init=False, repr=False)
    _owns_base_dir: bool = field(default=False, init=False, repr=False)
    _os_user: _OsUser | None = field(default=None, init=False, repr=False)

    # -- layout ----------------------------------------------------------------

    @property
    def _base(self) -> Path:
        if self.base_dir is None:
            raise ClusterError("the cluster has not been started")
        return self.base_dir

    @property
    def data_dir(self) -> Path:
        return self._base / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base / "run"

    @property
    def log_path(self) -> Path:
        return self._base / "postgresql.log"

    @property
    def tls_dir(self) -> Path:
        return self._base / "tls"

    @property
    def ca_cert_path(self) -> Path:
        return self.tls_dir / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self.tls_dir / "ca.key"

    @property
    def other_ca_cert_path(self) -> Path:
        """A CA unrelated to the server certificate: verifying against it must fail."""
        return self.tls_dir / "other-ca.crt"

    @property
    def other_ca_key_path(self) -> Path:
        return self.tls_dir / "other-ca.key"

    @property
    def server_cert_path(self) -> Path:
        return self.tls_dir / "server.crt"

    @property
    def server_key_path(self) -> Path:
        return self.tls_dir / "server.key"

    @property
    def is_running(self) -> bool:
        return self._state == "active" and self.postmaster_pid is not None

    @property
    def postmaster_pid(self) -> int | None:
        """The postmaster's pid from ``postmaster.pid``, or None if there is none."""
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except (OSError, ClusterError):
            return None
        return int(first_line) if first_line.strip().isdigit() else None

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> TempCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Create, configure and start the cluster; on failure leave nothing behind."""
        if self._state != "new":
            raise ClusterError(f"a TempCluster is single-use (state: {self._state})")
        self.bin_dir = find_pg_bin_dir()
        self._os_user = _server_os_user()
        # From here on something may exist that stop() must clean up.
        self._state = "active"
        atexit.register(self.stop)
        try:
            self._prepare_base_dir()
            self._write_tls_material()
            self._initdb()
            self._write_config()
            self._start_server()
            self._create_hba_groups()
            version = self.admin_sql("SHOW server_version")
            self.server_version = version.split()[0] if version else ""
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Fast shutdown, then delete the directory if we created it. Idempotent."""
        if self._state != "active":
            return
        try:
            if self.postmaster_pid is not None:
                self._stop_server()
        finally:
            self._state = "stopped"
            atexit.unregister(self.stop)
            if self._owns_base_dir and self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def reload(self) -> None:
        """Make the server re-read its configuration files (``pg_ctl reload``)."""
        self._require_running()
        self._pg_ctl("reload", timeout=_PG_CTL_SLACK_S)

    # -- SQL and connections ---------------------------------------------------

    def admin_sql(self, sql: str, database: str = "postgres", *, redact: Sequence[str] = ()) -> str:
        """Run ``sql`` with psql as the superuser over the unix socket.

        Returns psql's unaligned, tuples-only output without the final newline.
        Statements run in one session, so a ``SET`` applies to what follows.
        Raises :class:`ClusterError` with psql's stderr, with each string in
        ``redact`` masked, if any statement fails.
        """
        self._require_running()
        argv = [
            self._psql(),
            "--no-psqlrc",
            "--quiet",
            "--no-align",
            "--tuples-only",
            "--set=ON_ERROR_STOP=1",
            f"--host={self.socket_dir}",
            f"--port={self.port}",
            f"--username={SUPERUSER}",
            f"--dbname={database}",
        ]
        # SQL goes through stdin so that no value in it shows up in `ps`.
        result = self._run(argv, as_server_user=False, timeout=_PSQL_TIMEOUT_S, stdin=sql)
        if result.returncode != 0:
            stderr = _redact(result.stderr.strip(), redact)
            raise ClusterError(f"psql failed (exit {result.returncode}): {stderr}")
        return result.stdout.removesuffix("\n")

    def create_role(
        self,
        name: str,
        password: str,
        *,
        method: PasswordEncryption = "scram-sha-256",
        superuser: bool = False,
        login: bool = True,
    ) -> None:
        """Create a role whose password is stored with ``method``.

        A name starting with ``md5_``, ``plain_`` or ``plainnossl_`` also joins
        the group that ``pg_hba.conf`` maps to that authentication method.
        """
        ident = _sql_ident(name)
        statements = [
            # password_encryption decides how CREATE ROLE ... PASSWORD stores the
            # secret ("Password Authentication" in the PostgreSQL documentation).
            f"SET password_encryption = {_sql_literal(method)};",
            f"CREATE ROLE {ident} WITH {'LOGIN' if login else 'NOLOGIN'} "
            f"{'SUPERUSER' if superuser else 'NOSUPERUSER'} "
            f"PASSWORD {_sql_literal(password)};",
        ]
        group = self.hba_group_for(name)
        if group is not None:
            statements.append(f"GRANT {_sql_ident(group)} TO {ident};")
        self.admin_sql("\n".join(statements), redact=[password])

    @staticmethod
    def hba_group_for(role_name: str) -> str | None:
        """The pg_hba.conf group a role joins because of its name prefix, if any."""
        for prefix, group in _HBA_GROUP_BY_PREFIX:
            if role_name.startswith(prefix):
                return group
        return None

    def create_database(self, name: str, owner: str | None = None) -> None:
        sql = f"CREATE DATABASE {_sql_ident(name)}"
        if owner is not None:
            sql += f" OWNER {_sql_ident(owner)}"
        self.admin_sql(sql + ";")

    def dsn(self, user: str, password: str, database: str, sslmode: str = "verify-full") -> str:
        """A libpq URL for a direct TCP connection that trusts only our CA."""
        quote = urllib.parse.quote
        query = urllib.parse.urlencode(
            {"sslmode": sslmode, "sslrootcert": str(self.ca_cert_path)},
            quote_via=urllib.parse.quote,
        )
        return (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{quote(database, safe='')}?{query}"
        )

    def superuser_dsn(self, database: str = "postgres", sslmode: str = "verify-full") -> str:
        return self.dsn(SUPERUSER, self.superuser_password, database, sslmode)

    def read_log(self, start: int = 0) -> str:
        """The server log from byte offset ``start`` (see :meth:`log_size`)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(start)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    # -- internals -------------------------------------------------------------

    def _require_running(self) -> None:
        if self._state != "active":
            raise ClusterError(f"the cluster is not running (state: {self._state})")

    def _psql(self) -> str:
        assert self.bin_dir is not None
        bundled = self.bin_dir / "psql"
        if os.access(bundled, os.X_OK):
            return str(bundled)
        found = shutil.which("psql")
        if found is None:
            raise PostgresNotInstalled("psql not found")
        return found

    def _run(
        self,
        argv: Sequence[str | Path],
        *,
        as_server_user: bool,
        timeout: float,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        user = self._os_user if as_server_user else None
        try:
            return subprocess.run(
                [str(arg) for arg in argv],
                input=stdin if stdin is not None else "",
                capture_output=True,
                text=True,
                timeout=timeout,
                env=_clean_env(),
                # The server user must be able to stat its working directory.
                cwd=self._base,
                user=user.uid if user else None,
                group=user.gid if user else None,
                extra_groups=sorted(user.groups) if user else None,
                umask=0o077,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{Path(argv[0]).name} timed out after {timeout:.0f}s") from exc
        except OSError as exc:
            raise ClusterError(f"could not run {Path(argv[0]).name}: {exc}") from exc

    def _own(self, path: Path) -> None:
        if self._os_user is not None:
            os.chown(path, self._os_user.uid, self._os_user.gid)

    def _write(self, path: Path, data: bytes, mode: int) -> None:
        # O_EXCL + mode at creation: a private key is never readable by others,
        # not even for the moment between write and chmod.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        self._own(path)

    def _mkdir(self, path: Path) -> None:
        path.mkdir(mode=_PRIVATE_DIR_MODE)
        self._own(path)

    def _prepare_base_dir(self) -> None:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="pam-pg-"))
            self._owns_base_dir = True
        else:
            self.base_dir = self.base_dir.resolve()
            if self.base_dir.exists() and any(self.base_dir.iterdir()):
                raise ClusterError(f"base_dir {self.base_dir} is not empty")
            self.base_dir.mkdir(mode=_PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        self._own(self.base_dir)
        socket_path = self.socket_dir / _LONGEST_SOCKET_NAME
        if len(os.fsencode(socket_path)) > _UNIX_SOCKET_PATH_MAX:
            raise ClusterError(
                f"base_dir {self.base_dir} is too long for a unix socket path; "
                "use a shorter directory"
            )
        user = self._os_user
        if user is not None:
            blocked = [p for p in self.base_dir.parents if not _is_traversable_by(p, user)]
            if blocked:
                raise ClusterError(
                    f"OS user {user.name!r} cannot reach {self.base_dir}: "
                    f"{blocked[0]} is not searchable by it",
                    hint="choose a base_dir under a directory like /tmp",
                )
        for directory in (self.data_dir, self.socket_dir, self.tls_dir):
            self._mkdir(directory)

    def _write_tls_material(self) -> None:
        ca_key, ca_cert = _make_ca("pam test CA")
        other_key, other_cert = _make_ca("pam unrelated test CA")
        server_key, server_cert = _issue_server_cert(ca_key, ca_cert)
        self._write(self.ca_cert_path, _cert_pem(ca_cert), _PUBLIC_FILE_MODE)
        self._write(self.ca_key_path, _key_pem(ca_key), _PRIVATE_FILE_MODE)
        self._write(self.other_ca_cert_path, _cert_pem(other_cert), _PUBLIC_FILE_MODE)
        self._write(self.other_ca_key_path, _key_pem(other_key), _PRIVATE_FILE_MODE)
        # The chain is sent so clients that only trust the CA can verify the leaf.
        self._write(self.server_cert_path, _cert_pem(server_cert), _PUBLIC_FILE_MODE)
        # PostgreSQL refuses a key that is group/world readable unless root owns it.
        self._write(self.server_key_path, _key_pem(server_key), _PRIVATE_FILE_MODE)

    def _initdb(self) -> None:
        assert self.bin_dir is not None
        pwfile = self._base / "superuser.pw"
        self._write(pwfile, self.superuser_password.encode(), _PRIVATE_FILE_MODE)
        try:
            result = self._run(
                [
                    self.bin_dir / "initdb",
                    f"--pgdata={self.data_dir}",
                    f"--username={SUPERUSER}",
                    # The password file keeps the secret off the command line and
                    # out of SQL (and so out of the server log).
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    # Throwaway data: skipping fsync saves seconds per cluster.
                    "--no-sync",
                ],
                as_server_user=True,
                timeout=_INITDB_TIMEOUT_S,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ClusterError(
                f"initdb failed (exit {result.returncode}): {_tail(result.stderr.strip())}"
            )

    def _write_config(self) -> None:
        hba = self.data_dir / "pg_hba.conf"
        hba.unlink()
        self._write(hba, _PG_HBA_CONF.encode(), _PRIVATE_FILE_MODE)
        # Our settings live in one included file so a port retry rewrites it whole.
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"\n# Added by pam's pgcluster\ninclude {_conf_quote(_CONF_INCLUDE_NAME)}\n")

    def _write_settings(self) -> None:
        settings: dict[str, str] = {
            "listen_addresses": _conf_quote(self.host),
            "port": str(self.port),
            "unix_socket_directories": _conf_quote(str(self.socket_dir)),
            "ssl": "on",
            "ssl_cert_file": _conf_quote(str(self.server_cert_path)),
            "ssl_key_file": _conf_quote(str(self.server_key_path)),
            "password_encryption": _conf_quote("scram-sha-256"),
            # Durability is pointless for a cluster that is deleted at exit.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": _conf_quote("128MB"),
            "max_connections": "200",
            # pg_ctl -l captures stderr; the collector would only add a process.
            "logging_collector": "off",
            "log_line_prefix": _conf_quote("%m [%p] %q%u@%d "),
            # "connection authenticated: ... method=md5 (pg_hba.conf:4)" lets tests
            # and people see which pg_hba.conf line a login used.
            "log_connections": "on",
        }
        path = self.data_dir / _CONF_INCLUDE_NAME
        path.unlink(missing_ok=True)
        text = "".join(f"{key} = {value}\n" for key, value in settings.items())
        self._write(path, text.encode(), _PRIVATE_FILE_MODE)

    def _start_server(self) -> None:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self.port = free_port()
            self._write_settings()
            log_offset = self.log_size()
            result = self._pg_ctl(
                "start",
                f"--log={self.log_path}",
                timeout=_PG_CTL_WAIT_S + _PG_CTL_SLACK_S,
                check=False,
            )
            if result.returncode == 0:
                return
            new_log = self.read_log(log_offset)
            port_taken = any(marker in new_log for marker in _PORT_IN_USE_MARKERS)
            # A timed-out start can leave a postmaster running: stop it before
            # retrying or raising.
            if self.postmaster_pid is not None:
                self._stop_server()
            if port_taken and attempt < _PORT_ATTEMPTS:
                continue
            raise ClusterError(
                f"PostgreSQL did not start (pg_ctl exit {result.returncode}): "
                f"{result.stderr.strip()}\n--- server log tail ---\n{_tail(self.read_log())}"
            )

    def _pg_ctl(
        self, action: str, *extra: str, timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        assert self.bin_dir is not None
        result = self._run(
            [
                self.bin_dir / "pg_ctl",
                action,
                f"--pgdata={self.data_dir}",
                "--wait",
                f"--timeout={_PG_CTL_WAIT_S}",
                "--silent",
                *extra,
            ],
            as_server_user=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ClusterError(
                f"pg_ctl {action} failed (exit {result.returncode}): {result.stderr.strip()}"
            )
        return result

    def _stop_server(self) -> None:
        """Fast shutdown; if that fails, kill the postmaster so nothing outlives us."""
        pid = self.postmaster_pid
        with contextlib.suppress(ClusterError):
            result = self._pg_ctl(
                "stop", "--mode=fast", timeout=_PG_CTL_WAIT_S + _PG_CTL_SLACK_S, check=False
            )
            if result.returncode == 0:
                return
        if pid is None or not self._is_our_postmaster(pid):
            return
        # SIGQUIT is PostgreSQL's "immediate shutdown"; SIGKILL is the last resort
        # (it can leave orphaned backends, so it is not the first choice).
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if _wait_for_exit(pid, _KILL_WAIT_S):
                return
        raise ClusterError(f"postmaster {pid} survived SIGKILL")

    def _is_our_postmaster(self, pid: int) -> bool:
        """Guard against signalling an unrelated process that reused a stale pid."""
        proc = Path("/proc")
        if not proc.is_dir():
            # No procfs (macOS): the pid file is all we have.
            return _is_alive(pid)
        try:
            cmdline = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            return False
        return os.fsencode(self.data_dir) in cmdline

    def _create_hba_groups(self) -> None:
        statements = [
            f"CREATE ROLE {_sql_ident(group)} NOLOGIN;" for _, group in _HBA_GROUP_BY_PREFIX
        ]
        self.admin_sql("\n".join(statements))


def _is_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie awaiting its reaper is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        # No procfs, or it exited just now: trust the signal probe.
        return not Path("/proc").is_dir()
    # The state letter follows the parenthesised command name, which may itself
    # contain ") ", hence rpartition (proc(5), /proc/pid/stat).
    return not stat.rpartition(") ")[2].startswith("Z")


def _wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_alive(pid):
            return True
        time.sleep(_KILL_POLL_S)
    return not _is_alive(pid)

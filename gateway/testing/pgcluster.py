"""A throwaway PostgreSQL cluster, for ``pam demo`` and the integration tests.

:class:`TempCluster` runs ``initdb`` into a private directory, writes a TLS
certificate chain and a fixed ``pg_hba.conf``, starts the server on a free
loopback port and, on :meth:`TempCluster.stop`, shuts it down and deletes what it
created. It is single-use: ``start()`` once, ``stop()`` as often as you like.

This module is the cluster's lifecycle and its public face; the parts live
beside it: :mod:`~gateway.testing.pginstall` (the binaries and the OS user),
:mod:`~gateway.testing.pgtls` (the CA and certificates),
:mod:`~gateway.testing.pgconf` (pg_hba.conf, settings and admin SQL, including
which authentication method each role name prefix gets) and
:mod:`~gateway.testing.pgserver` (files and commands as the server user,
``initdb``, ``pg_ctl``, stopping). Callers import from here only.

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
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.testing.net import LOOPBACK_HOST, free_port
from gateway.testing.pgconf import (
    CONF_INCLUDE_NAME,
    SUPERUSER,
    PasswordEncryption,
    create_database_sql,
    create_hba_groups_sql,
    create_role_sql,
    hba_group_for,
    include_directive,
    render_settings,
    sql_literal,
)

# Bound to a name of this module, not read from pgconf at each use, so that a
# test can swap in a broken pg_hba.conf here (monkeypatch.setattr(pgcluster, ...)).
from gateway.testing.pgconf import PG_HBA_CONF as _PG_HBA_CONF
from gateway.testing.pgerrors import ClusterError
from gateway.testing.pginstall import (
    INSTALL_HINT,
    PG_BIN_ENV,
    PG_USER_ENV,
    PostgresNotInstalled,
    find_pg_bin_dir,
    find_psql,
    is_traversable_by,
    server_os_user,
)
from gateway.testing.pgserver import (
    PG_CTL_SLACK_S,
    PG_CTL_WAIT_S,
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    PUBLIC_FILE_MODE,
    ServerAccount,
    ServerControl,
    tail,
)
from gateway.testing.pgtls import generate_tls_material

__all__ = [
    "INSTALL_HINT",
    "PG_BIN_ENV",
    "PG_USER_ENV",
    "SUPERUSER",
    "ClusterError",
    "PasswordEncryption",
    "PgRole",
    "PostgresNotInstalled",
    "TempCluster",
    "find_pg_bin_dir",
]

# Seconds: an upper bound so that a wedged server fails the run instead of hanging it.
_PSQL_TIMEOUT_S = 60.0

# Another process may grab the port between our probe and the server's bind().
_PORT_ATTEMPTS = 5
_PORT_IN_USE_MARKERS = ("Address already in use", "could not bind")

# sizeof(sockaddr_un.sun_path) is 108 on Linux, one byte of which is the NUL.
_UNIX_SOCKET_PATH_MAX = 107
_LONGEST_SOCKET_NAME = ".s.PGSQL.65535.lock"

_SUPERUSER_PASSWORD_BYTES = 24

_SETTING_NAME = re.compile(r"[a-z_][a-z0-9_.]*")


def _redact(text: str, secrets_: Iterable[str]) -> str:
    for secret in secrets_:
        if secret:
            text = text.replace(secret, "***")
    return text


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
    _account: ServerAccount = field(default_factory=ServerAccount, init=False, repr=False)

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
        self._account = ServerAccount(server_os_user())
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
        self._server.pg_ctl("reload", timeout=PG_CTL_SLACK_S)

    @contextlib.contextmanager
    def server_settings(self, **values: str) -> Iterator[None]:
        """Server settings for the length of a ``with`` block (``ALTER SYSTEM``
        and a reload), in force for every connection opened inside it, reset
        after: ``with cluster.server_settings(log_statement="all"): ...``.
        The server log (:meth:`read_log`) shows what they make it log."""
        for name in values:
            if not _SETTING_NAME.fullmatch(name):
                raise ClusterError(f"not a server setting name: {name!r}")
        before = {name: self.admin_sql(f"SELECT current_setting('{name}')") for name in values}
        self.admin_sql(
            "".join(f"ALTER SYSTEM SET {n} = {sql_literal(v)};\n" for n, v in values.items())
            + "SELECT pg_reload_conf();"
        )
        self._await_settings(values)
        try:
            yield
        finally:
            self.admin_sql(
                "".join(f"ALTER SYSTEM RESET {name};\n" for name in values)
                + "SELECT pg_reload_conf();"
            )
            self._await_settings(before)

    def _await_settings(self, values: dict[str, str]) -> None:
        """Wait until a new session sees *values* (a reload reaches the postmaster,
        which forks new sessions, asynchronously)."""
        query = "SELECT " + ", ".join(f"current_setting('{name}')" for name in values)
        wanted = "|".join(values.values())
        deadline = time.monotonic() + _PSQL_TIMEOUT_S
        while (seen := self.admin_sql(query)) != wanted:
            if time.monotonic() > deadline:
                raise ClusterError(f"the server did not take the settings: {seen!r}")
            time.sleep(0.05)

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
        result = self._account.run(
            argv, as_server_user=False, cwd=self._base, timeout=_PSQL_TIMEOUT_S, stdin=sql
        )
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
        sql = create_role_sql(name, password, method=method, superuser=superuser, login=login)
        self.admin_sql(sql, redact=[password])

    @staticmethod
    def hba_group_for(role_name: str) -> str | None:
        """The pg_hba.conf group a role joins because of its name prefix, if any."""
        return hba_group_for(role_name)

    def create_database(self, name: str, owner: str | None = None) -> None:
        self.admin_sql(create_database_sql(name, owner))

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

    @property
    def _server(self) -> ServerControl:
        assert self.bin_dir is not None
        return ServerControl(self._account, self.bin_dir, self.data_dir, cwd=self._base)

    def _require_running(self) -> None:
        if self._state != "active":
            raise ClusterError(f"the cluster is not running (state: {self._state})")

    def _psql(self) -> str:
        assert self.bin_dir is not None
        return find_psql(self.bin_dir)

    def _prepare_base_dir(self) -> None:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="pam-pg-"))
            self._owns_base_dir = True
        else:
            self.base_dir = self.base_dir.resolve()
            if self.base_dir.exists() and any(self.base_dir.iterdir()):
                raise ClusterError(f"base_dir {self.base_dir} is not empty")
            self.base_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        self._account.own(self.base_dir)
        socket_path = self.socket_dir / _LONGEST_SOCKET_NAME
        if len(os.fsencode(socket_path)) > _UNIX_SOCKET_PATH_MAX:
            raise ClusterError(
                f"base_dir {self.base_dir} is too long for a unix socket path; "
                "use a shorter directory"
            )
        user = self._account.user
        if user is not None:
            blocked = [p for p in self.base_dir.parents if not is_traversable_by(p, user)]
            if blocked:
                raise ClusterError(
                    f"OS user {user.name!r} cannot reach {self.base_dir}: "
                    f"{blocked[0]} is not searchable by it",
                    hint="choose a base_dir under a directory like /tmp",
                )
        for directory in (self.data_dir, self.socket_dir, self.tls_dir):
            self._account.mkdir(directory)

    def _write_tls_material(self) -> None:
        tls = generate_tls_material()
        write = self._account.write
        write(self.ca_cert_path, tls.ca_cert, PUBLIC_FILE_MODE)
        write(self.ca_key_path, tls.ca_key, PRIVATE_FILE_MODE)
        write(self.other_ca_cert_path, tls.other_ca_cert, PUBLIC_FILE_MODE)
        write(self.other_ca_key_path, tls.other_ca_key, PRIVATE_FILE_MODE)
        write(self.server_cert_path, tls.server_cert, PUBLIC_FILE_MODE)
        # PostgreSQL refuses a key that is group/world readable unless root owns it.
        write(self.server_key_path, tls.server_key, PRIVATE_FILE_MODE)

    def _initdb(self) -> None:
        self._server.initdb(self.superuser_password, pwfile=self._base / "superuser.pw")

    def _write_config(self) -> None:
        hba = self.data_dir / "pg_hba.conf"
        hba.unlink()
        self._account.write(hba, _PG_HBA_CONF.encode(), PRIVATE_FILE_MODE)
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(include_directive())

    def _write_settings(self) -> None:
        text = render_settings(
            host=self.host,
            port=self.port,
            socket_dir=self.socket_dir,
            cert_path=self.server_cert_path,
            key_path=self.server_key_path,
        )
        path = self.data_dir / CONF_INCLUDE_NAME
        path.unlink(missing_ok=True)
        self._account.write(path, text.encode(), PRIVATE_FILE_MODE)

    def _start_server(self) -> None:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self.port = free_port()
            self._write_settings()
            log_offset = self.log_size()
            result = self._server.pg_ctl(
                "start",
                f"--log={self.log_path}",
                timeout=PG_CTL_WAIT_S + PG_CTL_SLACK_S,
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
                f"{result.stderr.strip()}\n--- server log tail ---\n{tail(self.read_log())}"
            )

    def _stop_server(self) -> None:
        """Fast shutdown; if that fails, kill the postmaster so nothing outlives us."""
        self._server.stop(self.postmaster_pid)

    def _create_hba_groups(self) -> None:
        self.admin_sql(create_hba_groups_sql())

"""The state store: resources, accounts, access sessions and connection records.

Role: the gateway's only persistent state, behind a small synchronous API that the
service layer calls from one worker thread or via ``asyncio.to_thread``. The same
code runs on SQLite (the default, a single file) and on PostgreSQL.

Invariants:

* :meth:`Store.open` brings the schema to the newest alembic revision before
  anything else touches it; opening an up-to-date database changes nothing.
* Every public method is one database transaction: a multi-row change is either
  wholly visible or not at all. Names are resolved inside the same transaction
  that uses them, with row locks on PostgreSQL, so "remove a resource" and
  "start a session on it" cannot interleave into a session without a resource.
* Passwords are sealed by :class:`~gateway.crypto.SecretBox` with associated data
  ``b"pam/account/" + account_id`` before they reach SQL, so the database (and its
  WAL, backups and logs) only ever holds ciphertext bound to its own row. SQL
  parameters are hidden from SQLAlchemy's error messages, and no error raised
  here contains a password.
* Ending a session or a connection is idempotent: the first end wins and later
  calls return the record unchanged.
* Input is validated here, at the boundary, and refused with
  :class:`~gateway.errors.InvalidRequest` naming the field; the database is never
  the first line of validation.
"""

from __future__ import annotations

import contextlib
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from cryptography import x509
from sqlalchemy import Connection, Engine, create_engine, event, func, select, text
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from gateway.crypto import SecretBox, SecretDecryptError
from gateway.errors import AlreadyExists, ConfigError, GatewayError, InvalidRequest, NotFound
from gateway.store.models import (
    CONNECTION_END_REASONS,
    NAME_PATTERN,
    SESSION_END_REASONS,
    SSL_MODES,
    AccessSession,
    Account,
    ConnectionRecord,
    Resource,
)
from gateway.store.schema import accounts, connections, resources, sessions

if TYPE_CHECKING:
    from typing import TypeAlias

    #: A result row of any shape (SQLAlchemy 2.1 types rows by their column tuple).
    _AnyRow: TypeAlias = Row[*tuple[Any, ...]]

__all__ = ["Store", "StoreError"]

_MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

#: How long SQLite waits for another process's write lock before giving up.
_SQLITE_BUSY_TIMEOUT_MS: Final = 5_000
#: Execution option telling the SQLite ``begin`` hook how to start a transaction.
_SQLITE_BEGIN_OPTION: Final = "pam_sqlite_begin"
#: Key of the PostgreSQL advisory lock that serialises concurrent migrations
#: (two gateways starting against one empty database). Arbitrary but fixed.
_PG_MIGRATION_LOCK_KEY: Final = 0x70616D_73746F7265  # "pam" "store"

_SESSION_ID_MIN_PREFIX: Final = 6
_ID_CHARS: Final = re.compile(r"[0-9a-f]{1,32}")
_SQLSTATE: Final = re.compile(r"[0-9A-Z]{5}")

_NAME_RULE: Final = (
    "use 1-63 characters from a-z, 0-9, '_', '.', '-', starting with a letter or digit"
)


class StoreError(GatewayError):
    """The database behind the state store failed (unreachable, locked, broken)."""


def _new_id() -> str:
    return uuid.uuid4().hex


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _account_aad(account_id: str) -> bytes:
    # Binding the ciphertext to its row means a blob copied onto another account
    # (by a bug, or by someone with write access to the database) fails to open
    # instead of silently handing out the wrong password.
    return b"pam/account/" + account_id.encode()


# -- validation -----------------------------------------------------------------


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise InvalidRequest(f"invalid {kind} name {value!r}: {_NAME_RULE}")
    return value


def _check_text(field: str, value: str | None, *, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise InvalidRequest(f"{field} is required")
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a string")
    if required and not value.strip():
        raise InvalidRequest(f"{field} must not be empty")
    # PostgreSQL text cannot hold NUL; refusing it here keeps both backends alike.
    if "\x00" in value:
        raise InvalidRequest(f"{field} must not contain a NUL character")
    return value


def _required_text(field: str, value: str) -> str:
    checked = _check_text(field, value)
    assert checked is not None
    return checked


def _check_port(field: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidRequest(f"{field} must be an integer from 1 to 65535, not {value!r}")
    return value


def _check_count(field: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"{field} must be a non-negative integer, not {value!r}")
    return value


def _check_time(field: str, value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRequest(f"{field} must be a timezone-aware datetime")
    return value.astimezone(UTC)


def _check_ssl_mode(value: str) -> str:
    if value not in SSL_MODES:
        allowed = ", ".join(sorted(SSL_MODES))
        raise InvalidRequest(f"invalid ssl_mode {value!r}: use one of {allowed}")
    return value


def _check_ca_cert(value: str | None) -> str | None:
    if value is None:
        return None
    _required_text("ca_cert", value)
    # Parse now so a bad certificate is refused when it is added, not when the first
    # user tries to connect.
    try:
        x509.load_pem_x509_certificates(value.encode())
    except ValueError:
        raise InvalidRequest("ca_cert is not a PEM-encoded X.509 certificate (or bundle)") from None
    return value


def _check_password(value: str) -> str:
    # The value itself never goes into a message.
    if not isinstance(value, str) or not value:
        raise InvalidRequest("password must be a non-empty string")
    if "\x00" in value:
        raise InvalidRequest("password must not contain a NUL character")
    return value


def _check_reason(kind: str, value: str, allowed: frozenset[str]) -> str:
    if value not in allowed:
        raise InvalidRequest(
            f"invalid {kind} end reason {value!r}: use one of {', '.join(sorted(allowed))}"
        )
    return value


# -- rows to records --------------------------------------------------------------


def _resource(row: _AnyRow) -> Resource:
    return Resource(
        id=row.id,
        name=row.name,
        host=row.host,
        port=row.port,
        database=row.database,
        ssl_mode=row.ssl_mode,
        ca_cert=row.ca_cert,
        created_at=row.created_at,
    )


def _account(row: _AnyRow) -> Account:
    return Account(
        id=row.id,
        resource_id=row.resource_id,
        resource_name=row.resource_name,
        name=row.name,
        username=row.username,
        created_at=row.created_at,
        password_updated_at=row.password_updated_at,
    )


def _session(row: _AnyRow) -> AccessSession:
    return AccessSession(
        id=row.id,
        requester=row.requester,
        resource_name=row.resource_name,
        account_name=row.account_name,
        database=row.database,
        username=row.username,
        listen_host=row.listen_host,
        listen_port=row.listen_port,
        started_at=row.started_at,
        expires_at=row.expires_at,
        ended_at=row.ended_at,
        end_reason=row.end_reason,
        end_detail=row.end_detail,
    )


def _connection(row: _AnyRow) -> ConnectionRecord:
    return ConnectionRecord(
        id=row.id,
        session_id=row.session_id,
        client_addr=row.client_addr,
        application_name=row.application_name,
        backend_pid=row.backend_pid,
        started_at=row.started_at,
        ended_at=row.ended_at,
        bytes_from_client=row.bytes_from_client,
        bytes_from_server=row.bytes_from_server,
        end_reason=row.end_reason,
        error_sqlstate=row.error_sqlstate,
        error_message=row.error_message,
    )


# Accounts are always read with their resource's name.
_ACCOUNT_COLUMNS: Final = (
    accounts.c.id,
    accounts.c.resource_id,
    resources.c.name.label("resource_name"),
    accounts.c.name,
    accounts.c.username,
    accounts.c.created_at,
    accounts.c.password_updated_at,
)
_ACCOUNTS_JOIN: Final = accounts.join(resources, accounts.c.resource_id == resources.c.id)


# -- engine set-up ----------------------------------------------------------------


def _create_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not echoing the URL: a malformed one may still contain a password.
        raise ConfigError(
            "invalid state store URL",
            hint="use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB",
        ) from None
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.drivername == "postgresql":
        # SQLAlchemy's default PostgreSQL driver is psycopg2; pam ships with psycopg 3.
        parsed = parsed.set(drivername="postgresql+psycopg")
    safe_url = parsed.render_as_string(hide_password=True)
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"unsupported state store URL {safe_url}: use sqlite:///PATH or "
            "postgresql+psycopg://..."
        )
    try:
        if backend == "sqlite":
            return _create_sqlite_engine(parsed.database)
        return create_engine(parsed, hide_parameters=True, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise ConfigError(f"cannot use state store URL {safe_url}: {exc}") from None


def _create_sqlite_engine(database: str | None) -> Engine:
    in_memory = database in (None, "", ":memory:")
    if in_memory:
        # One shared connection, or every thread would see its own empty database.
        engine = create_engine(
            "sqlite://",
            hide_parameters=True,
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
        )
    else:
        engine = create_engine(
            f"sqlite:///{database}",
            hide_parameters=True,
            connect_args={"check_same_thread": False},
        )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below issue BEGIN itself: the sqlite3
        # module's implicit transactions start too late and always DEFERRED.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")
        # WAL lets readers (the CLI) run while the gateway writes.
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # A write transaction takes the write lock up front (IMMEDIATE): a DEFERRED
        # one that reads and then writes can fail with SQLITE_BUSY at once, without
        # honouring busy_timeout, if another process wrote in between.
        mode = connection.get_execution_options().get(_SQLITE_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _upgrade_schema(connection: Connection) -> None:
    config = Config()
    # ConfigParser interpolates '%'; a path containing one must be escaped.
    config.set_main_option("script_location", str(_MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


class Store:
    """Synchronous access to the gateway's persistent state. See the module docstring."""

    def __init__(
        self,
        engine: Engine,
        box: SecretBox,
        *,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        """Wrap an engine whose schema is already at head; use :meth:`open` instead."""
        self._engine = engine
        self._box = box
        self._clock = clock
        self._closed = False
        # SQLite allows one writer per file anyway; serialising this process's
        # threads here turns lock contention into a short wait instead of an error,
        # and makes the shared in-memory connection safe. PostgreSQL needs no lock.
        self._lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )

    @classmethod
    def open(
        cls,
        url: str,
        box: SecretBox,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> Store:
        """Connect to the store at *url* and migrate its schema to the newest revision.

        *url* is ``sqlite:///PATH`` or ``postgresql+psycopg://...`` (a bare
        ``postgresql://`` means psycopg 3). *clock* returns the current time as an
        aware datetime; tests pass a fake one. Raises :class:`ConfigError` if the
        database cannot be opened or has a schema newer than this code.
        """
        engine = _create_engine(url)
        safe_url = engine.url.render_as_string(hide_password=True)
        try:
            with engine.connect() as connection:
                connection.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})
                with connection.begin():
                    if engine.dialect.name == "postgresql":
                        # Transaction-scoped: released by the commit below.
                        connection.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"),
                            {"key": _PG_MIGRATION_LOCK_KEY},
                        )
                    _upgrade_schema(connection)
        except CommandError as exc:
            engine.dispose()
            raise ConfigError(
                f"cannot migrate the state store {safe_url}: {exc}",
                hint="was it created by a newer version of pam?",
            ) from None
        except DBAPIError as exc:
            engine.dispose()
            raise ConfigError(f"cannot open the state store {safe_url}: {exc.orig}") from None
        return cls(engine, box, clock=clock if clock is not None else _utcnow)

    def close(self) -> None:
        """Release every database connection. The store cannot be used afterwards."""
        self._closed = True
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self._engine.url.render_as_string(hide_password=True)!r})"

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Connection]:
        """One transaction; commits if the block returns, rolls back if it raises."""
        if self._closed:
            raise ConfigError("the state store has been closed")
        try:
            with self._lock, self._engine.connect() as connection:
                if write:
                    connection.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})
                with connection.begin():
                    yield connection
        except IntegrityError:
            # Callers turn constraint violations into AlreadyExists and friends.
            raise
        except DBAPIError as exc:
            # Parameters are hidden (hide_parameters=True), so this cannot leak a
            # ciphertext, let alone a password.
            raise StoreError(f"state store error: {exc.orig}") from exc

    def _now(self) -> datetime:
        return _check_time("clock()", self._clock())

    # -- resources ------------------------------------------------------------------

    def add_resource(
        self,
        name: str,
        host: str,
        port: int,
        database: str,
        ssl_mode: str = "verify-full",
        ca_cert: str | None = None,
    ) -> Resource:
        """Register an upstream database. Raises :class:`AlreadyExists` for a taken name."""
        row = {
            "id": _new_id(),
            "name": _check_name("resource", name),
            "host": _required_text("host", host),
            "port": _check_port("port", port),
            "database": _required_text("database", database),
            "ssl_mode": _check_ssl_mode(ssl_mode),
            "ca_cert": _check_ca_cert(ca_cert),
            "created_at": self._now(),
        }
        try:
            with self._transaction(write=True) as conn:
                conn.execute(resources.insert().values(row))
        except IntegrityError:
            raise AlreadyExists(f"resource '{name}' already exists") from None
        return Resource.model_validate(row)

    def get_resource(self, name: str) -> Resource:
        with self._transaction(write=False) as conn:
            return _resource(self._resource_row(conn, name))

    def list_resources(self) -> list[Resource]:
        """Every resource, ordered by name."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(select(resources)).all()
        # Sorted here rather than in SQL: PostgreSQL orders text by the database's
        # collation (which may ignore '-' and '.'), SQLite by bytes.
        return sorted((_resource(r) for r in rows), key=lambda r: r.name)

    def remove_resource(self, name: str) -> None:
        """Delete a resource and its accounts; refused while a session on it is active."""
        with self._transaction(write=True) as conn:
            resource = self._resource_row(conn, name, lock="update")
            active = self._count_active_sessions(conn, sessions.c.resource_name == name)
            if active:
                raise InvalidRequest(
                    f"resource '{name}' has {active} active session(s); end them first"
                )
            conn.execute(accounts.delete().where(accounts.c.resource_id == resource.id))
            conn.execute(resources.delete().where(resources.c.id == resource.id))

    # -- accounts -------------------------------------------------------------------

    def add_account(self, resource: str, name: str, username: str, password: str) -> Account:
        """Add an upstream login to *resource*; the password is stored sealed."""
        _check_name("account", name)
        _required_text("username", username)
        _check_password(password)
        account_id = _new_id()
        now = self._now()
        sealed = self._box.encrypt(password.encode(), aad=_account_aad(account_id))
        try:
            with self._transaction(write=True) as conn:
                parent = self._resource_row(conn, resource, lock="share")
                conn.execute(
                    accounts.insert().values(
                        id=account_id,
                        resource_id=parent.id,
                        name=name,
                        username=username,
                        password_ciphertext=sealed,
                        created_at=now,
                        password_updated_at=now,
                    )
                )
        except IntegrityError:
            raise AlreadyExists(
                f"account '{name}' already exists on resource '{resource}'"
            ) from None
        return Account(
            id=account_id,
            resource_id=parent.id,
            resource_name=resource,
            name=name,
            username=username,
            created_at=now,
            password_updated_at=now,
        )

    def get_account(self, resource: str, name: str) -> Account:
        with self._transaction(write=False) as conn:
            return _account(self._account_row(conn, resource, name))

    def list_accounts(self, resource: str | None = None) -> list[Account]:
        """Accounts of *resource* (which must exist), or of every resource.

        Ordered by resource name, then account name.
        """
        with self._transaction(write=False) as conn:
            query = select(*_ACCOUNT_COLUMNS).select_from(_ACCOUNTS_JOIN)
            if resource is not None:
                parent = self._resource_row(conn, resource)
                query = query.where(accounts.c.resource_id == parent.id)
            rows = conn.execute(query).all()
        return sorted((_account(r) for r in rows), key=lambda a: (a.resource_name, a.name))

    def reveal_password(self, resource: str, name: str) -> str:
        """Decrypt and return an account's password.

        Only the upstream connector should call this, right before authenticating.
        Raises :class:`SecretDecryptError` if the stored value cannot be opened.
        """
        with self._transaction(write=False) as conn:
            row = self._account_row(conn, resource, name)
            sealed = conn.execute(
                select(accounts.c.password_ciphertext).where(accounts.c.id == row.id)
            ).scalar_one()
        try:
            return self._box.decrypt(bytes(sealed), aad=_account_aad(row.id)).decode()
        except SecretDecryptError as exc:
            raise SecretDecryptError(
                f"cannot decrypt the password of account '{name}' on resource "
                f"'{resource}': {exc.message}",
                hint="check that the gateway uses the master key the password was "
                "stored with, or set the password again",
            ) from None

    def rotate_password(self, resource: str, name: str, password: str) -> Account:
        """Replace an account's stored password."""
        _check_password(password)
        now = self._now()
        with self._transaction(write=True) as conn:
            row = self._account_row(conn, resource, name, lock="update")
            # A fresh nonce, so the new ciphertext shares nothing with the old one.
            sealed = self._box.encrypt(password.encode(), aad=_account_aad(row.id))
            conn.execute(
                accounts.update()
                .where(accounts.c.id == row.id)
                .values(password_ciphertext=sealed, password_updated_at=now)
            )
        return _account(row).model_copy(update={"password_updated_at": now})

    def remove_account(self, resource: str, name: str) -> None:
        """Delete an account; refused while a session using it is active."""
        with self._transaction(write=True) as conn:
            row = self._account_row(conn, resource, name, lock="update")
            active = self._count_active_sessions(
                conn,
                (sessions.c.resource_name == resource) & (sessions.c.account_name == name),
            )
            if active:
                raise InvalidRequest(
                    f"account '{name}' on resource '{resource}' has {active} active "
                    "session(s); end them first"
                )
            conn.execute(accounts.delete().where(accounts.c.id == row.id))

    # -- sessions -------------------------------------------------------------------

    def create_session(
        self,
        *,
        requester: str,
        resource: str,
        account: str,
        listen_host: str,
        expires_at: datetime,
        started_at: datetime | None = None,
    ) -> AccessSession:
        """Start an access session, copying the database and username into it."""
        _required_text("requester", requester)
        _required_text("listen_host", listen_host)
        expires = _check_time("expires_at", expires_at)
        started = self._now() if started_at is None else _check_time("started_at", started_at)
        if expires <= started:
            raise InvalidRequest("expires_at must be later than started_at")
        with self._transaction(write=True) as conn:
            parent = self._resource_row(conn, resource, lock="share")
            login = self._account_row(conn, resource, account, lock="share")
            row = {
                "id": _new_id(),
                "requester": requester,
                "resource_name": resource,
                "account_name": account,
                "database": parent.database,
                "username": login.username,
                "listen_host": listen_host,
                "listen_port": None,
                "started_at": started,
                "expires_at": expires,
            }
            conn.execute(sessions.insert().values(row))
        return AccessSession.model_validate(row)

    def set_session_port(self, session_id: str, port: int) -> None:
        """Record the local port the session's listener is bound to."""
        _check_port("port", port)
        with self._transaction(write=True) as conn:
            result = conn.execute(
                sessions.update().where(sessions.c.id == session_id).values(listen_port=port)
            )
            if result.rowcount == 0:
                raise NotFound(f"session '{session_id}' not found")

    def end_session(
        self,
        session_id: str,
        *,
        reason: str,
        detail: str | None = None,
        ended_at: datetime | None = None,
    ) -> AccessSession:
        """End a session. If it has already ended, return it unchanged.

        Open connections of the session are left to the caller, which knows how
        each of them ended.
        """
        _check_reason("session", reason, SESSION_END_REASONS)
        _check_text("detail", detail, required=False)
        ended = self._now() if ended_at is None else _check_time("ended_at", ended_at)
        with self._transaction(write=True) as conn:
            # "WHERE ended_at IS NULL" makes the first end win, even against a
            # concurrent caller; the select then reports whichever end that was.
            conn.execute(
                sessions.update()
                .where(sessions.c.id == session_id, sessions.c.ended_at.is_(None))
                .values(ended_at=ended, end_reason=reason, end_detail=detail)
            )
            return _session(self._session_row(conn, session_id))

    def get_session(self, session_id: str) -> AccessSession:
        """A session by full id, or by a unique prefix of at least 6 characters."""
        with self._transaction(write=False) as conn:
            return _session(self._session_row(conn, self._resolve_session_id(conn, session_id)))

    def list_sessions(self, *, active: bool | None = None, limit: int = 100) -> list[AccessSession]:
        """Sessions, newest first; *active* selects only active (True) or ended (False)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRequest(f"limit must be a positive integer, not {limit!r}")
        query = select(sessions).order_by(sessions.c.started_at.desc(), sessions.c.id.desc())
        if active is True:
            query = query.where(sessions.c.ended_at.is_(None))
        elif active is False:
            query = query.where(sessions.c.ended_at.is_not(None))
        with self._transaction(write=False) as conn:
            return [_session(r) for r in conn.execute(query.limit(limit))]

    def close_orphans(self, reason: str = "gateway_crash") -> int:
        """End every session and connection still open; returns the sessions closed.

        Called when the gateway starts: anything still open was left behind by a
        gateway that stopped without recording it (crash, kill -9, power loss).
        """
        _check_reason("session", reason, SESSION_END_REASONS)
        _check_reason("connection", reason, CONNECTION_END_REASONS)
        now = self._now()
        with self._transaction(write=True) as conn:
            conn.execute(
                connections.update()
                .where(connections.c.ended_at.is_(None))
                .values(ended_at=now, end_reason=reason)
            )
            result = conn.execute(
                sessions.update()
                .where(sessions.c.ended_at.is_(None))
                .values(ended_at=now, end_reason=reason)
            )
            return result.rowcount

    # -- connections ----------------------------------------------------------------

    def create_connection(
        self,
        session_id: str,
        *,
        client_addr: str,
        application_name: str | None = None,
    ) -> ConnectionRecord:
        """Record a new client connection in an active session."""
        _required_text("client_addr", client_addr)
        _check_text("application_name", application_name, required=False)
        now = self._now()
        with self._transaction(write=True) as conn:
            parent = self._session_row(conn, session_id, lock="share")
            if parent.ended_at is not None:
                raise InvalidRequest(f"session '{session_id}' has ended")
            row = {
                "id": _new_id(),
                "session_id": session_id,
                "client_addr": client_addr,
                "application_name": application_name,
                "backend_pid": None,
                "started_at": now,
                "bytes_from_client": 0,
                "bytes_from_server": 0,
            }
            conn.execute(connections.insert().values(row))
        return ConnectionRecord.model_validate(row)

    def set_connection_backend_pid(self, connection_id: str, pid: int) -> None:
        """Record the upstream server's process id for a connection (for pg_stat_activity)."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
            raise InvalidRequest(f"pid must be a non-negative integer, not {pid!r}")
        with self._transaction(write=True) as conn:
            result = conn.execute(
                connections.update()
                .where(connections.c.id == connection_id)
                .values(backend_pid=pid)
            )
            if result.rowcount == 0:
                raise NotFound(f"connection '{connection_id}' not found")

    def end_connection(
        self,
        connection_id: str,
        *,
        reason: str,
        bytes_from_client: int,
        bytes_from_server: int,
        error_sqlstate: str | None = None,
        error_message: str | None = None,
        ended_at: datetime | None = None,
    ) -> ConnectionRecord:
        """End a connection with its byte counts. If already ended, return it unchanged."""
        _check_reason("connection", reason, CONNECTION_END_REASONS)
        _check_count("bytes_from_client", bytes_from_client)
        _check_count("bytes_from_server", bytes_from_server)
        if error_sqlstate is not None and not _SQLSTATE.fullmatch(error_sqlstate):
            raise InvalidRequest("error_sqlstate must be a 5-character SQLSTATE code")
        _check_text("error_message", error_message, required=False)
        ended = self._now() if ended_at is None else _check_time("ended_at", ended_at)
        with self._transaction(write=True) as conn:
            conn.execute(
                connections.update()
                .where(connections.c.id == connection_id, connections.c.ended_at.is_(None))
                .values(
                    ended_at=ended,
                    end_reason=reason,
                    bytes_from_client=bytes_from_client,
                    bytes_from_server=bytes_from_server,
                    error_sqlstate=error_sqlstate,
                    error_message=error_message,
                )
            )
            row = conn.execute(
                select(connections).where(connections.c.id == connection_id)
            ).one_or_none()
            if row is None:
                raise NotFound(f"connection '{connection_id}' not found")
            return _connection(row)

    def list_connections(self, session_id: str) -> list[ConnectionRecord]:
        """The connections of a session, oldest first."""
        with self._transaction(write=False) as conn:
            self._session_row(conn, session_id)
            rows = conn.execute(
                select(connections)
                .where(connections.c.session_id == session_id)
                .order_by(connections.c.started_at, connections.c.id)
            ).all()
        return [_connection(r) for r in rows]

    # -- helpers (inside a transaction) -------------------------------------------------

    @staticmethod
    def _resource_row(conn: Connection, name: str, *, lock: str | None = None) -> _AnyRow:
        query = select(resources).where(resources.c.name == name)
        # Row locks only matter on PostgreSQL; SQLite's BEGIN IMMEDIATE already
        # serialises writers and SQLAlchemy renders nothing for it there.
        if lock is not None:
            query = query.with_for_update(read=lock == "share")
        row = conn.execute(query).one_or_none()
        if row is None:
            raise NotFound(f"resource '{name}' not found")
        return row

    @staticmethod
    def _account_row(
        conn: Connection, resource: str, name: str, *, lock: str | None = None
    ) -> _AnyRow:
        query = (
            select(*_ACCOUNT_COLUMNS)
            .select_from(_ACCOUNTS_JOIN)
            .where(resources.c.name == resource, accounts.c.name == name)
        )
        if lock is not None:
            query = query.with_for_update(read=lock == "share", of=accounts)
        row = conn.execute(query).one_or_none()
        if row is None:
            # Say which part is missing; "account not found" on a mistyped resource
            # name sends people looking in the wrong place.
            Store._resource_row(conn, resource)
            raise NotFound(f"account '{name}' not found on resource '{resource}'")
        return row

    @staticmethod
    def _session_row(conn: Connection, session_id: str, *, lock: str | None = None) -> _AnyRow:
        query = select(sessions).where(sessions.c.id == session_id)
        if lock is not None:
            query = query.with_for_update(read=lock == "share")
        row = conn.execute(query).one_or_none()
        if row is None:
            raise NotFound(f"session '{session_id}' not found")
        return row

    @staticmethod
    def _resolve_session_id(conn: Connection, session_id: str) -> str:
        key = session_id.strip().lower()
        if not _ID_CHARS.fullmatch(key):
            raise NotFound(f"session '{session_id}' not found")
        if len(key) == 32:
            return key
        if len(key) < _SESSION_ID_MIN_PREFIX:
            raise InvalidRequest(
                f"session id prefix '{session_id}' is too short: give at least "
                f"{_SESSION_ID_MIN_PREFIX} characters"
            )
        # Ids are lower-case hex (checked above), so the prefix has no LIKE wildcards.
        matches = (
            conn.execute(select(sessions.c.id).where(sessions.c.id.startswith(key)).limit(2))
            .scalars()
            .all()
        )
        if not matches:
            raise NotFound(f"session '{session_id}' not found")
        if len(matches) > 1:
            raise InvalidRequest(
                f"session id prefix '{session_id}' matches more than one session; "
                "give more characters"
            )
        return str(matches[0])

    @staticmethod
    def _count_active_sessions(conn: Connection, condition: Any) -> int:
        count = conn.execute(
            select(func.count())
            .select_from(sessions)
            .where(condition, sessions.c.ended_at.is_(None))
        ).scalar_one()
        return int(count)

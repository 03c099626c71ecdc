"""Opening the state store: the engine, SQLite's settings, migrations, transactions.

Role: everything about the database connection that is not about one kind of
record, and :class:`StoreBase`, the state every aggregate's store class shares
(engine, secret box, clock, audit chain). The same code runs on SQLite (the
default, a single file) and on PostgreSQL.

Invariants:

* A new SQLite store file is created with mode 0600 (its -wal and -shm files
  take the same mode): it holds sealed passwords and the audit trail.
* :meth:`StoreBase.open` brings the schema to the newest alembic revision before
  anything else touches it; opening an up-to-date database changes nothing. Two
  gateways migrating one PostgreSQL database at once take turns (an advisory lock).
* :meth:`StoreBase._transaction` is the only way to the database: the block is one
  transaction, committed if it returns and rolled back if it raises. On SQLite a
  write transaction takes the write lock up front (``BEGIN IMMEDIATE``).
* SQL parameters are hidden from SQLAlchemy's error messages (``hide_parameters``),
  and a database failure is a :class:`~gateway.errors.StoreError` naming the
  database's own message, so no error raised here contains a password or a
  ciphertext.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, Self, get_args

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from gateway.audit.chain import AUDIT_KEY_INFO, AuditChain
from gateway.credentials.secretbox import SecretBox
from gateway.errors import ConfigError, StoreError
from gateway.store.schema import UtcTimestamp
from gateway.store.validation import check_time

__all__ = ["SqliteSynchronous", "StoreBase"]


#: SQLite's ``synchronous`` setting for the store file (see :meth:`StoreBase.open`).
SqliteSynchronous = Literal["normal", "full"]

_MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

#: How long SQLite waits for another process's write lock before giving up.
_SQLITE_BUSY_TIMEOUT_MS: Final = 5_000

#: Mode of a new SQLite store file (and so of its -wal and -shm files).
_STORE_FILE_MODE: Final = 0o600

#: Execution option telling the SQLite ``begin`` hook how to start a transaction.
_SQLITE_BEGIN_OPTION: Final = "pam_sqlite_begin"

#: Key of the PostgreSQL advisory lock that serialises concurrent migrations
#: (two gateways starting against one empty database). Arbitrary but fixed.
_PG_MIGRATION_LOCK_KEY: Final = 0x70616D_73746F7265  # "pam" "store"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _create_engine(url: str, sqlite_synchronous: SqliteSynchronous) -> Engine:
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
            return _create_sqlite_engine(parsed.database, sqlite_synchronous)
        return create_engine(parsed, hide_parameters=True, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise ConfigError(f"cannot use state store URL {safe_url}: {exc}") from None


def _create_sqlite_engine(database: str | None, synchronous: SqliteSynchronous) -> Engine:
    _bind_none_directly()
    if not database or database == ":memory:":
        # One shared connection, or every thread would see its own empty database.
        engine = create_engine(
            "sqlite://",
            hide_parameters=True,
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
        )
    else:
        _create_private_file(database)
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
        # NORMAL: a commit survives the process dying, and the file is never
        # corrupted, but the last commits before a power loss or OS crash may be
        # rolled back; FULL also fsyncs every commit (see StoreBase.open).
        cursor.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # A write transaction takes the write lock up front (IMMEDIATE): a DEFERRED
        # one that reads and then writes can fail with SQLITE_BUSY at once, without
        # honouring busy_timeout, if another process wrote in between.
        mode = connection.get_execution_options().get(_SQLITE_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _create_private_file(path: str) -> None:
    """Create the store file *path*, empty and mode 0600, unless it exists.

    It holds sealed passwords and the audit trail (SQL text and parameters), so
    it is private like ``master.key``. SQLite gives its -wal and -shm files the
    main file's mode, so they follow. Created with the mode in ``open()``, never
    chmod-ed later, so it is not readable by others even for a moment; SQLite
    takes an empty file as an empty database. An existing file keeps the mode
    its operator gave it.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _STORE_FILE_MODE)
    except OSError:
        # It exists (the usual case), or the directory is missing or not
        # writable, which SQLite reports next in its own words.
        return
    try:
        # A restrictive umask can only remove bits; this makes the mode exactly 0600.
        os.fchmod(fd, _STORE_FILE_MODE)
    finally:
        os.close(fd)


def _bind_none_directly() -> None:
    """Register ``None``'s adapter with the sqlite3 module: a NULL without the search.

    For every ``None`` it binds, CPython's sqlite3 (3.11) looks for an adapter,
    asks the protocol and then the value for one, and each miss on the protocol
    formats and clears an ``AttributeError``: about 0.5 µs per NULL, and an audit
    row binds ten or more. A registered adapter ends the search at the first
    lookup. ``{}.get`` maps ``None`` to ``None`` in C (a lambda costs a Python
    call); the module then binds NULL exactly as before. Process-wide, and the
    same for every user of sqlite3: ``None`` still means NULL.
    """
    sqlite3.register_adapter(type(None), _NONE_TO_NONE)


#: ``_NONE_TO_NONE(None) is None``
_NONE_TO_NONE: Final = dict[None, None]().get


def _upgrade_schema(connection: Connection) -> None:
    config = Config()
    # ConfigParser interpolates '%'; a path containing one must be escaped.
    config.set_main_option("script_location", str(_MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


class StoreBase:
    """The state every part of :class:`~gateway.store.Store` shares, and the way
    to the database. Holds no method of its own about any kind of record."""

    def __init__(
        self,
        engine: Engine,
        box: SecretBox,
        *,
        clock: Callable[[], datetime] = _utcnow,
        audit_key: bytes | None = None,
    ) -> None:
        """Wrap an engine whose schema is already at head; use :meth:`open` instead."""
        self._engine = engine
        self._box = box
        self._clock = clock
        self._closed = False
        # The audit trail's state (used by TrailStore and its subclasses) is set up
        # here too, so that one constructor serves every part of the Store.
        self._chain = AuditChain(
            audit_key if audit_key is not None else box.derive_key(AUDIT_KEY_INFO)
        )
        # A key given by the caller stays; otherwise the chain follows the
        # active master key version (gateway.store.master_keys).
        self._audit_key_given = audit_key is not None
        # session id -> (seq, hash) of the last record this store wrote or saw.
        self._heads: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._heads_lock = threading.Lock()
        # Audit rows are inserted as driver SQL (AuditStore._insert_audit_rows), so
        # their timestamps take the column type's conversion by hand.
        self._timestamp_param = functools.partial(
            UtcTimestamp().process_bind_param, dialect=engine.dialect
        )
        self._iso_timestamps = engine.dialect.name != "postgresql"
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
        audit_key: bytes | None = None,
        sqlite_synchronous: SqliteSynchronous = "normal",
    ) -> Self:
        """Connect to the store at *url* and migrate its schema to the newest revision.

        *url* is ``sqlite:///PATH`` or ``postgresql+psycopg://...`` (a bare
        ``postgresql://`` means psycopg 3). *clock* returns the current time as an
        aware datetime; tests pass a fake one. *audit_key* is the audit chain's HMAC
        key; by default it is derived from *box*'s master key
        (``box.derive_key(AUDIT_KEY_INFO)``), which is what every process sharing
        the store must use to append and verify. *sqlite_synchronous* is SQLite's
        ``synchronous`` setting: ``normal`` (the default, what SQLite recommends
        with WAL: nothing is lost when the process dies, the last commits can be
        when the machine loses power) or ``full`` (every commit is fsynced, which
        costs about half a millisecond of CPU each on a virtual disk). Raises
        :class:`ConfigError` if the database cannot be opened or has a schema
        newer than this code.
        """
        # Checked before connecting, so a bad key leaves nothing open.
        chain_key = audit_key if audit_key is not None else box.derive_key(AUDIT_KEY_INFO)
        AuditChain(chain_key)
        if sqlite_synchronous not in get_args(SqliteSynchronous):
            raise ConfigError(
                f"sqlite_synchronous must be 'normal' or 'full', not {sqlite_synchronous!r}"
            )
        engine = _create_engine(url, sqlite_synchronous)
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
        store = cls(engine, box, clock=clock if clock is not None else _utcnow, audit_key=audit_key)
        try:
            store._after_open()
        except BaseException:
            engine.dispose()
            raise
        return store

    def _after_open(self) -> None:
        """What a part of the store does once the schema is at head (the master
        key's active version, :mod:`gateway.store.master_keys`)."""

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
    def _transaction(
        self, *, write: bool, snapshot: bool = False, conflicts: bool = False
    ) -> Iterator[Connection]:
        """One transaction; commits if the block returns, rolls back if it raises.

        *conflicts*: the caller turns a constraint violation into its own error
        (a duplicate name into :class:`AlreadyExists`), so ``IntegrityError`` is
        re-raised as it is. Otherwise it is a :class:`StoreError` like any other
        database failure (a trigger, a constraint added by hand).

        *snapshot* (read-only, for long reads such as verify): every statement sees
        the same state of the database (PostgreSQL: REPEATABLE READ; SQLite's WAL
        readers always do), and on a SQLite file the transaction does not take
        this process's lock, so appends from other threads are not held up.
        """
        if self._closed:
            raise ConfigError("the state store has been closed")
        # The in-memory database is one shared connection: everything must queue.
        lock = (
            contextlib.nullcontext()
            if snapshot and not write and not isinstance(self._engine.pool, StaticPool)
            else self._lock
        )
        try:
            with lock, self._engine.connect() as connection:
                if write:
                    connection.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})
                if snapshot and connection.dialect.name == "postgresql":
                    # Reset when the connection goes back to the pool.
                    connection.execution_options(isolation_level="REPEATABLE READ")
                with connection.begin():
                    yield connection
        except IntegrityError as exc:
            if conflicts:
                raise
            raise StoreError(f"state store error: {exc.orig}") from exc
        except DBAPIError as exc:
            # Parameters are hidden (hide_parameters=True), so this cannot leak a
            # ciphertext, let alone a password.
            raise StoreError(f"state store error: {exc.orig}") from exc

    def ping(self) -> None:
        """Run the cheapest query there is: raises :class:`StoreError` when the
        database cannot be reached (a readiness check)."""
        with self._transaction(write=False, snapshot=True) as connection:
            connection.execute(text("SELECT 1"))

    def _now(self) -> datetime:
        return check_time("clock()", self._clock())

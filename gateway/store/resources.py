"""Resources (upstream databases) and their accounts (upstream logins).

Invariants:

* Passwords are sealed by :class:`~gateway.credentials.secretbox.SecretBox` with
  associated data ``b"pam/account/" + account_id`` before they reach SQL, so the
  database (and its WAL, backups and logs) only ever holds ciphertext bound to
  its own row. Records returned from here never carry a password; only
  :meth:`ResourceStore.reveal_password` returns one, and no error raised here
  contains it.
* A resource or account with an active session cannot be removed.
* Names are unique (a resource's per store, an account's per resource): a taken
  name is :class:`~gateway.errors.AlreadyExists`.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gateway.credentials.secretbox import SecretDecryptError
from gateway.errors import AlreadyExists, InvalidRequest
from gateway.store.engine import StoreBase
from gateway.store.models import Account, Resource
from gateway.store.rows import (
    ACCOUNT_COLUMNS,
    ACCOUNTS_JOIN,
    account_row,
    count_active_sessions,
    last_rotations,
    new_id,
    resource_row,
)
from gateway.store.schema import accounts, resources, sessions
from gateway.store.validation import (
    check_ca_cert,
    check_name,
    check_password,
    check_port,
    check_ssl_mode,
    required_text,
)

if TYPE_CHECKING:
    from gateway.store.rows import AnyRow

__all__ = ["ResourceStore", "account_aad", "account_record", "resource_record"]


def account_aad(account_id: str) -> bytes:
    # Binding the ciphertext to its row means a blob copied onto another account
    # (by a bug, or by someone with write access to the database) fails to open
    # instead of silently handing out the wrong password.
    return b"pam/account/" + account_id.encode()


def resource_record(row: AnyRow) -> Resource:
    return Resource(
        id=row.id,
        name=row.name,
        host=row.host,
        port=row.port,
        database=row.database,
        ssl_mode=row.ssl_mode,
        ca_cert=row.ca_cert,
        created_at=row.created_at,
        project=row.project,
        rotation_username=row.rotation_username,
        reassign_to=row.reassign_to,
    )


def account_record(row: AnyRow, last: tuple[datetime, str] | None = None) -> Account:
    """The record of an account row (``ACCOUNT_COLUMNS``) and its last rotation."""
    return Account(
        id=row.id,
        resource_id=row.resource_id,
        resource_name=row.resource_name,
        name=row.name,
        username=row.username,
        created_at=row.created_at,
        password_updated_at=row.password_updated_at,
        managed=bool(row.managed),
        rotation_pending=row.pending_rotation_id is not None,
        last_rotation_at=last[0] if last else None,
        last_rotation_outcome=last[1] if last else None,
        rotation_interval_seconds=row.rotation_interval_seconds,
        next_rotation_at=row.next_rotation_at,
        rotation_failures=row.rotation_failures,
        template_role=row.template_role,
        cleanup_after_seconds=row.cleanup_after_seconds,
    )


class ResourceStore(StoreBase):
    """Resources and accounts, with the accounts' sealed passwords."""

    def add_resource(
        self,
        name: str,
        host: str,
        port: int,
        database: str,
        ssl_mode: str = "verify-full",
        ca_cert: str | None = None,
        project: str = "default",
    ) -> Resource:
        """Register an upstream database. Raises :class:`AlreadyExists` for a taken name."""
        row = {
            "id": new_id(),
            "name": check_name("resource", name),
            "host": required_text("host", host),
            "port": check_port("port", port),
            "database": required_text("database", database),
            "ssl_mode": check_ssl_mode(ssl_mode),
            "ca_cert": check_ca_cert(ca_cert),
            "created_at": self._now(),
            "project": check_name("project", project),
        }
        try:
            with self._transaction(write=True, conflicts=True) as conn:
                conn.execute(resources.insert().values(row))
        except IntegrityError:
            raise AlreadyExists(f"resource '{name}' already exists") from None
        return Resource.model_validate(row)

    def get_resource(self, name: str) -> Resource:
        with self._transaction(write=False) as conn:
            return resource_record(resource_row(conn, name))

    def list_resources(self) -> list[Resource]:
        """Every resource, ordered by name."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(select(resources)).all()
        # Sorted here rather than in SQL: PostgreSQL orders text by the database's
        # collation (which may ignore '-' and '.'), SQLite by bytes.
        return sorted((resource_record(r) for r in rows), key=lambda r: r.name)

    def remove_resource(self, name: str) -> None:
        """Delete a resource and its accounts; refused while a session on it is active."""
        with self._transaction(write=True) as conn:
            resource = resource_row(conn, name, lock="update")
            active = count_active_sessions(conn, sessions.c.resource_name == name)
            if active:
                raise InvalidRequest(
                    f"resource '{name}' has {active} active session(s); end them first"
                )
            conn.execute(accounts.delete().where(accounts.c.resource_id == resource.id))
            conn.execute(resources.delete().where(resources.c.id == resource.id))

    def add_account(
        self, resource: str, name: str, username: str, password: str, *, managed: bool = False
    ) -> Account:
        """Add an upstream login to *resource*; the password is stored sealed.

        *managed*: pam generates its password from now on (the caller rotates it
        right after adding it) and a typed one is refused.
        """
        check_name("account", name)
        required_text("username", username)
        check_password(password)
        account_id = new_id()
        sealed = self._box.encrypt(password.encode(), aad=account_aad(account_id))
        return insert_account(
            self,
            resource,
            account_id=account_id,
            name=name,
            username=username,
            password_ciphertext=sealed,
            managed=managed,
        )

    def get_account(self, resource: str, name: str) -> Account:
        with self._transaction(write=False) as conn:
            row = account_row(conn, resource, name)
            return account_record(row, last_rotations(conn, [row.id]).get(row.id))

    def list_accounts(self, resource: str | None = None) -> list[Account]:
        """Accounts of *resource* (which must exist), or of every resource.

        Ordered by resource name, then account name.
        """
        with self._transaction(write=False) as conn:
            query = select(*ACCOUNT_COLUMNS).select_from(ACCOUNTS_JOIN)
            if resource is not None:
                parent = resource_row(conn, resource)
                query = query.where(accounts.c.resource_id == parent.id)
            rows = conn.execute(query).all()
            last = last_rotations(conn, None if resource is None else [r.id for r in rows])
        return sorted(
            (account_record(r, last.get(r.id)) for r in rows),
            key=lambda a: (a.resource_name, a.name),
        )

    def reveal_password(self, resource: str, name: str) -> str:
        """Decrypt and return an account's password.

        Only the upstream connector should call this, right before authenticating.
        Raises :class:`SecretDecryptError` if the stored value cannot be opened.
        """
        with self._transaction(write=False) as conn:
            row = account_row(conn, resource, name)
            sealed = conn.execute(
                select(accounts.c.password_ciphertext).where(accounts.c.id == row.id)
            ).scalar_one()
        if sealed is None:
            raise InvalidRequest(
                f"account '{name}' on resource '{resource}' is ephemeral: it has no password"
                " (each grant signs in as a role of its own)"
            )
        try:
            return self._box.decrypt(bytes(sealed), aad=account_aad(row.id)).decode()
        except SecretDecryptError as exc:
            raise SecretDecryptError(
                f"cannot decrypt the password of account '{name}' on resource "
                f"'{resource}': {exc.message}",
                hint="check that the gateway uses the master key the password was "
                "stored with, or set the password again",
            ) from None

    def rotate_password(self, resource: str, name: str, password: str) -> Account:
        """Replace an account's stored password."""
        check_password(password)
        now = self._now()
        with self._transaction(write=True) as conn:
            row = account_row(conn, resource, name, lock="update")
            # A fresh nonce, so the new ciphertext shares nothing with the old one.
            sealed = self._box.encrypt(password.encode(), aad=account_aad(row.id))
            conn.execute(
                accounts.update()
                .where(accounts.c.id == row.id)
                .values(password_ciphertext=sealed, password_updated_at=now)
            )
        return account_record(row).model_copy(update={"password_updated_at": now})

    def remove_account(self, resource: str, name: str) -> None:
        """Delete an account; refused while a session using it is active."""
        with self._transaction(write=True) as conn:
            row = account_row(conn, resource, name, lock="update")
            active = count_active_sessions(
                conn,
                (sessions.c.resource_name == resource) & (sessions.c.account_name == name),
            )
            if active:
                raise InvalidRequest(
                    f"account '{name}' on resource '{resource}' has {active} active "
                    "session(s); end them first"
                )
            conn.execute(accounts.delete().where(accounts.c.id == row.id))


def insert_account(
    store: StoreBase,
    resource: str,
    *,
    account_id: str,
    name: str,
    username: str,
    password_ciphertext: bytes | None,
    managed: bool = False,
    template_role: str | None = None,
    cleanup_after_seconds: int | None = None,
) -> Account:
    """Insert one account row of *resource* in a transaction of its own (an
    ordinary or managed one with its sealed password, or an ephemeral one with
    none); :class:`AlreadyExists` for a taken name."""
    now = store._now()
    try:
        with store._transaction(write=True, conflicts=True) as conn:
            parent = resource_row(conn, resource, lock="share")
            conn.execute(
                accounts.insert().values(
                    id=account_id,
                    resource_id=parent.id,
                    name=name,
                    username=username,
                    password_ciphertext=password_ciphertext,
                    created_at=now,
                    password_updated_at=now,
                    managed=int(managed),
                    template_role=template_role,
                    cleanup_after_seconds=cleanup_after_seconds,
                )
            )
    except IntegrityError:
        raise AlreadyExists(f"account '{name}' already exists on resource '{resource}'") from None
    return Account(
        id=account_id,
        resource_id=parent.id,
        resource_name=resource,
        name=name,
        username=username,
        created_at=now,
        password_updated_at=now,
        managed=managed,
        template_role=template_role,
        cleanup_after_seconds=cleanup_after_seconds,
    )

"""A database role per grant: checked when its account is added, made when a grant opens.

An *ephemeral* account (``pam account add R NAME --ephemeral --template ROLE``)
has no stored password. When a grant on it opens, :meth:`EphemeralRoles.prepare`
(before the grant's door opens) signs in as the resource's rotation role and
creates the role the session names (``pam_<user>_<grant id>``,
:func:`~gateway.credentials.ephemeral.sql.ephemeral_role_name`): LOGIN, the
SCRAM secret of a generated password, ``VALID UNTIL`` the grant's end plus a
margin, a member of the template role and of the marker role (``pam_managed``,
created NOLOGIN when missing), with a COMMENT naming this gateway and the
grant. The grant's connections sign in as that role, so the server sees the
person. The janitor (:mod:`~gateway.credentials.ephemeral.janitor`) disables
and drops it after the grant.

Invariants:

* The generated password lives only in this process's memory, as the grant's
  upstream target (:meth:`~gateway.credentials.targets.Credentials.set_grant_target`),
  until the grant ends; the server, its logs, the store and this daemon's log
  see at most its SCRAM secret.
* pam touches no role it did not make: a grant whose role name is taken (by
  any role, pam's or not) is refused with nothing changed on the server.
* Durable before upstream: the role is recorded in the store before the
  CREATE ROLE is sent, so a daemon that dies at any point leaves a row the
  janitor settles by what the server shows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

import structlog

from gateway.credentials.ephemeral import sql
from gateway.credentials.ephemeral.admin import DOCS_HINT, RoleAdmin, StatementFailed
from gateway.credentials.ephemeral.janitor import Janitor
from gateway.credentials.ephemeral.ports import (
    EphemeralAccount,
    EphemeralRole,
    EphemeralRoleStore,
    EphemeralSettings,
    GrantSession,
)
from gateway.credentials.ports import StoreThread
from gateway.credentials.rotation import generate_password
from gateway.credentials.statements import quote_literal
from gateway.credentials.targets import Credentials, target_of
from gateway.credentials.verify import VerifyResult
from gateway.errors import GatewayError, InvalidRequest, UpstreamError
from gateway.net.upstream import UpstreamConnection
from gateway.protocol.scram import scram_secret

__all__ = ["EphemeralRoles"]

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class EphemeralRoles:
    """Grant roles: the check when an account is added, creation when a grant
    opens, VALID UNTIL moved when it is extended, and the janitor."""

    store: EphemeralRoleStore
    db: StoreThread
    credentials: Credentials
    settings: EphemeralSettings
    #: what time it is, for the janitor (tests move it)
    clock: Callable[[], datetime] = dataclasses.field(default=lambda: datetime.now(UTC))
    admin: RoleAdmin = dataclasses.field(init=False)
    janitor: Janitor = dataclasses.field(init=False)
    _tasks: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)

    def __post_init__(self) -> None:
        self.admin = RoleAdmin(self.store, self.db, self.settings)
        self.janitor = Janitor(
            self.store, self.db, self.credentials, self.admin, self.settings, self.clock
        )

    # --- life (the janitor) --------------------------------------------------------------

    def start(self) -> None:
        self.janitor.start()

    async def close(self) -> None:
        """Let VALID UNTIL changes finish, then the janitor's last sweep."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.janitor.close()

    # --- accounts ----------------------------------------------------------------------

    async def add_account(
        self,
        resource: str,
        name: str,
        template_role: str,
        cleanup_after_seconds: int | None,
        *,
        verify: bool = True,
    ) -> Any:
        """Add an ephemeral account once the rotation role proves it could make
        its roles (unless not *verify*): the template exists and may be granted."""
        sql.check_role_name("the template role", template_role)
        if cleanup_after_seconds is not None and cleanup_after_seconds <= 0:
            raise InvalidRequest("--cleanup-after must be positive")
        rotator = await self.admin.rotator(resource)
        if verify:
            try:
                async with self.admin.signed_in(resource, rotator) as admin:
                    failure = await self._template_failure(
                        admin, resource, rotator[0], template_role
                    )
            except UpstreamError as exc:
                raise InvalidRequest(
                    f"{exc.message}, so nothing was added",
                    hint=exc.hint or "or add it unchecked with --no-verify",
                ) from None
            if failure is not None:
                raise failure
        return await self.db(
            self.store.add_ephemeral_account, resource, name, template_role, cleanup_after_seconds
        )

    async def verify_account(self, resource: str, account: str) -> VerifyResult:
        """``pam resource verify`` for an ephemeral account: the rotation role
        signs in and could make a role in the template (undone)."""
        record = await self.db(self.store.get_account, resource, account)
        res = await self.db(self.store.get_resource, resource)
        where = _Where(
            resource=resource,
            account=account,
            address=f"{res.host}:{res.port}",
            ssl_mode=res.ssl_mode,
        )
        try:
            rotator = await self.admin.rotator(resource)
            async with self.admin.signed_in(resource, rotator) as admin:
                failure = await self._template_failure(
                    admin, resource, rotator[0], record.template_role or ""
                )
        except GatewayError as exc:
            kind = exc.kind if isinstance(exc, UpstreamError) else "config"
            return _not_verified(where, kind, exc)
        if failure is not None:
            return _not_verified(where, "privilege", failure)
        return VerifyResult(
            ok=True,
            latency_ms=round(admin.connect_ms, 1),
            server_version=admin.server_version,
            tls_version=admin.tls_version,
            cipher=admin.cipher,
            auth_method=admin.handshake.auth_method,
            **where,
        )

    async def check_owner(self, resource: str, rotator: tuple[str, str], owner: str) -> None:
        """Refuse *owner* as the REASSIGN OWNED target unless it exists and the
        rotation role has its privileges (REASSIGN OWNED needs them)."""
        sql.check_role_name("--reassign-to", owner)
        async with self.admin.signed_in(resource, rotator) as admin:
            result = await self.admin.must(
                admin,
                "SELECT pg_catalog.pg_has_role(CURRENT_USER, r.oid, 'USAGE')"
                f" FROM pg_catalog.pg_roles r WHERE r.rolname = {quote_literal(owner)}",
                f"look up role {owner!r}",
            )
        if not result.rows:
            raise InvalidRequest(f"role {owner!r} does not exist on {resource}")
        if result.rows[0][0] != b"t":
            raise InvalidRequest(
                f"the rotation role {rotator[0]!r} does not have the privileges of {owner!r},"
                " which REASSIGN OWNED needs",
                hint=f"GRANT {owner} TO {rotator[0]}; {DOCS_HINT}",
            )

    async def refuse_if_unfinished(self, resource: str, doing: str) -> None:
        """Refuse *doing* to *resource* while one of its grant roles is not
        dropped (the janitor needs the resource and its rotation role for that)."""
        left = await self.unfinished(resource)
        if left:
            names = ", ".join(r.role for r in left[:5]) + (" ..." if len(left) > 5 else "")
            raise InvalidRequest(
                f"cannot {doing}: {len(left)} grant role(s) of {resource} are not dropped yet"
                f" ({names}), and pam needs its rotation role to drop them",
                hint="end their grants and wait for the janitor (the grant's end plus"
                f" --cleanup-after); `pam resource roles {resource}` lists them",
            )

    async def unfinished(self, resource: str | None = None) -> list[EphemeralRole]:
        """Grant roles not dropped yet (live grants' too), oldest first."""
        return await self.db(self.store.unfinished_ephemeral_roles, resource)

    # --- a grant's role ----------------------------------------------------------------

    async def prepare(self, session: GrantSession) -> None:
        """Make the grant's role if its account is ephemeral, before its door
        opens; raise, saying why, when it cannot be. The caller then ends the
        session; a role recorded by then is the janitor's (woken here: if the
        session's end is not written yet, its periodic sweep finds it)."""
        account = await self.db(self.store.get_account, session.resource_name, session.account_name)
        if account.template_role is None:
            return
        resource, role = session.resource_name, session.username
        res = await self.db(self.store.get_resource, resource)
        try:
            async with self.admin.signed_in(resource) as admin:
                password = await self._create(admin, session, account, role)
        except StatementFailed as failed:
            self.janitor.wake()
            raise InvalidRequest(
                f"could not make this grant's role on {resource}: {failed.detail}",
                hint="the rotation role needs CREATEROLE and the right to grant the template"
                f" role; check with `pam resource verify {resource}`",
            ) from None
        except UpstreamError as exc:
            self.janitor.wake()
            raise InvalidRequest(
                f"could not make this grant's role on {resource}: {exc.message}", hint=exc.hint
            ) from None
        self.credentials.set_grant_target(
            session.id, target_of(res, session.account_name, role, password)
        )
        log.info("grant_role_created", session_id=session.id, resource=resource, role=role)

    async def _create(
        self,
        admin: UpstreamConnection,
        session: GrantSession,
        account: EphemeralAccount,
        role: str,
    ) -> str:
        """CREATE ROLE over *admin*; the generated password."""
        marker, template = self.settings.marker_role, account.template_role
        assert template is not None
        await self.admin.must(admin, sql.ensure_marker_sql(marker), f"create role {marker!r}")
        existing = await self.admin.state(admin, role)
        if existing is not None:
            whose = (
                "one pam made for another grant"
                if existing.marked
                else f"not a member of {marker}, so not pam's"
            )
            raise InvalidRequest(
                f"cannot make this grant's role {role!r} on {session.resource_name}: a role of"
                f" that name already exists ({whose}); nothing was changed",
                hint="drop or rename that role on the server, or ask again (a new grant gets"
                " a new name)",
            )
        await self.db(
            self.store.record_ephemeral_role,
            role,
            resource=session.resource_name,
            account=session.account_name,
            session_id=session.id,
            cleanup_after_seconds=account.cleanup_after_seconds,
        )
        iterations = await self.admin.iterations(admin)
        password = generate_password(self.settings.password_length, self.settings.password_alphabet)
        statement = sql.create_role_sql(
            role,
            secret=scram_secret(password, iterations=iterations),
            valid_until=self._valid_until(session),
            template=template,
            marker=marker,
            comment=sql.grant_comment(self.settings.gateway_id, session.id),
        )
        await self.admin.must(admin, statement, f"create role {role!r}")
        return password

    def ended(self, session: GrantSession) -> None:
        """The grant ended: forget its password; the janitor disables its role
        now and drops it when due."""
        if self.credentials.drop_grant_target(session.id):
            self.janitor.wake()

    def expiry_moved(self, session: GrantSession) -> None:
        """The grant was extended: move its role's VALID UNTIL, in the background
        (long before the old one passes: an extension is asked for ahead)."""
        target = self.credentials.grant_target(session.id)
        if target is None:
            return
        task = asyncio.create_task(
            self._move_valid_until(session, target.username),
            name=f"grant-role-{session.id[:8]}-valid-until",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _move_valid_until(self, session: GrantSession, role: str) -> None:
        try:
            async with self.admin.signed_in(session.resource_name) as admin:
                await self.admin.must(
                    admin,
                    sql.valid_until_sql(role, self._valid_until(session)),
                    f"move the VALID UNTIL of {role!r}",
                )
        except (GatewayError, StatementFailed) as exc:
            error = exc.detail if isinstance(exc, StatementFailed) else exc.message
            log.error(
                "grant_role_valid_until_failed", session_id=session.id, role=role, error=error
            )

    def _valid_until(self, session: GrantSession) -> datetime:
        return session.expires_at + timedelta(seconds=self.settings.valid_until_margin_seconds)

    async def _template_failure(
        self, admin: UpstreamConnection, resource: str, rotator: str, template: str
    ) -> InvalidRequest | None:
        """Why the rotation role could not make a grant role in *template*, or None."""
        found = await self.admin.run(admin, sql.template_sql(template))
        if found.error is not None:
            return InvalidRequest(f"could not look up role {template!r}: {found.error.message}")
        if not found.rows:
            return InvalidRequest(
                f"the template role {template!r} does not exist on {resource}",
                hint=f"create it first (CREATE ROLE {template} NOLOGIN, then GRANT it what a"
                f" person may do); {DOCS_HINT}",
            )
        if found.rows[0][0] == b"t":
            return InvalidRequest(
                f"the template role {template!r} is a superuser: pam makes no superuser per grant"
            )
        probe = f"pam_check_{secrets.token_hex(6)}"
        tried = await self.admin.run(
            admin, sql.dry_run_sql(probe, template=template, marker=self.settings.marker_role)
        )
        if tried.error is not None:
            return InvalidRequest(
                f"the rotation role {rotator!r} could not make a role in {template!r}:"
                f" {tried.error.message} ({tried.error.sqlstate})",
                hint=f"it needs CREATEROLE (and on PostgreSQL 16+ ADMIN OPTION on {template}"
                f" and {self.settings.marker_role}); {DOCS_HINT}",
            )
        return None


class _Where(TypedDict):
    """Which account a verify result is about, and where."""

    resource: str
    account: str
    address: str
    ssl_mode: str


def _not_verified(where: _Where, kind: str, exc: GatewayError) -> VerifyResult:
    return VerifyResult(
        ok=False,
        error_kind=kind,
        error_sqlstate=exc.sqlstate if isinstance(exc, UpstreamError) else None,
        error=exc.message,
        hint=exc.hint,
        **where,
    )

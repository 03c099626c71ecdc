"""Signing in as a resource's rotation role to make, check and drop grant roles.

:class:`RoleAdmin` opens one upstream session as the rotation role (TLS per the
resource's ssl mode, SCRAM: the same sign-in relaying uses) and runs statements
of :mod:`gateway.credentials.ephemeral.sql` on it.

Invariants:

* Every session opened is closed (:meth:`RoleAdmin.signed_in` is a context
  manager); every wait has the upstream connect timeout as its deadline.
* Nothing here logs a statement or returns a password other than inside an
  :class:`~gateway.net.upstream.UpstreamTarget`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

from gateway.credentials.ephemeral import sql
from gateway.credentials.ephemeral.ports import EphemeralRoleStore, EphemeralSettings
from gateway.credentials.ports import StoreThread
from gateway.credentials.statements import StatementResult, run_statement
from gateway.credentials.targets import target_of
from gateway.errors import InvalidRequest, UpstreamError
from gateway.net.relay import close_writer
from gateway.net.upstream import UpstreamConnection, connect_upstream
from gateway.protocol import messages
from gateway.protocol.scram import SCRAM_DEFAULT_ITERATIONS

__all__ = ["DOCS_HINT", "RoleAdmin", "StatementFailed"]

_APPLICATION_NAME: Final = "pam grant roles"
#: PostgreSQL 16 made the SCRAM iteration count a setting (``scram_iterations``).
_SCRAM_ITERATIONS_SETTING_SINCE: Final = 16
DOCS_HINT: Final = "see docs/credentials.md, 'A database role per grant'"


class StatementFailed(Exception):
    """The server refused a statement (nothing of it changed)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(eq=False)
class RoleAdmin:
    """The rotation role's sessions, and the statements grant roles run on them."""

    store: EphemeralRoleStore
    db: StoreThread
    settings: EphemeralSettings

    async def rotator(self, resource: str) -> tuple[str, str]:
        """(user, password) of *resource*'s rotation role, or InvalidRequest."""
        rotator = await self.db(self.store.reveal_rotation_credential, resource)
        if rotator is None:
            raise InvalidRequest(
                f"resource {resource} has no rotation role, which creates and drops the roles"
                " of ephemeral accounts",
                hint=f"set one with `pam resource set-rotation {resource} --username ROLE`"
                f" (CREATEROLE; {DOCS_HINT})",
            )
        return rotator

    @contextlib.asynccontextmanager
    async def signed_in(
        self, resource: str, rotator: tuple[str, str] | None = None
    ) -> AsyncIterator[UpstreamConnection]:
        """A session as *resource*'s rotation role (or *rotator*), closed after."""
        user, password = rotator or await self.rotator(resource)
        res = await self.db(self.store.get_resource, resource)
        try:
            upstream = await connect_upstream(
                target_of(res, "(rotation role)", user, password),
                params={"application_name": _APPLICATION_NAME},
                timeout=self.settings.connect_timeout,
            )
        except UpstreamError as exc:
            raise UpstreamError(
                f"the rotation role {user!r} could not sign in to {resource}: {exc.message}",
                kind=exc.kind,
                sqlstate=exc.sqlstate,
                hint=f"set it again with `pam resource set-rotation {resource} --username ...`",
            ) from None
        try:
            yield upstream
        finally:
            if not upstream.writer.is_closing():
                upstream.writer.write(messages.terminate())
            await close_writer(upstream.writer)

    async def run(self, admin: UpstreamConnection, statement: str) -> StatementResult:
        """Run *statement*; a refusal is in the result, a broken connection raises
        :class:`~gateway.errors.UpstreamError`."""
        return await run_statement(admin, statement, timeout=self.settings.connect_timeout)

    async def must(self, admin: UpstreamConnection, statement: str, doing: str) -> StatementResult:
        """Run *statement*, or raise :class:`StatementFailed` saying it could not *doing*."""
        result = await self.run(admin, statement)
        if result.error is not None:
            raise StatementFailed(
                f"could not {doing}: {result.error.message} ({result.error.sqlstate})"
            )
        return result

    async def state(self, admin: UpstreamConnection, role: str) -> sql.RoleState | None:
        """*role* as the server has it, or None when there is none."""
        result = await self.must(
            admin, sql.role_state_sql(role, self.settings.marker_role), f"look up role {role!r}"
        )
        return sql.role_state_of(result.rows)

    async def iterations(self, admin: UpstreamConnection) -> int:
        """The server's SCRAM iteration count: ``scram_iterations`` since 16,
        fixed at 4096 before."""
        match = re.match(r"\d+", admin.server_version or "")
        if not match or int(match.group()) < _SCRAM_ITERATIONS_SETTING_SINCE:
            return SCRAM_DEFAULT_ITERATIONS
        result = await self.run(admin, "SHOW scram_iterations")
        try:
            value = result.rows[0][0]
            return int(value) if value is not None else SCRAM_DEFAULT_ITERATIONS
        except (IndexError, ValueError):
            return SCRAM_DEFAULT_ITERATIONS

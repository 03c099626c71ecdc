"""Signing in, tokens, users and policies: what the control API calls.

Invariants:
* A token is shown once, when it is made; the store keeps its SHA-256.
* A ``local`` token (the one ``gateway init`` writes for this host) is
  accepted only from a loopback client.
* Disabling a principal revokes its tokens (the store does it in one
  transaction) and then ends its live grants through ``on_disabled``.
* A wrong name and a wrong password are the same answer, after the same work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.errors import Forbidden, InvalidRequest, Unauthenticated
from gateway.identity.hashing import hash_password, new_token, token_digest, verify_password
from gateway.identity.policy import Policy
from gateway.identity.ports import IdentityStore, StoreThread
from gateway.identity.principals import (
    ALL_PROJECTS,
    Principal,
    PrincipalInfo,
    PrincipalKind,
    Role,
)

__all__ = ["IdentityService", "IssuedToken", "TokenKind"]


class TokenKind:
    SESSION = "session"
    MACHINE = "machine"
    LOCAL = "local"


@dataclass(frozen=True)
class IssuedToken:
    """A token as made: the only time the token itself exists outside the caller."""

    token: str
    token_id: str
    principal: str
    expires_at: datetime | None


def _check_password(password: str) -> str:
    if len(password) < 8:
        raise InvalidRequest("a password must be at least 8 characters long")
    return password


class IdentityService:
    def __init__(
        self,
        store: IdentityStore,
        db: StoreThread,
        *,
        session_ttl: timedelta,
        on_disabled: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._db = db
        self._session_ttl = session_ttl
        self._on_disabled = on_disabled

    # --- authentication -----------------------------------------------------------

    async def authenticate(self, token: str, *, loopback: bool) -> Principal:
        if not token:
            raise Unauthenticated("no API token: sign in with `pam login`")
        found = await self._db(
            self._store.principal_by_token, token_digest(token), now=datetime.now(UTC)
        )
        if found is None:
            raise Unauthenticated(
                "the API token is unknown, expired or revoked",
                hint="sign in again with `pam login`",
            )
        principal, kind = found
        if kind == TokenKind.LOCAL and not loopback:
            raise Unauthenticated("this host's local token is accepted only from this host")
        return principal

    async def login(self, name: str, password: str) -> IssuedToken:
        found = await self._db(self._store.password_hash, name)
        stored = found[1] if found else None
        if found is None or not verify_password(stored, password):
            raise Unauthenticated("wrong user name or password")
        return await self._issue(found[0], name, TokenKind.SESSION, self._session_ttl)

    async def logout(self, token: str) -> None:
        await self._db(self._store.revoke_token, token_digest(token))

    async def issue_local_token(self, name: str) -> IssuedToken:
        info = await self._db(self._store.get_principal, name)
        return await self._issue(info.id, name, TokenKind.LOCAL, None)

    async def _issue(
        self, principal_id: str, name: str, kind: str, ttl: timedelta | None
    ) -> IssuedToken:
        token = new_token()
        expires = None if ttl is None else datetime.now(UTC) + ttl
        info = await self._db(
            self._store.add_token,
            principal_id,
            kind=kind,
            digest=token_digest(token),
            expires_at=expires,
        )
        return IssuedToken(token, info.id, name, expires)

    # --- principals ---------------------------------------------------------------

    async def add_user(
        self,
        name: str,
        *,
        role: Role,
        project: str = ALL_PROJECTS,
        groups: tuple[str, ...] = (),
        password: str | None = None,
    ) -> PrincipalInfo:
        hashed = None if password is None else hash_password(_check_password(password))
        return await self._db(
            self._store.add_principal,
            name,
            kind=PrincipalKind.USER,
            roles={project: role},
            groups=groups,
            password_hash=hashed,
        )

    async def create_machine_token(
        self, name: str, *, role: Role, project: str, ttl: timedelta
    ) -> IssuedToken:
        """A machine principal named *name* and its token (shown once)."""
        if role is Role.ADMIN:
            raise Forbidden("a machine token cannot be an admin", hint="use --role member")
        info = await self._db(
            self._store.add_principal, name, kind=PrincipalKind.MACHINE, roles={project: role}
        )
        return await self._issue(info.id, name, TokenKind.MACHINE, ttl)

    async def list_principals(self) -> list[PrincipalInfo]:
        return await self._db(self._store.list_principals)

    async def set_password(self, name: str, password: str) -> None:
        await self._db(
            self._store.set_password_hash, name, hash_password(_check_password(password))
        )

    async def disable(self, name: str) -> PrincipalInfo:
        info = await self._db(self._store.disable_principal, name)
        if self._on_disabled is not None:
            await self._on_disabled(info.id, name)
        return info

    async def remove(self, name: str) -> bool:
        info = await self._db(self._store.get_principal, name)
        if self._on_disabled is not None and info.disabled_at is None:
            await self._db(self._store.disable_principal, name)
            await self._on_disabled(info.id, name)
        return await self._db(self._store.remove_principal, name)

    # --- policies -----------------------------------------------------------------

    async def add_policy(self, policy: Policy) -> Policy:
        return await self._db(self._store.add_policy, policy)

    async def policies(self, project: str | None = None) -> list[Policy]:
        return await self._db(self._store.policies, project)

    async def remove_policy(self, name: str) -> None:
        await self._db(self._store.remove_policy, name)

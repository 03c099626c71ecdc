"""Signing in, tokens, users and policies: what the control API calls.

Invariants:
* A token is shown once, when it is made; the store keeps its SHA-256.
* A ``local`` token (the one ``gateway init`` writes for this host) is
  accepted only from a loopback client.
* Disabling a principal revokes its tokens (the store does it in one
  transaction) and then ends its live grants through ``on_disabled``.
* A wrong name and a wrong password are the same answer, after the same work.
* Guessing is throttled: after :data:`MAX_FAILED_LOGINS` failed sign-ins for
  one name, or :data:`MAX_FAILED_LOGINS_PER_ADDRESS` from one address (an
  office behind one NAT is one address), within :data:`LOGIN_WINDOW_SECONDS`,
  further attempts are refused without checking the password until the window
  has passed (the counts live in this daemon's memory, bounded).
* The last enabled admin of every project cannot be disabled or removed: a
  gateway nobody can administer is recovered only from its host.
* A user with a second factor signs in with the password and a current code
  (:mod:`gateway.identity.second_factor`): the right password without a code
  is answered :class:`~gateway.identity.mfa.MfaRequired` (the client asks for
  one and retries; not a failure), and a refused code counts as a failed
  sign-in like a wrong password. The code is checked only after the password
  was right, so a wrong password never uses one up.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from gateway.errors import Forbidden, Unauthenticated
from gateway.identity.hashing import hash_password, new_token, token_digest, verify_password
from gateway.identity.mfa import MfaRefused
from gateway.identity.policy import Policy
from gateway.identity.ports import IdentityStore, StoreThread
from gateway.identity.principals import (
    ALL_PROJECTS,
    Principal,
    PrincipalInfo,
    PrincipalKind,
    Role,
)
from gateway.identity.second_factor import MfaService

__all__ = [
    "LOGIN_WINDOW_SECONDS",
    "MAX_FAILED_LOGINS",
    "MAX_FAILED_LOGINS_PER_ADDRESS",
    "IdentityService",
    "IssuedToken",
    "LoginThrottle",
    "TokenKind",
]

#: Failed sign-ins for one name before a pause.
MAX_FAILED_LOGINS: Final = 10
#: Failed sign-ins from one address before a pause.
MAX_FAILED_LOGINS_PER_ADDRESS: Final = 50
#: The window those failures are counted in, and the pause's length.
LOGIN_WINDOW_SECONDS: Final = 300.0
#: Names and addresses remembered at most (the oldest are forgotten first).
_THROTTLE_KEYS: Final = 10_000


class TokenKind:
    SESSION = "session"
    MACHINE = "machine"
    LOCAL = "local"


@dataclass(frozen=True)
class IssuedToken:
    """A token as made: the only time the token itself exists outside the caller."""

    token: str = field(repr=False)
    token_id: str
    principal: str
    expires_at: datetime | None


class LoginThrottle:
    """Failed sign-ins per key (``user:NAME``, ``addr:ADDRESS``) in a sliding window."""

    def __init__(
        self,
        *,
        limit: int = MAX_FAILED_LOGINS,
        address_limit: int = MAX_FAILED_LOGINS_PER_ADDRESS,
        window: float = LOGIN_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = {"user": limit, "addr": address_limit}
        self._window = window
        self._clock = clock
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, key: str) -> list[float]:
        cutoff = self._clock() - self._window
        kept = [t for t in self._failures.get(key, ()) if t > cutoff]
        if kept:
            self._failures[key] = kept
        else:
            self._failures.pop(key, None)
        return kept

    def retry_after(self, keys: tuple[str, ...]) -> float | None:
        """Seconds until *keys* may try again, or None when they may now."""
        waits = []
        for key in keys:
            limit = self._limits[key.partition(":")[0]]
            recent = self._recent(key)
            if len(recent) >= limit:
                waits.append(recent[-limit] + self._window - self._clock())
        return max(waits) if waits else None

    def failed(self, keys: tuple[str, ...]) -> None:
        now = self._clock()
        for key in keys:
            self._failures.setdefault(key, []).append(now)
            self._failures.move_to_end(key)
        while len(self._failures) > _THROTTLE_KEYS:
            self._failures.popitem(last=False)

    def succeeded(self, name_key: str) -> None:
        self._failures.pop(name_key, None)


class IdentityService:
    def __init__(
        self,
        store: IdentityStore,
        db: StoreThread,
        *,
        session_ttl: timedelta,
        on_disabled: Callable[[str, str], Awaitable[None]] | None = None,
        mfa: MfaService | None = None,
    ) -> None:
        self._store = store
        self._db = db
        self._session_ttl = session_ttl
        self._on_disabled = on_disabled
        self.throttle = LoginThrottle()
        #: second factors; None: sign-in asks for none
        self.mfa = mfa

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

    async def login(
        self, name: str, password: str, *, source: str = "", otp: str | None = None
    ) -> IssuedToken:
        keys = (f"user:{name}", f"addr:{source}")
        wait = self.throttle.retry_after(keys)
        if wait is not None:
            raise Unauthenticated(
                "too many failed sign-ins for this user or from this address",
                hint=f"try again in {max(1, round(wait))} s",
            )
        found = await self._db(self._store.password_hash, name)
        # Verified first, whoever asks: an unknown name costs the same argon2
        # work as a wrong password, so the answer's timing names nobody.
        matches = verify_password(found[1] if found else None, password)
        if found is None or not matches:
            self.throttle.failed(keys)
            raise Unauthenticated("wrong user name or password")
        if self.mfa is not None and await self.mfa.is_enabled(found[0]):
            user = Principal(id=found[0], name=name, kind=PrincipalKind.USER)
            try:
                await self.mfa.check_second_factor(user, otp, purpose="login")
            except MfaRefused:
                self.throttle.failed(keys)
                raise
        self.throttle.succeeded(keys[0])
        return await self._issue(found[0], name, TokenKind.SESSION, self._session_ttl)

    async def issue_session(self, principal_id: str, name: str) -> IssuedToken:
        """A session token for a principal another way of signing in vouched for
        (single sign-on: :mod:`gateway.identity.sso`), as a password sign-in makes."""
        return await self._issue(principal_id, name, TokenKind.SESSION, self._session_ttl)

    async def logout(self, token: str) -> None:
        """Revoke *token* if it is a sign-in's session token; a machine token or
        this host's local token is not ended by signing out (an admin revokes
        those), so a `pam logout` never locks the host's admin out."""
        await self._db(self._store.revoke_token, token_digest(token), kind=TokenKind.SESSION)

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
        hashed = None if password is None else hash_password(password)
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
        await self._db(self._store.set_password_hash, name, hash_password(password))

    async def disable(self, name: str) -> PrincipalInfo:
        info = await self._db(self._store.disable_principal, name, keep_an_admin=True)
        if self._on_disabled is not None:
            await self._on_disabled(info.id, name)
        return info

    async def remove(self, name: str) -> bool:
        was = await self._db(self._store.get_principal, name)
        info = await self._db(self._store.disable_principal, name, keep_an_admin=True)
        if self._on_disabled is not None and was.disabled_at is None:
            await self._on_disabled(info.id, name)
        return await self._db(self._store.remove_principal, name)

    # --- policies -----------------------------------------------------------------

    async def add_policy(self, policy: Policy) -> Policy:
        return await self._db(self._store.add_policy, policy)

    async def policies(self, project: str | None = None) -> list[Policy]:
        return await self._db(self._store.policies, project)

    async def remove_policy(self, name: str) -> None:
        await self._db(self._store.remove_policy, name)

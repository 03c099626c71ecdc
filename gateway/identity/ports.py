"""What the identity service needs: the store (``gateway.store.Store``
implements it) and the thread its calls run on."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar

from gateway.identity.mfa import CodeState, MfaAction, MfaStatus, Verdict
from gateway.identity.policy import Policy
from gateway.identity.principals import (
    GroupMapping,
    Principal,
    PrincipalInfo,
    PrincipalKind,
    Role,
    SsoProvider,
    SsoSignIn,
    TokenInfo,
)
from gateway.identity.projects import ProjectSettings

T = TypeVar("T")


class IdentityStore(Protocol):
    def add_principal(
        self,
        name: str,
        *,
        kind: PrincipalKind,
        roles: dict[str, Role],
        groups: tuple[str, ...] = (),
        password_hash: str | None = None,
    ) -> PrincipalInfo: ...

    def get_principal(self, name: str) -> PrincipalInfo: ...

    def list_principals(self) -> list[PrincipalInfo]: ...

    def set_password_hash(self, name: str, password_hash: str) -> None: ...

    def disable_principal(self, name: str, *, keep_an_admin: bool = False) -> PrincipalInfo: ...

    def remove_principal(self, name: str) -> bool: ...

    def password_hash(self, name: str) -> tuple[str, str | None] | None:
        """(principal id, argon2 hash) of an enabled user, None for anyone else."""
        ...

    def add_token(
        self, principal_id: str, *, kind: str, digest: str, expires_at: datetime | None
    ) -> TokenInfo: ...

    def revoke_token(self, digest: str, *, kind: str | None = None) -> bool: ...

    def principal_by_token(self, digest: str, *, now: datetime) -> tuple[Principal, str] | None:
        """The enabled principal a live token belongs to, and the token's kind."""
        ...

    def add_policy(self, policy: Policy) -> Policy: ...

    def policies(self, project: str | None = None) -> list[Policy]: ...

    def remove_policy(self, name: str) -> None: ...


class SsoStore(Protocol):
    """Single sign-on's part of the store (``gateway.store.sso``)."""

    def sso_provider(self) -> SsoProvider | None: ...

    def sso_client_secret(self) -> str:
        """The client secret, unsealed (for the token endpoint only)."""
        ...

    def set_sso_provider(self, provider: SsoProvider, *, client_secret: str | None) -> None:
        """Create or replace the provider; *client_secret* None keeps the stored one."""
        ...

    def remove_sso_provider(self) -> bool: ...

    def sso_mappings(self) -> list[GroupMapping]: ...

    def map_sso_group(self, mapping: GroupMapping) -> GroupMapping: ...

    def unmap_sso_group(self, claim_value: str) -> None: ...

    def sso_sign_in(
        self, *, issuer: str, subject: str, name: str, claim_values: tuple[str, ...]
    ) -> SsoSignIn:
        """Find the principal bound to (*issuer*, *subject*) or create it as *name*,
        and set its sign-in groups and memberships from the mapping: one transaction."""
        ...


class MfaStore(Protocol):
    """Second factors (sealed secrets, last used step, recent failures) and
    project settings."""

    def get_principal(self, name: str) -> PrincipalInfo: ...

    def mfa_status(self, principal_id: str) -> MfaStatus: ...

    def begin_mfa_enrolment(self, principal_id: str, secret: bytes) -> None:
        """Keep *secret* (sealed) as the principal's pending one, replacing any
        earlier pending one; an active secret stays until it is confirmed."""
        ...

    def use_mfa_code(
        self,
        principal_id: str,
        decide: Callable[[bytes, CodeState], Verdict],
        *,
        action: MfaAction,
    ) -> Verdict | None:
        """In one transaction: the secret (pending for ``CONFIRM``, else the
        active one) and its state, *decide*'s verdict stored, and *action*
        applied if it accepted. None when there is no such secret."""
        ...

    def reset_mfa(self, principal_id: str, *, by: str) -> MfaStatus: ...

    def project_settings(self, project: str) -> ProjectSettings: ...

    def set_project_settings(self, settings: ProjectSettings) -> ProjectSettings: ...


class StoreThread(Protocol):
    """Runs a blocking store call on the store's own thread."""

    async def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...

"""Principals (users and machines), their groups, roles, tokens, and policies.

Invariants:

* Tokens are kept as SHA-256 digests only (:mod:`gateway.identity.hashing`);
  passwords as argon2id hashes. Nothing returned from here carries either,
  except :meth:`IdentityStore.password_hash`, which the login check needs.
* Disabling a principal revokes every token it holds, in the same
  transaction; a disabled principal's tokens never authenticate again.
* A principal that opened sessions is disabled, never deleted, by
  :meth:`IdentityStore.remove_principal`: the trail keeps naming it.
* Names are unique: a taken one is :class:`~gateway.errors.AlreadyExists`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Final

from sqlalchemy import Connection, delete, func, select, update
from sqlalchemy.exc import IntegrityError

from gateway.errors import AlreadyExists, Forbidden, InvalidRequest, NotFound
from gateway.identity.policy import Policy
from gateway.identity.principals import (
    ALL_PROJECTS,
    Principal,
    PrincipalInfo,
    PrincipalKind,
    Role,
    TokenInfo,
)
from gateway.store.changes import ChangeTopic, announce
from gateway.store.engine import StoreBase
from gateway.store.rows import new_id
from gateway.store.schema import (
    mfa_factors,
    policies,
    principal_groups,
    principal_identities,
    principals,
    role_bindings,
    sessions,
    tokens,
)
from gateway.store.validation import check_name, check_time

__all__ = ["IdentityStore"]


def _enabled_global_admins(conn: Connection) -> list[str]:
    """The ids of enabled admins of every project, their rows locked (PostgreSQL)
    until the transaction ends."""
    query = (
        select(principals.c.id)
        .join(role_bindings, role_bindings.c.principal_id == principals.c.id)
        .where(
            role_bindings.c.project == ALL_PROJECTS,
            role_bindings.c.role == Role.ADMIN.value,
            principals.c.disabled_at.is_(None),
        )
        .with_for_update(of=principals)
    )
    return list(conn.execute(query).scalars())


def _project(value: str) -> str:
    return value if value == ALL_PROJECTS else check_name("project", value)


class IdentityStore(StoreBase):
    """Users, machine principals, tokens and policies."""

    # --- principals ---------------------------------------------------------------

    def add_principal(
        self,
        name: str,
        *,
        kind: PrincipalKind,
        roles: dict[str, Role],
        groups: tuple[str, ...] = (),
        password_hash: str | None = None,
    ) -> PrincipalInfo:
        check_name("user", name)
        if not roles:
            raise InvalidRequest("a principal needs a role")
        principal_id = new_id()
        try:
            with self._transaction(write=True, conflicts=True) as conn:
                conn.execute(
                    principals.insert().values(
                        id=principal_id,
                        name=name,
                        kind=PrincipalKind(kind).value,
                        password_hash=password_hash,
                        created_at=self._now(),
                    )
                )
                conn.execute(
                    role_bindings.insert(),
                    [
                        {"principal_id": principal_id, "project": _project(p), "role": Role(r)}
                        for p, r in roles.items()
                    ],
                )
                if groups:
                    conn.execute(
                        principal_groups.insert(),
                        [
                            {"principal_id": principal_id, "group_name": check_name("group", g)}
                            for g in sorted(set(groups))
                        ],
                    )
        except IntegrityError:
            raise AlreadyExists(f"user '{name}' already exists") from None
        return self.get_principal(name)

    def get_principal(self, name: str) -> PrincipalInfo:
        found = [p for p in self.list_principals() if p.name == name]
        if not found:
            raise NotFound(f"no user named '{name}'")
        return found[0]

    def has_principal(self, name: str) -> bool:
        with self._transaction(write=False) as conn:
            found = conn.execute(select(principals.c.id).where(principals.c.name == name)).first()
        return found is not None

    def list_principals(self) -> list[PrincipalInfo]:
        with self._transaction(write=False) as conn:
            rows = conn.execute(select(principals).order_by(principals.c.name)).all()
            roles: dict[str, dict[str, str]] = {}
            for binding in conn.execute(select(role_bindings)):
                roles.setdefault(binding.principal_id, {})[binding.project] = binding.role
            groups: dict[str, list[str]] = {}
            for member in conn.execute(select(principal_groups)):
                groups.setdefault(member.principal_id, []).append(member.group_name)
            with_mfa = set(
                conn.execute(
                    select(mfa_factors.c.principal_id).where(
                        mfa_factors.c.secret_ciphertext.is_not(None)
                    )
                ).scalars()
            )
        return [
            PrincipalInfo(
                id=row.id,
                name=row.name,
                kind=row.kind,
                roles=roles.get(row.id, {}),
                groups=tuple(sorted(groups.get(row.id, []))),
                has_password=row.password_hash is not None,
                created_at=row.created_at,
                disabled_at=row.disabled_at,
                mfa_enabled=row.id in with_mfa,
            )
            for row in rows
        ]

    def set_password_hash(self, name: str, password_hash: str) -> None:
        with self._transaction(write=True) as conn:
            done = conn.execute(
                update(principals)
                .where(principals.c.name == name, principals.c.kind == PrincipalKind.USER.value)
                .values(password_hash=password_hash)
            )
        if not done.rowcount:
            raise NotFound(f"no user named '{name}'")

    def disable_principal(self, name: str, *, keep_an_admin: bool = False) -> PrincipalInfo:
        """Disable *name* and revoke its tokens (idempotent). With *keep_an_admin*,
        refuse (:class:`Forbidden`) to disable the last enabled admin of every
        project: counted and disabled in one transaction, so two admins disabling
        each other at once cannot both pass."""
        now = self._now()
        with self._transaction(write=True) as conn:
            row = conn.execute(select(principals).where(principals.c.name == name)).first()
            if row is None:
                raise NotFound(f"no user named '{name}'")
            if keep_an_admin and row.disabled_at is None:
                admins = _enabled_global_admins(conn)
                if admins == [row.id]:
                    raise Forbidden(
                        f"{name} is the last enabled admin of every project",
                        hint="add another admin first (pam user add NAME --role admin)",
                    )
            if row.disabled_at is None:
                conn.execute(
                    update(principals).where(principals.c.id == row.id).values(disabled_at=now)
                )
                # The other gateways end its grants they hold.
                announce(conn, ChangeTopic.PRINCIPAL, row.id)
            conn.execute(
                update(tokens)
                .where(tokens.c.principal_id == row.id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        return self.get_principal(name)

    def remove_principal(self, name: str) -> bool:
        """Delete *name*, or disable it when sessions name it; True when deleted."""
        info = self.disable_principal(name)
        with self._transaction(write=True) as conn:
            used = conn.execute(
                select(func.count()).select_from(sessions).where(sessions.c.principal_id == info.id)
            ).scalar_one()
            if used:
                return False
            for table in (
                tokens,
                role_bindings,
                principal_groups,
                principal_identities,
                mfa_factors,
            ):
                conn.execute(delete(table).where(table.c.principal_id == info.id))
            conn.execute(delete(principals).where(principals.c.id == info.id))
        return True

    def password_hash(self, name: str) -> tuple[str, str | None] | None:
        with self._transaction(write=False) as conn:
            row = conn.execute(
                select(principals.c.id, principals.c.password_hash).where(
                    principals.c.name == name,
                    principals.c.kind == PrincipalKind.USER.value,
                    principals.c.disabled_at.is_(None),
                )
            ).first()
        return None if row is None else (row.id, row.password_hash)

    # --- tokens -------------------------------------------------------------------

    def add_token(
        self, principal_id: str, *, kind: str, digest: str, expires_at: datetime | None
    ) -> TokenInfo:
        token_id = new_id()
        if expires_at is not None:
            check_time("expires_at", expires_at)
        with self._transaction(write=True) as conn:
            conn.execute(
                tokens.insert().values(
                    id=token_id,
                    principal_id=principal_id,
                    kind=kind,
                    digest=digest,
                    created_at=self._now(),
                    expires_at=expires_at,
                )
            )
        return TokenInfo(token_id, principal_id, kind, expires_at)

    def revoke_token(self, digest: str, *, kind: str | None = None) -> bool:
        """Revoke a live token (of *kind* only, when given); True if one was."""
        query = update(tokens).where(tokens.c.digest == digest, tokens.c.revoked_at.is_(None))
        if kind is not None:
            query = query.where(tokens.c.kind == kind)
        with self._transaction(write=True) as conn:
            done = conn.execute(query.values(revoked_at=self._now()))
        return bool(done.rowcount)

    def revoke_tokens_of(self, principal_id: str, *, kind: str) -> int:
        """Revoke every live token of *kind* that *principal_id* holds; how many."""
        with self._transaction(write=True) as conn:
            done = conn.execute(
                update(tokens)
                .where(
                    tokens.c.principal_id == principal_id,
                    tokens.c.kind == kind,
                    tokens.c.revoked_at.is_(None),
                )
                .values(revoked_at=self._now())
            )
        return int(done.rowcount)

    def principal_by_token(self, digest: str, *, now: datetime) -> tuple[Principal, str] | None:
        """The enabled principal a live token belongs to, and the token's kind."""
        with self._transaction(write=False) as conn:
            row = conn.execute(
                select(
                    tokens.c.id.label("token_id"),
                    tokens.c.kind.label("token_kind"),
                    tokens.c.expires_at,
                    principals.c.id,
                    principals.c.name,
                    principals.c.kind,
                )
                .join(principals, principals.c.id == tokens.c.principal_id)
                .where(
                    tokens.c.digest == digest,
                    tokens.c.revoked_at.is_(None),
                    principals.c.disabled_at.is_(None),
                )
            ).first()
            if row is None or (row.expires_at is not None and row.expires_at <= now):
                return None
            roles = {
                b.project: Role(b.role)
                for b in conn.execute(
                    select(role_bindings).where(role_bindings.c.principal_id == row.id)
                )
            }
            groups = frozenset(
                conn.execute(
                    select(principal_groups.c.group_name).where(
                        principal_groups.c.principal_id == row.id
                    )
                ).scalars()
            )
        principal = Principal(
            id=row.id,
            name=row.name,
            kind=PrincipalKind(row.kind),
            roles=roles,
            groups=groups,
            token_id=row.token_id,
        )
        return principal, row.token_kind

    # --- policies -----------------------------------------------------------------

    def add_policy(self, policy: Policy) -> Policy:
        check_name("policy", policy.name)
        # A policy's project is a real one: resources are looked up in theirs,
        # so a policy of "*" would be accepted and never apply.
        check_name("project", policy.project)
        if not policy.subjects:
            raise InvalidRequest("a policy needs at least one --subject")
        if policy.max_duration_seconds <= 0:
            raise InvalidRequest("--max-duration must be positive")
        _check_policy_controls(policy)
        try:
            with self._transaction(write=True, conflicts=True) as conn:
                conn.execute(
                    policies.insert().values(
                        id=new_id(),
                        name=policy.name,
                        project=policy.project,
                        subjects=json.dumps(list(policy.subjects)),
                        resource_glob=policy.resource_glob,
                        account_glob=policy.account_glob,
                        max_duration_seconds=policy.max_duration_seconds,
                        require_reason=int(policy.require_reason),
                        created_at=self._now(),
                        approvals_required=policy.approvals_required,
                        approvers=json.dumps(list(policy.approvers)),
                        break_glass=int(policy.break_glass),
                        require_mfa=int(policy.require_mfa),
                        idle_timeout_seconds=policy.idle_timeout_seconds,
                    )
                )
        except IntegrityError:
            raise AlreadyExists(f"policy '{policy.name}' already exists") from None
        return policy

    def policies(self, project: str | None = None) -> list[Policy]:
        query = select(policies).order_by(policies.c.name)
        if project is not None:
            query = query.where(policies.c.project == project)
        with self._transaction(write=False) as conn:
            rows = conn.execute(query).all()
        return [
            Policy(
                name=row.name,
                project=row.project,
                subjects=tuple(json.loads(row.subjects)),
                resource_glob=row.resource_glob,
                account_glob=row.account_glob,
                max_duration_seconds=row.max_duration_seconds,
                require_reason=bool(row.require_reason),
                approvals_required=row.approvals_required,
                approvers=tuple(json.loads(row.approvers)),
                break_glass=bool(row.break_glass),
                require_mfa=bool(row.require_mfa),
                idle_timeout_seconds=row.idle_timeout_seconds,
            )
            for row in rows
        ]

    def remove_policy(self, name: str) -> None:
        with self._transaction(write=True) as conn:
            done = conn.execute(delete(policies).where(policies.c.name == name))
        if not done.rowcount:
            raise NotFound(f"no policy named '{name}'")


#: most approvers a policy may ask for (more is a typo, not a control)
MAX_APPROVALS: Final = 10


def _check_policy_controls(policy: Policy) -> None:
    if not 0 <= policy.approvals_required <= MAX_APPROVALS:
        raise InvalidRequest(f"--require-approval must be between 0 and {MAX_APPROVALS}")
    if policy.approvers and not policy.approvals_required:
        raise InvalidRequest(
            "--approver needs --require-approval N", hint="say how many approvals are needed"
        )
    if policy.break_glass and not policy.approvals_required:
        raise InvalidRequest(
            "--break-glass skips an approval, and this policy asks for none",
            hint="add --require-approval N, or drop --break-glass",
        )
    for approver in policy.approvers:
        check_name("approver", approver.removeprefix("@"))
    if policy.idle_timeout_seconds is not None and policy.idle_timeout_seconds <= 0:
        raise InvalidRequest("--idle-timeout must be positive")

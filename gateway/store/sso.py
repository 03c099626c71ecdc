"""Single sign-on's state: the OpenID Connect provider, the group mapping, the
bindings of principals to provider subjects, and a sign-in's effect.

Invariants:

* The client secret exists only as ``sso_providers.client_secret_ciphertext``,
  sealed by the master key's :class:`~gateway.credentials.secretbox.SecretBox`
  with the row's id as associated data; :meth:`SsoStore.sso_client_secret` is the
  one way back, and no record or error carries it.
* A sign-in finds its principal by (issuer, subject) only. A new subject gets a
  new principal (a user with no password and no role but what the mapping
  gives); if its name is taken, by a local user or another subject, the
  sign-in is refused, never merged.
* Groups and roles have a ``source``: a sign-in replaces the ``sso`` ones and
  never touches an admin's (``manual``). The mapping grants only the ``member``
  role, and not in a project where the principal has a role an admin gave, nor
  to a principal with a role in every project (``*``), whose role would be
  narrowed.
* A sign-in is one transaction; a disabled principal is refused in it.
"""

from __future__ import annotations

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.exc import IntegrityError

from gateway.errors import InvalidRequest, NotFound
from gateway.identity.oidc import MAX_CLAIM_VALUE_LENGTH, SignInRefused
from gateway.identity.principals import (
    ALL_PROJECTS,
    GroupMapping,
    PrincipalKind,
    Role,
    SsoProvider,
    SsoSignIn,
)
from gateway.store.engine import StoreBase
from gateway.store.rows import new_id
from gateway.store.schema import (
    principal_groups,
    principal_identities,
    principals,
    role_bindings,
    sso_group_mappings,
    sso_providers,
)
from gateway.store.validation import check_name, required_text

__all__ = ["SsoStore"]

_PROVIDER_ID = "oidc"
SSO_SECRET_AAD = b"sso_providers:" + _PROVIDER_ID.encode()
MANUAL = "manual"
SSO = "sso"


def _claim_value(value: str) -> str:
    required_text("claim value", value)
    if len(value) > MAX_CLAIM_VALUE_LENGTH:
        raise InvalidRequest(f"a claim value is at most {MAX_CLAIM_VALUE_LENGTH} characters")
    return value


class SsoStore(StoreBase):
    """The provider, the mapping and sign-ins."""

    # --- the provider -------------------------------------------------------------

    def sso_provider(self) -> SsoProvider | None:
        with self._transaction(write=False) as conn:
            row = conn.execute(
                select(sso_providers).where(sso_providers.c.id == _PROVIDER_ID)
            ).first()
        if row is None:
            return None
        return SsoProvider(
            issuer=row.issuer,
            client_id=row.client_id,
            groups_claim=row.groups_claim,
            scopes=row.scopes,
            redirect_base=row.redirect_base,
            updated_at=row.updated_at,
        )

    def sso_client_secret(self) -> str:
        with self._transaction(write=False) as conn:
            sealed = conn.execute(
                select(sso_providers.c.client_secret_ciphertext).where(
                    sso_providers.c.id == _PROVIDER_ID
                )
            ).scalar_one_or_none()
        if sealed is None:
            raise NotFound("single sign-on is not configured")
        return self._box.decrypt(bytes(sealed), aad=SSO_SECRET_AAD).decode()

    def set_sso_provider(self, provider: SsoProvider, *, client_secret: str | None) -> None:
        for field, value in (
            ("issuer", provider.issuer),
            ("client id", provider.client_id),
            ("groups claim", provider.groups_claim),
            ("scopes", provider.scopes),
        ):
            required_text(field, value)
        values: dict[str, object] = {
            "issuer": provider.issuer,
            "client_id": provider.client_id,
            "groups_claim": provider.groups_claim,
            "scopes": provider.scopes,
            "redirect_base": provider.redirect_base,
            "updated_at": self._now(),
        }
        if client_secret is not None:
            required_text("client secret", client_secret)
            values["client_secret_ciphertext"] = self._box.encrypt(
                client_secret.encode(), aad=SSO_SECRET_AAD
            )
        with self._transaction(write=True) as conn:
            exists = conn.execute(
                select(sso_providers.c.id).where(sso_providers.c.id == _PROVIDER_ID)
            ).first()
            if exists is not None:
                conn.execute(
                    update(sso_providers).where(sso_providers.c.id == _PROVIDER_ID).values(values)
                )
            elif client_secret is None:
                raise InvalidRequest(
                    "a client secret is needed to configure single sign-on",
                    hint="pass --client-secret-stdin",
                )
            else:
                conn.execute(sso_providers.insert().values(id=_PROVIDER_ID, **values))

    def remove_sso_provider(self) -> bool:
        with self._transaction(write=True) as conn:
            done = conn.execute(delete(sso_providers).where(sso_providers.c.id == _PROVIDER_ID))
        return bool(done.rowcount)

    # --- the group mapping --------------------------------------------------------

    def sso_mappings(self) -> list[GroupMapping]:
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                select(sso_group_mappings).order_by(sso_group_mappings.c.claim_value)
            ).all()
        return [GroupMapping(r.claim_value, r.group_name, r.project) for r in rows]

    def map_sso_group(self, mapping: GroupMapping) -> GroupMapping:
        """Map a claim value (replacing its earlier mapping)."""
        _claim_value(mapping.claim_value)
        check_name("group", mapping.group)
        if mapping.project is not None:
            check_name("project", mapping.project)
        values = {"group_name": mapping.group, "project": mapping.project}
        with self._transaction(write=True) as conn:
            done = conn.execute(
                update(sso_group_mappings)
                .where(sso_group_mappings.c.claim_value == mapping.claim_value)
                .values(values)
            )
            if not done.rowcount:
                conn.execute(
                    sso_group_mappings.insert().values(
                        claim_value=mapping.claim_value, created_at=self._now(), **values
                    )
                )
        return mapping

    def unmap_sso_group(self, claim_value: str) -> None:
        with self._transaction(write=True) as conn:
            done = conn.execute(
                delete(sso_group_mappings).where(sso_group_mappings.c.claim_value == claim_value)
            )
        if not done.rowcount:
            raise NotFound("no mapping for that claim value")

    # --- signing in ---------------------------------------------------------------

    def sso_sign_in(
        self, *, issuer: str, subject: str, name: str, claim_values: tuple[str, ...]
    ) -> SsoSignIn:
        check_name("user", name)
        now = self._now()
        try:
            with self._transaction(write=True, conflicts=True) as conn:
                mapped = (
                    conn.execute(
                        select(sso_group_mappings).where(
                            sso_group_mappings.c.claim_value.in_(claim_values)
                        )
                    ).all()
                    if claim_values
                    else []
                )
                principal_id, name, created = _bound_principal(conn, issuer, subject, name, now)
                groups = _set_groups(conn, principal_id, {m.group_name for m in mapped})
                member_of = _set_memberships(
                    conn, principal_id, {m.project for m in mapped if m.project}
                )
        except IntegrityError:
            # Another sign-in created the same name or subject at the same moment.
            raise SignInRefused(
                "another sign-in for this user was under way", hint="try again", who=name
            ) from None
        return SsoSignIn(principal_id, name, groups, member_of, created)


def _bound_principal(
    conn: Connection, issuer: str, subject: str, name: str, now: object
) -> tuple[str, str, bool]:
    """(id, name, created) of the principal bound to (issuer, subject)."""
    bound = conn.execute(
        select(principals.c.id, principals.c.name, principals.c.disabled_at)
        .join(principal_identities, principal_identities.c.principal_id == principals.c.id)
        .where(principal_identities.c.issuer == issuer, principal_identities.c.subject == subject)
    ).first()
    if bound is not None:
        if bound.disabled_at is not None:
            raise SignInRefused(f"user {bound.name} is disabled", who=bound.name)
        conn.execute(
            update(principal_identities)
            .where(principal_identities.c.principal_id == bound.id)
            .values(last_sign_in_at=now)
        )
        return bound.id, bound.name, False
    taken = conn.execute(select(principals.c.id).where(principals.c.name == name)).first()
    if taken is not None:
        # Never by name: a local user (or another subject) of this name is not
        # this person just because the provider says the same name.
        raise SignInRefused(
            f"the pam user '{name}' already exists and is not bound to this sign-in",
            hint="an administrator can remove or rename that user; single sign-on never"
            " takes over an existing user",
            who=name,
        )
    principal_id = new_id()
    conn.execute(
        principals.insert().values(
            id=principal_id,
            name=name,
            kind=PrincipalKind.USER.value,
            password_hash=None,
            created_at=now,
        )
    )
    conn.execute(
        principal_identities.insert().values(
            principal_id=principal_id,
            issuer=issuer,
            subject=subject,
            created_at=now,
            last_sign_in_at=now,
        )
    )
    return principal_id, name, True


def _set_groups(conn: Connection, principal_id: str, mapped: set[str]) -> tuple[str, ...]:
    """Replace the sign-in's groups with *mapped*; every group the principal has now."""
    conn.execute(
        delete(principal_groups).where(
            principal_groups.c.principal_id == principal_id, principal_groups.c.source == SSO
        )
    )
    manual = set(
        conn.execute(
            select(principal_groups.c.group_name).where(
                principal_groups.c.principal_id == principal_id
            )
        ).scalars()
    )
    new = sorted(mapped - manual)
    if new:
        conn.execute(
            principal_groups.insert(),
            [{"principal_id": principal_id, "group_name": g, "source": SSO} for g in new],
        )
    return tuple(sorted(manual | mapped))


def _set_memberships(conn: Connection, principal_id: str, projects: set[str]) -> tuple[str, ...]:
    """Replace the sign-in's ``member`` roles with one per project of *projects*
    where an admin gave no role (none at all with an admin's role in ``*``)."""
    conn.execute(
        delete(role_bindings).where(
            role_bindings.c.principal_id == principal_id, role_bindings.c.source == SSO
        )
    )
    manual = set(
        conn.execute(
            select(role_bindings.c.project).where(role_bindings.c.principal_id == principal_id)
        ).scalars()
    )
    if ALL_PROJECTS in manual:
        return ()
    new = sorted(projects - manual)
    if new:
        conn.execute(
            role_bindings.insert(),
            [
                {
                    "principal_id": principal_id,
                    "project": p,
                    "role": Role.MEMBER.value,
                    "source": SSO,
                }
                for p in new
            ],
        )
    return tuple(new)

"""Tests of gateway.store.sso (the provider, the group mapping, sign-ins) on a
real SQLite file and a real PostgreSQL (the ``store_url`` fixture runs each)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from store_support import FakeClock

from gateway.credentials.secretbox import SecretBox
from gateway.errors import InvalidRequest, NotFound
from gateway.identity.hashing import token_digest
from gateway.identity.oidc import SignInRefused
from gateway.identity.principals import GroupMapping, PrincipalKind, Role, SsoProvider
from gateway.store import Store
from gateway.store.schema import sso_providers

ISSUER = "https://idp.example.com"
SECRET = "client-Secret-7f3a"


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, SecretBox(secrets.token_bytes(32)), clock=clock) as opened:
        yield opened


def provider(**overrides: object) -> SsoProvider:
    values: dict[str, object] = {
        "issuer": ISSUER,
        "client_id": "pam",
        "groups_claim": "groups",
        "scopes": "openid profile",
        "redirect_base": None,
        "updated_at": datetime.now(UTC),
    }
    values.update(overrides)
    return SsoProvider(**values)  # type: ignore[arg-type]


def sign_in(store: Store, subject: str, name: str, *claims: str, issuer: str = ISSUER) -> object:
    return store.sso_sign_in(issuer=issuer, subject=subject, name=name, claim_values=claims)


def test_the_client_secret_is_sealed_and_never_in_the_record(store: Store) -> None:
    assert store.sso_provider() is None
    store.set_sso_provider(provider(), client_secret=SECRET)
    record = store.sso_provider()
    assert record is not None and record.client_id == "pam"
    assert SECRET not in repr(record)
    with store._transaction(write=False) as conn:
        sealed = conn.execute(select(sso_providers.c.client_secret_ciphertext)).scalar_one()
    assert SECRET.encode() not in bytes(sealed)
    assert store.sso_client_secret() == SECRET


def test_reconfiguring_without_a_secret_keeps_it_and_a_first_time_needs_one(store: Store) -> None:
    with pytest.raises(InvalidRequest, match="client secret is needed"):
        store.set_sso_provider(provider(), client_secret=None)
    store.set_sso_provider(provider(), client_secret=SECRET)
    store.set_sso_provider(provider(groups_claim="roles"), client_secret=None)
    record = store.sso_provider()
    assert record is not None and record.groups_claim == "roles"
    assert store.sso_client_secret() == SECRET
    assert store.remove_sso_provider()
    with pytest.raises(NotFound):
        store.sso_client_secret()


def test_a_sealed_secret_does_not_open_under_another_master_key(
    store_url: str, clock: FakeClock
) -> None:
    with Store.open(store_url, SecretBox(secrets.token_bytes(32)), clock=clock) as first:
        first.set_sso_provider(provider(), client_secret=SECRET)
    with Store.open(store_url, SecretBox(secrets.token_bytes(32)), clock=clock) as other:
        with pytest.raises(Exception, match="cannot decrypt") as raised:
            other.sso_client_secret()
        assert SECRET not in str(raised.value)


def test_mappings_are_replaced_listed_and_removed(store: Store) -> None:
    store.map_sso_group(GroupMapping("idp-dba", "dba", None))
    store.map_sso_group(GroupMapping("idp-dba", "dba2", "default"))
    store.map_sso_group(GroupMapping("cn=ops,ou=groups", "ops", None))
    assert store.sso_mappings() == [
        GroupMapping("cn=ops,ou=groups", "ops", None),
        GroupMapping("idp-dba", "dba2", "default"),
    ]
    store.unmap_sso_group("idp-dba")
    with pytest.raises(NotFound):
        store.unmap_sso_group("idp-dba")
    with pytest.raises(InvalidRequest, match="group name"):
        store.map_sso_group(GroupMapping("x", "Bad Name", None))


def test_a_first_sign_in_creates_a_user_with_no_password_and_only_mapped_groups(
    store: Store,
) -> None:
    store.map_sso_group(GroupMapping("idp-dba", "dba", "default"))
    store.map_sso_group(GroupMapping("idp-ops", "ops", None))
    first = store.sso_sign_in(
        issuer=ISSUER, subject="s-1", name="lena", claim_values=("idp-dba", "unmapped")
    )
    assert first.created and first.name == "lena"
    assert first.groups == ("dba",) and first.member_of == ("default",)
    listed = store.get_principal("lena")
    assert not listed.has_password and listed.kind == "user"
    assert listed.roles == {"default": "member"} and listed.groups == ("dba",)
    assert store.password_hash("lena") == (first.principal_id, None)


def test_no_mapped_claim_gives_no_group_and_no_role(store: Store) -> None:
    store.map_sso_group(GroupMapping("idp-dba", "dba", "default"))
    done = store.sso_sign_in(issuer=ISSUER, subject="s-2", name="nogroup", claim_values=("x",))
    assert done.groups == () and done.member_of == ()
    assert store.get_principal("nogroup").roles == {}


def test_the_next_sign_in_finds_the_subject_and_replaces_its_sso_groups(store: Store) -> None:
    store.map_sso_group(GroupMapping("idp-dba", "dba", "default"))
    store.map_sso_group(GroupMapping("idp-ops", "ops", "analytics"))
    first = store.sso_sign_in(issuer=ISSUER, subject="s-1", name="lena", claim_values=("idp-dba",))
    # The provider now calls the person something else: the binding, not the name, counts.
    again = store.sso_sign_in(
        issuer=ISSUER, subject="s-1", name="lena-renamed", claim_values=("idp-ops",)
    )
    assert not again.created and again.principal_id == first.principal_id
    assert again.name == "lena" and again.groups == ("ops",)
    assert store.get_principal("lena").roles == {"analytics": "member"}


def test_an_admins_groups_and_roles_stay_whatever_the_provider_says(store: Store) -> None:
    store.map_sso_group(GroupMapping("idp-dba", "dba", "default"))
    first = store.sso_sign_in(issuer=ISSUER, subject="s-1", name="lena", claim_values=())
    # An admin's own role and group (as `pam user add` writes them).
    from gateway.store.schema import principal_groups, role_bindings

    with store._transaction(write=True) as conn:
        conn.execute(
            role_bindings.insert().values(
                principal_id=first.principal_id, project="default", role=Role.AUDITOR.value
            )
        )
        conn.execute(
            principal_groups.insert().values(principal_id=first.principal_id, group_name="oncall")
        )
    again = store.sso_sign_in(issuer=ISSUER, subject="s-1", name="lena", claim_values=("idp-dba",))
    assert again.groups == ("dba", "oncall") and again.member_of == ()
    assert store.get_principal("lena").roles == {"default": "auditor"}
    later = store.sso_sign_in(issuer=ISSUER, subject="s-1", name="lena", claim_values=())
    assert later.groups == ("oncall",)


def test_an_admin_of_every_project_is_not_narrowed_to_member(store: Store) -> None:
    store.map_sso_group(GroupMapping("idp-dba", "dba", "default"))
    first = store.sso_sign_in(issuer=ISSUER, subject="s-9", name="boss", claim_values=())
    from gateway.store.schema import role_bindings

    with store._transaction(write=True) as conn:
        conn.execute(
            role_bindings.insert().values(
                principal_id=first.principal_id, project="*", role=Role.ADMIN.value
            )
        )
    again = store.sso_sign_in(issuer=ISSUER, subject="s-9", name="boss", claim_values=("idp-dba",))
    assert again.member_of == ()
    assert store.get_principal("boss").roles == {"*": "admin"}


def test_a_local_user_of_the_same_name_is_never_taken_over(store: Store) -> None:
    local = store.add_principal(
        "lena", kind=PrincipalKind.USER, roles={"*": Role.ADMIN}, password_hash="argon2-hash"
    )
    with pytest.raises(SignInRefused, match="already exists and is not bound") as refused:
        store.sso_sign_in(issuer=ISSUER, subject="s-1", name="lena", claim_values=())
    assert refused.value.who == "lena"
    assert store.get_principal("lena").id == local.id
    # Nor does another subject (or another issuer's same subject) get the first's user.
    store.sso_sign_in(issuer=ISSUER, subject="s-2", name="max", claim_values=())
    with pytest.raises(SignInRefused):
        store.sso_sign_in(issuer=ISSUER, subject="s-3", name="max", claim_values=())
    with pytest.raises(SignInRefused):
        store.sso_sign_in(
            issuer="https://other.example", subject="s-2", name="max", claim_values=()
        )


def test_a_disabled_user_is_refused_and_a_removed_one_comes_back_new(store: Store) -> None:
    first = store.sso_sign_in(issuer=ISSUER, subject="s-1", name="lena", claim_values=())
    store.disable_principal("lena")
    with pytest.raises(SignInRefused, match="disabled"):
        store.sso_sign_in(issuer=ISSUER, subject="s-1", name="lena", claim_values=())
    assert store.remove_principal("lena")
    again = store.sso_sign_in(issuer=ISSUER, subject="s-1", name="lena", claim_values=())
    assert again.created and again.principal_id != first.principal_id


def test_a_sign_in_user_gets_tokens_like_anyone(store: Store, clock: FakeClock) -> None:
    done = store.sso_sign_in(issuer=ISSUER, subject="s-1", name="lena", claim_values=())
    store.add_token(done.principal_id, kind="session", digest=token_digest("t"), expires_at=None)
    found = store.principal_by_token(token_digest("t"), now=clock.now)
    assert found is not None and found[0].name == "lena" and found[0].roles == {}

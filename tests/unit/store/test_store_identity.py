"""Tests of gateway.store.identity (principals, tokens, policies) on a real
SQLite file and a real PostgreSQL (the ``store_url`` fixture runs each on both)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select
from store_support import FakeClock

from gateway.credentials.secretbox import SecretBox
from gateway.errors import AlreadyExists, InvalidRequest, NotFound
from gateway.identity.hashing import hash_password, new_token, token_digest
from gateway.identity.policy import Policy
from gateway.identity.principals import PrincipalKind, Role
from gateway.store import Store
from gateway.store.schema import tokens


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, SecretBox(secrets.token_bytes(32)), clock=clock) as opened:
        yield opened


def add_user(store: Store, name: str, role: Role = Role.MEMBER, **kwargs: object) -> str:
    return store.add_principal(
        name,
        kind=PrincipalKind.USER,
        roles={"default": role},
        **kwargs,  # type: ignore[arg-type]
    ).id


def issue(store: Store, principal_id: str, clock: FakeClock, ttl: float | None = 3600) -> str:
    token = new_token()
    expires = None if ttl is None else clock.now + timedelta(seconds=ttl)
    store.add_token(principal_id, kind="session", digest=token_digest(token), expires_at=expires)
    return token


def test_add_and_list_principals_with_roles_and_groups(store: Store) -> None:
    store.add_principal(
        "alice",
        kind=PrincipalKind.USER,
        roles={"default": Role.MEMBER, "analytics": Role.AUDITOR},
        groups=("dba", "ops", "dba"),
        password_hash=hash_password("correct horse"),
    )
    store.add_principal("bot", kind=PrincipalKind.MACHINE, roles={"*": Role.MEMBER})
    listed = {p.name: p for p in store.list_principals()}
    assert sorted(listed) == ["alice", "bot"]
    assert listed["alice"].roles == {"default": "member", "analytics": "auditor"}
    assert listed["alice"].groups == ("dba", "ops")
    assert listed["alice"].has_password and not listed["bot"].has_password
    assert listed["bot"].kind == "machine" and listed["bot"].roles == {"*": "member"}
    assert listed["alice"].disabled_at is None


def test_names_are_unique_and_checked(store: Store) -> None:
    add_user(store, "alice")
    with pytest.raises(AlreadyExists, match="user 'alice' already exists"):
        add_user(store, "alice")
    with pytest.raises(InvalidRequest):
        add_user(store, "bad name;")
    with pytest.raises(InvalidRequest, match="needs a role"):
        store.add_principal("norole", kind=PrincipalKind.USER, roles={})


def test_password_hash_only_for_enabled_users(store: Store) -> None:
    hashed = hash_password("correct horse")
    alice = add_user(store, "alice", password_hash=hashed)
    store.add_principal("bot", kind=PrincipalKind.MACHINE, roles={"*": Role.MEMBER})
    assert store.password_hash("alice") == (alice, hashed)
    assert store.password_hash("bot") is None
    assert store.password_hash("nobody") is None
    store.disable_principal("alice")
    assert store.password_hash("alice") is None


def test_a_token_authenticates_its_principal_with_roles_and_groups(
    store: Store, clock: FakeClock
) -> None:
    alice = add_user(store, "alice", groups=("dba",))
    token = issue(store, alice, clock)
    found = store.principal_by_token(token_digest(token), now=clock.now)
    assert found is not None
    principal, kind = found
    assert (principal.id, principal.name, kind) == (alice, "alice", "session")
    assert principal.roles == {"default": Role.MEMBER}
    assert principal.groups == frozenset({"dba"})
    assert principal.token_id is not None
    assert store.principal_by_token(token_digest(new_token()), now=clock.now) is None


def test_only_the_digest_is_stored(store: Store, clock: FakeClock) -> None:
    token = issue(store, add_user(store, "alice"), clock)
    with store._engine.connect() as conn:
        stored = [tuple(row) for row in conn.execute(select(tokens))]
    assert token not in repr(stored)
    assert token_digest(token) in repr(stored)


def test_a_token_expires(store: Store, clock: FakeClock) -> None:
    token = issue(store, add_user(store, "alice"), clock, ttl=60)
    digest = token_digest(token)
    assert store.principal_by_token(digest, now=clock.advance(59)) is not None
    assert store.principal_by_token(digest, now=clock.advance(1)) is None


def test_a_token_without_expiry_lasts(store: Store, clock: FakeClock) -> None:
    token = issue(store, add_user(store, "alice"), clock, ttl=None)
    assert store.principal_by_token(token_digest(token), now=clock.advance(10**8)) is not None


def test_a_revoked_token_no_longer_authenticates(store: Store, clock: FakeClock) -> None:
    alice = add_user(store, "alice")
    token, other = issue(store, alice, clock), issue(store, alice, clock)
    assert store.revoke_token(token_digest(token)) is True
    assert store.revoke_token(token_digest(token)) is False  # already revoked
    assert store.principal_by_token(token_digest(token), now=clock.now) is None
    assert store.principal_by_token(token_digest(other), now=clock.now) is not None


def test_revoke_tokens_of_one_kind(store: Store, clock: FakeClock) -> None:
    alice = add_user(store, "alice")
    session = issue(store, alice, clock)
    local = new_token()
    store.add_token(alice, kind="local", digest=token_digest(local), expires_at=None)
    assert store.revoke_tokens_of(alice, kind="local") == 1
    assert store.principal_by_token(token_digest(local), now=clock.now) is None
    assert store.principal_by_token(token_digest(session), now=clock.now) is not None


def test_disable_revokes_every_token_and_is_idempotent(store: Store, clock: FakeClock) -> None:
    alice = add_user(store, "alice")
    bob = add_user(store, "bob")
    alice_tokens = [issue(store, alice, clock) for _ in range(2)]
    bob_token = issue(store, bob, clock)
    disabled = store.disable_principal("alice")
    assert disabled.disabled_at is not None
    for token in alice_tokens:
        assert store.principal_by_token(token_digest(token), now=clock.now) is None
    assert store.principal_by_token(token_digest(bob_token), now=clock.now) is not None
    assert store.disable_principal("alice").disabled_at == disabled.disabled_at
    with pytest.raises(NotFound, match="no user named 'nobody'"):
        store.disable_principal("nobody")


def test_a_token_issued_after_disable_does_not_authenticate(store: Store, clock: FakeClock) -> None:
    alice = add_user(store, "alice")
    store.disable_principal("alice")
    token = issue(store, alice, clock)
    assert store.principal_by_token(token_digest(token), now=clock.now) is None


def test_remove_deletes_an_unused_principal(store: Store, clock: FakeClock) -> None:
    alice = add_user(store, "alice", groups=("dba",))
    token = issue(store, alice, clock)
    assert store.remove_principal("alice") is True
    assert [p.name for p in store.list_principals()] == []
    assert store.principal_by_token(token_digest(token), now=clock.now) is None
    add_user(store, "alice")  # the name is free again


def test_remove_keeps_a_principal_named_by_a_session_disabled(
    store: Store, clock: FakeClock
) -> None:
    alice = add_user(store, "alice")
    token = issue(store, alice, clock)
    store.add_resource("prod", "db.example.com", 5432, "app")
    store.add_account("prod", "ro", "app_ro", "pw-" + secrets.token_hex(4))
    store.create_session(
        requester="alice",
        resource="prod",
        account="ro",
        listen_host="127.0.0.1",
        expires_at=clock.now + timedelta(hours=1),
        request={"principal_id": alice},
    )
    assert store.remove_principal("alice") is False
    kept = store.get_principal("alice")
    assert kept.disabled_at is not None
    assert store.principal_by_token(token_digest(token), now=clock.now) is None
    with pytest.raises(AlreadyExists):
        add_user(store, "alice")


def test_set_password_hash_for_users_only(store: Store) -> None:
    add_user(store, "alice")
    store.add_principal("bot", kind=PrincipalKind.MACHINE, roles={"*": Role.MEMBER})
    hashed = hash_password("correct horse")
    store.set_password_hash("alice", hashed)
    assert store.get_principal("alice").has_password
    with pytest.raises(NotFound):
        store.set_password_hash("bot", hashed)
    with pytest.raises(NotFound):
        store.set_password_hash("nobody", hashed)


def test_policies_round_trip_by_project(store: Store) -> None:
    first = Policy("dba-prod", "default", ("alice", "@dba"), "prod-*", "*", 7200, True)
    second = Policy(
        "stats",
        "analytics",
        ("bob",),
        "*",
        "ro",
        1800,
        approvals_required=2,
        approvers=("carol", "@leads"),
        break_glass=True,
        require_mfa=True,
        idle_timeout_seconds=900,
    )
    store.add_policy(first)
    store.add_policy(second)
    assert store.policies() == [first, second]
    assert store.policies("default") == [first]
    assert store.policies("analytics") == [second]
    assert store.policies("nowhere") == []
    with pytest.raises(AlreadyExists, match="policy 'stats' already exists"):
        store.add_policy(second)
    store.remove_policy("dba-prod")
    assert store.policies() == [second]
    with pytest.raises(NotFound, match="no policy named 'dba-prod'"):
        store.remove_policy("dba-prod")


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (Policy("p", "default", (), "*", "*", 60), "at least one --subject"),
        (Policy("p", "default", ("a",), "*", "*", 0), "must be positive"),
        (Policy("bad name", "default", ("a",), "*", "*", 60), "policy"),
        (Policy("p", "bad project", ("a",), "*", "*", 60), "project"),
        (Policy("p", "default", ("a",), "*", "*", 60, approvals_required=11), "between 0 and 10"),
        (Policy("p", "default", ("a",), "*", "*", 60, approvers=("x",)), "--require-approval N"),
        (Policy("p", "default", ("a",), "*", "*", 60, break_glass=True), "asks for none"),
        (
            Policy("p", "default", ("a",), "*", "*", 60, approvals_required=1, approvers=("@",)),
            "approver",
        ),
        (Policy("p", "default", ("a",), "*", "*", 60, idle_timeout_seconds=0), "--idle-timeout"),
    ],
)
def test_invalid_policies_are_refused(store: Store, policy: Policy, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        store.add_policy(policy)
    assert store.policies() == []

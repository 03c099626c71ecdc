"""Tests of gateway.store.master_keys (master key rotation, the store's side) on a
real SQLite file and a real PostgreSQL (the ``store_url`` fixture runs each):
every sealed column re-sealed, trails across a rotation verifying once the old
key is gone, activation refused while a live gateway lacks the new version."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import LargeBinary, Row, create_engine, select, text
from store_support import FakeClock, pg_admin_url
from trail_support import set_batch_column

from gateway.audit.chain import AUDIT_KEY_INFO, AuditChain
from gateway.audit.records import AuditEvent
from gateway.credentials.schedule import presence_lease
from gateway.credentials.secretbox import SecretBox, SecretDecryptError, key_version_of
from gateway.errors import ConfigError
from gateway.identity.principals import PrincipalKind, Role, SsoProvider
from gateway.store import Store
from gateway.store import master_keys as master_keys_module
from gateway.store.master_keys import SEALED_COLUMNS, KeyNotHeld
from gateway.store.schema import metadata

K1, K2 = secrets.token_bytes(32), secrets.token_bytes(32)


@pytest.fixture
def box() -> SecretBox:
    """The ring of a gateway that staged version 2 (version 1 active)."""
    return SecretBox.from_ring({1: K1, 2: K2}, active=1)


@pytest.fixture
def store(store_url: str, box: SecretBox, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, box, clock=clock) as opened:
        yield opened


def only(version: int) -> SecretBox:
    return SecretBox.from_ring({1: K1, 2: K2}, active=version)


def fill_every_secret(store: Store) -> None:
    """One value in every sealed column."""
    store.add_resource("db1", "db.example.com", 5432, "app")
    store.add_account("db1", "ro", "app_reader", "pw-account")
    store.set_rotation_credential("db1", "rotator", "pw-rotator")
    store.begin_rotation(
        "db1", "ro", "pw-pending", rotation_id="r" * 32, via="self", started_by="alice"
    )
    principal = store.add_principal("bob", kind=PrincipalKind.USER, roles={"default": Role.MEMBER})
    store.begin_mfa_enrolment(principal.id, b"totp-secret-bob")
    store.set_sso_provider(
        SsoProvider(
            issuer="https://idp.example.com",
            client_id="pam",
            groups_claim="groups",
            scopes="openid",
            redirect_base=None,
            updated_at=datetime.now(UTC),
        ),
        client_secret="sso-secret",
    )
    store.add_webhook(
        project="default", url="https://hooks.example.com/x", events=["*"], secret="hook-secret",
        created_by="alice",
    )  # fmt: skip


def every_sealed_value(store: Store) -> list[tuple[Any, Any, bytes]]:
    found = []
    with store._transaction(write=False) as conn:
        for sealed in SEALED_COLUMNS:
            key, column = sealed.table.c[sealed.key], sealed.table.c[sealed.column]
            for ident, blob in conn.execute(select(key, column).where(column.is_not(None))):
                found.append((sealed, ident, bytes(blob)))
    return found


def event(session_id: str, sql: str) -> AuditEvent:
    return AuditEvent(
        session_id=session_id,
        connection_id="a" * 32,
        kind="statement",
        occurred_at=datetime(2024, 5, 1, tzinfo=UTC),
        sql=sql,
        protocol="simple",
        status="ok",
    )


def audit_chain_of(version: int) -> AuditChain:
    """The audit chain under master key *version*'s audit key alone."""
    return AuditChain(only(version).derive_key(AUDIT_KEY_INFO, version=version))


def open_session(store: Store) -> str:
    return store.create_session(
        requester="alice",
        resource="db1",
        account="ro",
        listen_host="127.0.0.1",
        expires_at=datetime(2100, 1, 1, tzinfo=UTC),
    ).id


def test_sealed_columns_name_every_sealed_column_of_the_schema() -> None:
    binary = {
        (table.name, column.name)
        for table in metadata.tables.values()
        for column in table.columns
        if isinstance(column.type, LargeBinary)
    }
    # Audit batches are MACed, not sealed: the chain's business.
    binary -= {("audit_batches", "records"), ("audit_batches", "digests")}
    assert binary == {(s.table.name, s.column) for s in SEALED_COLUMNS}


def test_every_secret_is_resealed_and_opens_without_the_old_key(
    store: Store, store_url: str, clock: FakeClock
) -> None:
    fill_every_secret(store)
    before = every_sealed_value(store)
    assert {key_version_of(blob) for _, _, blob in before} == {1}
    assert store.sealed_counts() == {1: len(before)}

    store.activate_master_key(2)
    assert store.active_key_version() == 2
    resealed = store.reseal_secrets()
    after = every_sealed_value(store)
    # The audit key of version 1 is kept too, sealed under version 2.
    assert resealed == len(before) and len(after) == len(before) + 1
    assert store.sealed_counts() == {2: len(after)}
    assert store.reseal_secrets() == 0

    without_v1 = SecretBox.from_ring({2: K2}, active=2)
    for sealed, ident, blob in after:
        assert without_v1.decrypt(blob, aad=sealed.aad(ident))
    with Store.open(store_url, without_v1, clock=clock) as later:
        assert later.reveal_password("db1", "ro") == "pw-account"
        assert later.reveal_rotation_credential("db1") == ("rotator", "pw-rotator")
        assert later.reveal_pending_password("db1", "ro") == "pw-pending"
        assert later.sso_client_secret() == "sso-secret"
        # New secrets are sealed under version 2.
        later.add_account("db1", "rw", "app_writer", "pw-new")
        assert later.sealed_counts() == {2: len(after) + 1}


def test_a_crash_midway_leaves_every_value_openable_and_a_rerun_finishes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill_every_secret(store)
    count = len(every_sealed_value(store))
    store.activate_master_key(2)
    real = master_keys_module.MasterKeyStore._reseal_rows
    calls = []

    def crash_on_the_third_batch(self: Store, *args: Any) -> int:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(self, *args)

    monkeypatch.setattr(master_keys_module.MasterKeyStore, "_reseal_rows", crash_on_the_third_batch)
    with pytest.raises(RuntimeError):
        store.reseal_secrets(batch=1)
    counts = store.sealed_counts()
    assert counts.get(1, 0) > 0 and counts.get(2, 0) > 0
    ring = only(2)
    for sealed, ident, blob in every_sealed_value(store):
        assert ring.decrypt(blob, aad=sealed.aad(ident))
    monkeypatch.setattr(master_keys_module.MasterKeyStore, "_reseal_rows", real)
    store.reseal_secrets(batch=1)
    assert store.sealed_counts() == {2: count + 1}


def test_a_value_that_does_not_open_stops_the_reseal_naming_its_row_not_its_secret(
    store: Store, store_url: str
) -> None:
    fill_every_secret(store)
    account = next(
        ident
        for sealed, ident, _ in every_sealed_value(store)
        if sealed.column == "password_ciphertext"
    )
    store.activate_master_key(2)
    raw = create_engine(pg_admin_url(store_url) if "postgresql" in store_url else store_url)
    try:
        with raw.begin() as conn:
            blob = bytes(
                conn.execute(
                    text("SELECT password_ciphertext FROM accounts WHERE id = :id"), {"id": account}
                ).scalar_one()
            )
            altered = blob[:-1] + bytes((blob[-1] ^ 1,))
            conn.execute(
                text("UPDATE accounts SET password_ciphertext = :v WHERE id = :id"),
                {"v": altered, "id": account},
            )
    finally:
        raw.dispose()
    with pytest.raises(SecretDecryptError) as refused:
        store.reseal_secrets()
    said = f"{refused.value} {refused.value.hint}"
    assert f"accounts.password_ciphertext of row {account}" in said
    assert "--activate" in said
    assert "pw-account" not in said
    # The altered value is left as it was.
    assert [
        blob
        for sealed, ident, blob in every_sealed_value(store)
        if (sealed.column, ident) == ("password_ciphertext", account)
    ] == [altered]


def test_trails_across_a_rotation_verify_once_the_old_key_is_retired(
    store: Store, store_url: str, clock: FakeClock
) -> None:
    fill_every_secret(store)
    done = open_session(store)
    store.append_audit([event(done, "SELECT 1"), event(done, "SELECT 2")])
    store.end_session(done, reason="client_ended")
    spanning = open_session(store)
    store.append_audit([event(spanning, "before")])
    # Another gateway, still sealing and chaining under version 1 until its
    # next presence renewal.
    with Store.open(store_url, SecretBox.from_ring({1: K1, 2: K2}, active=1), clock=clock) as lag:
        store.activate_master_key(2)
        store.reseal_secrets()
        store.append_audit([event(spanning, "after, on the rotating gateway")])
        lag.append_audit([event(spanning, "after, on a lagging gateway")])
        lag.sync_master_key()
        lag.append_audit([event(spanning, "after, once it followed")])
    store.end_session(spanning, reason="client_ended")
    fresh = open_session(store)
    store.append_audit([event(fresh, "SELECT 3")])
    store.end_session(fresh, reason="client_ended")
    assert store.verify_audit() == []

    with Store.open(store_url, SecretBox.from_ring({2: K2}, active=2), clock=clock) as later:
        assert later.verify_audit() == []
        assert later.verify_rotation_record() == []
        # The chain really is keyed per version: under one version's audit key
        # alone (as a store before this revision would verify), the trail
        # written before the rotation holds only under version 1's, the one
        # after only under version 2's, and the one spanning it under neither.
        later._chain = audit_chain_of(2)
        assert later.verify_audit(fresh) == []
        for session in (done, spanning):
            problems = later.verify_audit(session)
            assert problems and {p.problem for p in problems} >= {"changed"}
        later._chain = audit_chain_of(1)
        assert later.verify_audit(done) == []
        for session in (fresh, spanning):
            problems = later.verify_audit(session)
            assert problems and {p.problem for p in problems} >= {"changed"}


def _old_batch_edited(
    store: Store, store_url: str, edit: Callable[[str, Row[Any]], tuple[str, bytes]]
) -> str:
    """A session whose one batch (three statements) was written under version 1,
    version 2 activated since, and one column of that batch set behind the
    store's back to what *edit* makes of (the session, the batch's row)."""
    fill_every_secret(store)
    session = open_session(store)
    store.append_audit([event(session, f"SELECT {n}") for n in range(3)])
    store.activate_master_key(2)
    raw = create_engine(pg_admin_url(store_url) if "postgresql" in store_url else store_url)
    try:
        with raw.connect() as conn:
            batch = conn.execute(
                text("SELECT first_seq, prev_hash, digests FROM audit_batches")
            ).one()
        column, value = edit(session, batch)
        set_batch_column(raw, session, 1, column, value)
    finally:
        raw.dispose()
    return session


def test_edited_digests_of_an_old_version_batch_name_only_the_edited_record(
    store: Store, store_url: str, clock: FakeClock
) -> None:
    session = _old_batch_edited(
        store,
        store_url,
        lambda _session, batch: (
            "digests",
            bytes(batch.digests)[:16] + bytes(16) + bytes(batch.digests)[32:],
        ),
    )
    # Under version 2's key first, no digest matches; under version 1's, all
    # but the edited one: that one is named, not the whole batch.
    with Store.open(store_url, SecretBox.from_ring({2: K2}, active=2), clock=clock) as later:
        assert [(p.seq, p.problem) for p in later.verify_audit(session)] == [(2, "changed")]


def test_a_batch_whose_mac_verifies_under_one_key_must_have_its_digests_under_it(
    store: Store, store_url: str, clock: FakeClock
) -> None:
    # Not mixed: a batch's MAC recomputed under version 2's audit key over its
    # digests made under version 1's verifies, but then so must its records
    # under version 2's, and none does.
    session = _old_batch_edited(
        store,
        store_url,
        lambda session, batch: (
            "hash",
            audit_chain_of(2).batch_hash(
                session, batch.first_seq, batch.prev_hash, bytes(batch.digests)
            ),
        ),
    )
    with Store.open(store_url, only(2), clock=clock) as later:
        problems = later.verify_audit(session)
    assert [(p.seq, p.problem) for p in problems] == [(n, "changed") for n in (1, 2, 3)]


def test_activation_waits_for_every_live_gateway_but_not_a_gone_one(
    store: Store, clock: FakeClock
) -> None:
    store.acquire_lease(presence_lease("gw-b"), "gw-b", 15)
    store.report_key_versions("gw-b", {1: only(1).key_id(1)})
    store.acquire_lease(presence_lease("gw-c"), "gw-c", 15)  # never reported
    with pytest.raises(KeyNotHeld, match="missing on: gw-b, gw-c") as refused:
        store.activate_master_key(2)
    assert "2.key" in (refused.value.hint or "")
    assert store.active_key_version() == 1
    assert store._box.active_version == 1
    # gw-b staged a version 2 of its own: another key under the same number.
    store.report_key_versions("gw-b", {1: only(1).key_id(1), 2: SecretBox(K1).key_id(1)})
    with pytest.raises(KeyNotHeld, match="another key under that number on: gw-b"):
        store.activate_master_key(2)
    store.report_key_versions("gw-b", {v: only(1).key_id(v) for v in (1, 2)})
    with pytest.raises(KeyNotHeld, match=r"missing on: gw-c$"):
        store.activate_master_key(2)
    # gw-c goes down: its lease lapses, and it no longer blocks.
    clock.advance(10)
    store.acquire_lease(presence_lease("gw-b"), "gw-b", 15)
    clock.advance(10)
    store.activate_master_key(2)
    assert store.active_key_version() == 2
    assert [(h.gateway_id, h.versions) for h in store.key_holders()] == [("gw-b", (1, 2))]


def test_a_gateway_without_the_active_version_cannot_open_the_store(
    store: Store, store_url: str, clock: FakeClock
) -> None:
    store.activate_master_key(2)
    with pytest.raises(ConfigError, match="active master key is version 2") as refused:
        Store.open(store_url, SecretBox(K1), clock=clock)
    assert "master.keys/2.key" in (refused.value.hint or "")
    said = f"{refused.value} {refused.value.hint}"
    for key in (K1, K2):
        for form in (key.hex(), base64.b64encode(key).decode(), repr(key)):
            assert form not in said


def test_a_lease_lapsed_while_reporting_is_not_counted(store: Store, clock: FakeClock) -> None:
    store.acquire_lease(presence_lease("gw-b"), "gw-b", 5)
    store.report_key_versions("gw-b", {v: only(1).key_id(v) for v in (1, 2)})
    assert [h.gateway_id for h in store.key_holders()] == ["gw-b"]
    clock.advance(timedelta(seconds=6).total_seconds())
    assert store.key_holders() == []

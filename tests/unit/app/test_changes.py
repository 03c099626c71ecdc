"""Two gateways on one store: a change made through one reaches the grants and
the credentials the other holds (``gateway.app.changes``).

Two real :class:`~gateway.app.gateway.Gateway`\\ s share a SQLite file, where
nothing is announced: each test drives the reconcile by hand, the path that
is the safety net on PostgreSQL (whose notifications take the same path, for
fewer grants). Nothing is relayed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from gateway.access.grants import Grant
from gateway.access.ports import SessionRecord
from gateway.app.gateway import Gateway
from gateway.config import GatewaySettings
from gateway.credentials import pki
from gateway.credentials.secretbox import SecretBox
from gateway.errors import InvalidRequest
from gateway.identity.principals import ALL_PROJECTS, DEFAULT_PROJECT, PrincipalKind, Role
from gateway.store import Store
from gateway.store.changes import Change, ChangeTopic

KEY = b"k" * 32
Pair = tuple[Gateway, Gateway]


def _gateway(
    path: Path, gateway_id: str, ca: pki.GatewayPki | None = None, **settings: float
) -> Gateway:
    store = Store.open(f"sqlite:///{path}", SecretBox(KEY))
    gateway_settings = GatewaySettings(
        api_token_sha256="0" * 64,
        audit_enabled=False,
        max_grant_seconds=3600,
        gateway_id=gateway_id,
        # The tests reconcile by hand.
        changes_reconcile_seconds=3600,
        **settings,
    )
    return Gateway(store, gateway_settings, pki=ca)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    async for made in _pair(tmp_path):
        yield made


#: the CLI of a grant held by a gateway that is not told (no reconcile) is
#: silent for this long before that gateway's watchdog looks at the grant
HEARTBEAT_TIMEOUT = 1.0


@pytest.fixture
async def fleet_pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """Two gateways sharing a CA (a fleet): a tunnel grant can move between them."""
    ca = pki.ensure_pki(tmp_path / "home", SecretBox(KEY), ())
    async for made in _pair(tmp_path, ca, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT):
        yield made


async def _pair(
    tmp_path: Path, ca: pki.GatewayPki | None = None, **settings: float
) -> AsyncIterator[Pair]:
    path = tmp_path / "pam.db"
    with Store.open(f"sqlite:///{path}", SecretBox(KEY)) as store:
        store.add_resource("db1", "127.0.0.1", 5432, "app")
        store.add_account("db1", "ro", "reader", "pw-first")
        store.add_principal("alice", kind=PrincipalKind.USER, roles={DEFAULT_PROJECT: Role.MEMBER})
        store.add_principal("admin", kind=PrincipalKind.USER, roles={ALL_PROJECTS: Role.ADMIN})
    a, b = _gateway(path, "gw-a", ca, **settings), _gateway(path, "gw-b", ca, **settings)
    await a.start()
    await b.start()
    yield a, b
    for gateway in (a, b):
        await gateway.shutdown()
        gateway.store.close()


async def _open_on(gateway: Gateway, *, csr: str | None = None) -> SessionRecord:
    alice = gateway.store.get_principal("alice")
    return await gateway.grants.open_access(
        requester="alice",
        resource="db1",
        account="ro",
        duration_seconds=1800,
        request={"principal_id": alice.id},
        csr=csr,
    )


async def _held_on(gateway: Gateway) -> tuple[SessionRecord, Grant]:
    """A grant opened on *gateway*: its session, and the grant *gateway* holds."""
    session = await _open_on(gateway)
    return session, gateway.grants._grants[session.id]


async def _open_tunnel_on(gateway: Gateway) -> SessionRecord:
    """A tunnel grant (its CLI's key sent as a CSR) opened on *gateway*."""
    return await _open_on(gateway, csr=pki.csr_for(pki.new_key()))


def _moved_to(holder: str, session: SessionRecord) -> str:
    return (
        f"terminating connection because access session {session.id[:8]} moved to gateway {holder}"
    )


async def test_a_grant_taken_over_by_a_heartbeat_elsewhere_is_let_go_at_the_reconcile(
    fleet_pair: Pair,
) -> None:
    a, b = fleet_pair
    ended: list[SessionRecord] = []
    a.grants.on_ended = ended.append
    session = await _open_tunnel_on(a)
    grant = a.grants._grants[session.id]

    # Its CLI failed over to B: B takes it over, certificate and all.
    assert (await b.grants.heartbeat(session.id)).holder_id == "gw-b"
    assert b.grants.live_ids() == [session.id]
    assert b.grants._grants[session.id].public_key == grant.public_key
    assert grant.listener.refusal is None  # A has not looked yet

    await a.changes.reconcile()
    refusal = grant.listener.refusal
    assert refusal is not None and refusal.sqlstate == "57P01"
    assert refusal.message == _moved_to("gw-b", session)
    assert a.grants.live_ids() == [] and session.id not in a.grants._grants
    # Let go, not ended: the session goes on at B, and A told nobody of an end.
    assert a.store.get_session(session.id).ended_at is None
    assert ended == []
    assert b.grants.live_ids() == [session.id]


async def test_a_silent_grant_taken_over_elsewhere_is_let_go_by_the_watchdog_not_ended(
    fleet_pair: Pair,
) -> None:
    """A has not heard of the take-over (no notification, no reconcile) when its
    watchdog finds the grant's CLI silent: it reads the store and lets go,
    rather than ending a session that goes on at B."""
    a, b = fleet_pair
    session = await _open_tunnel_on(a)
    grant = a.grants._grants[session.id]
    await b.grants.heartbeat(session.id)

    async def let_go() -> None:
        while session.id in a.grants._grants:
            await b.grants.heartbeat(session.id)  # the CLI calls in at B
            await asyncio.sleep(0.05)

    await asyncio.wait_for(let_go(), timeout=HEARTBEAT_TIMEOUT + 5)
    refusal = grant.listener.refusal
    assert refusal is not None and refusal.message == _moved_to("gw-b", session)
    stored = a.store.get_session(session.id)
    assert (stored.ended_at, stored.holder_id) == (None, "gw-b")
    assert b.grants.live_ids() == [session.id]


def _valid_until(certificate: bytes | None) -> datetime:
    assert certificate is not None
    return x509.load_pem_x509_certificate(certificate).not_valid_after_utc


async def test_a_tunnel_grants_certificate_follows_each_extension_for_the_same_key(
    fleet_pair: Pair,
) -> None:
    """Extended here or through the other gateway, the grant's certificate is
    re-issued for its stored client key, valid until the new expiry."""
    a, b = fleet_pair
    session = await _open_tunnel_on(a)
    grant = a.grants._grants[session.id]
    key = grant.public_key
    assert key is not None and pki.public_key_of(grant.certificate or b"") == key

    here = await a.grants.extend(session.id, by_seconds=60, by="alice")
    assert _valid_until(grant.certificate) == here.expires_at.replace(microsecond=0)
    elsewhere = await b.grants.extend(session.id, by_seconds=60, by="alice")
    await a.changes.reconcile()
    assert _valid_until(grant.certificate) == elsewhere.expires_at.replace(microsecond=0)
    assert pki.public_key_of(grant.certificate or b"") == key == grant.public_key


async def test_a_grant_handed_over_at_shutdown_is_built_by_the_heir_at_its_reconcile(
    fleet_pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = fleet_pair
    for gateway in (a, b):  # as the daemon does at its start
        gateway.store.register_gateway(gateway.settings.gateway_id, "https://gw.example")
    session = await _open_tunnel_on(a)
    local = await _open_on(a)
    key = a.grants._grants[session.id].public_key

    await a.grants.shutdown()  # a rolling restart: A stops first
    handed = b.store.get_session(session.id)
    assert (handed.ended_at, handed.holder_id) == (None, "gw-b")
    assert b.store.get_session(local.id).end_reason == "gateway_shutdown"  # its door was A's

    await b.changes.reconcile()
    assert b.grants.live_ids() == [session.id]
    assert b.grants._grants[session.id].public_key == key
    # Once built, a reconcile reads back only what it holds, not the grant again
    # as one to build.
    read: list[list[str]] = []
    states = b.store.grant_states
    monkeypatch.setattr(b.store, "grant_states", lambda ids: read.append(list(ids)) or states(ids))
    await b.changes.reconcile()
    assert read == [[session.id]]
    assert b.grants.live_ids() == [session.id]


async def test_a_revoke_through_the_other_gateway_cuts_the_grant_where_it_is_held(
    pair: Pair,
) -> None:
    a, b = pair
    session, grant = await _held_on(a)

    revoked = await b.grants.revoke(session.id, by="admin", reason="incident 7")

    assert revoked.end_reason == "revoked" and revoked.end_detail == "revoked by admin: incident 7"
    assert grant.listener.refusal is None  # A has not looked yet
    await a.changes.reconcile()
    refusal = grant.listener.refusal
    assert refusal is not None and refusal.sqlstate == "57P01"
    assert refusal.message == (
        f"terminating connection because access session {session.id[:8]}"
        " was revoked by admin: incident 7"
    )
    assert grant.is_ended and grant.session.end_reason == "revoked"
    assert grant.expiry_task is not None
    await asyncio.sleep(0)
    assert grant.expiry_task.cancelled()
    # Recorded once, by B: A wrote nothing, and a second look changes nothing.
    assert a.store.get_session(session.id).end_detail == "revoked by admin: incident 7"
    await a.changes.reconcile()
    assert a.grants.live_ids() == []
    # The CLI holding the grant on A learns of the end from its heartbeat.
    assert (await a.grants.heartbeat(session.id)).end_reason == "revoked"


async def test_a_grant_ended_already_is_not_revoked_through_the_other_gateway(
    pair: Pair,
) -> None:
    a, b = pair
    session = await _open_on(a)
    await a.grants.close_access(session.id)

    with pytest.raises(InvalidRequest) as refused:
        await b.grants.revoke(session.id, by="admin", reason=None)
    assert refused.value.message == (
        f"access session {session.id[:8]} is not live (it ended: client_ended)"
    )


async def test_an_extension_through_the_other_gateway_moves_the_held_grants_timer(
    pair: Pair,
) -> None:
    a, b = pair
    session, grant = await _held_on(a)
    timer = grant.expiry_task

    assert (await b.grants.live_session(session.id)).id == session.id
    extended = await b.grants.extend(session.id, by_seconds=600, by="alice")
    assert extended.expires_at == session.expires_at + timedelta(minutes=10)

    await a.changes.reconcile()
    assert grant.session.expires_at == extended.expires_at
    assert grant.listener.grant.expires_at == extended.expires_at
    await asyncio.sleep(0)
    assert timer is not None and timer.cancelled()
    assert grant.expiry_task is not None and not grant.expiry_task.done()
    assert a.store.verify_audit(session.id) == []


async def test_an_extension_elsewhere_is_held_to_the_gateways_maximum(pair: Pair) -> None:
    a, b = pair
    session = await _open_on(a)
    with pytest.raises(InvalidRequest, match="at most 1h on this gateway"):
        await b.grants.extend(session.id, by_seconds=3600, by="alice")
    assert a.store.get_session(session.id).expires_at == session.expires_at


async def test_a_user_disabled_through_the_other_gateway_loses_its_grants_there(
    pair: Pair,
) -> None:
    a, b = pair
    session, grant = await _held_on(a)

    await b.identity.disable("alice")
    await a.changes.changed(Change(ChangeTopic.PRINCIPAL, session.principal_id or ""))

    refusal = grant.listener.refusal
    assert refusal is not None
    assert refusal.message == (
        f"terminating connection because access session {session.id[:8]}"
        " was ended: user alice was disabled"
    )
    stored = a.store.get_session(session.id)
    assert (stored.end_reason, stored.end_detail) == ("revoked", "user alice was disabled")


async def test_a_notification_of_a_grant_held_elsewhere_reads_nothing(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    session = await _open_on(b)
    read: list[object] = []
    monkeypatch.setattr(a.store, "grant_states", lambda ids: read.append(ids) or {})
    await a.changes.changed(Change(ChangeTopic.SESSION, session.id))
    assert read == []
    assert a.grants.live_ids() == [] and b.grants.live_ids() == [session.id]


async def test_a_password_rotated_through_the_other_gateway_is_masked_and_used_there(
    pair: Pair,
) -> None:
    a, b = pair
    before = await a.credentials.upstream_target("db1", "ro")
    assert before.password == "pw-first"

    b.store.rotate_password("db1", "ro", "pw-second")
    await b.refresh_secrets()
    # B's own announcement is not for B (on SQLite there is none to hear anyway).
    await a.changes.reconcile()

    assert "pw-second" in a.credentials.stored_secrets
    assert (await a.credentials.upstream_target("db1", "ro")).password == "pw-second"

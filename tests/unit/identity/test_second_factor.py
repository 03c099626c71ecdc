"""Tests of gateway.identity.second_factor and gateway.store.mfa: enrolment, the
code checks, sign-in with a code and project settings, on a real SQLite file and
a real PostgreSQL (``store_url``), with the service's clock injected.

Codes are computed with cryptography's TOTP from the secret the enrolment
returned, as an authenticator app would.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP
from sqlalchemy import select

from gateway.credentials.secretbox import SecretBox, SecretDecryptError
from gateway.errors import Forbidden, InvalidRequest, Unauthenticated
from gateway.identity.mfa import (
    MAX_FAILED_CODES,
    CodeState,
    MfaAction,
    MfaNotEnrolled,
    MfaRefused,
    MfaRequired,
    Verdict,
    check_code,
)
from gateway.identity.principals import Principal, PrincipalKind, Role
from gateway.identity.second_factor import MfaService
from gateway.identity.service import IdentityService, LoginThrottle
from gateway.store import Store
from gateway.store.schema import mfa_factors

T = TypeVar("T")
PASSWORD = "correct horse battery"
T0 = 1_700_000_015.0


async def direct(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def store(store_url: str, key: bytes) -> Iterator[Store]:
    with Store.open(store_url, SecretBox(key)) as opened:
        yield opened


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def mfa(store: Store, clock: Clock) -> MfaService:
    return MfaService(store, direct, gateway_id="gw1", clock=clock)


def user(store: Store, name: str, role: Role = Role.MEMBER, project: str = "default") -> Principal:
    info = store.add_principal(
        name,
        kind=PrincipalKind.USER,
        roles={project: role},
        password_hash=None,
    )
    return Principal(id=info.id, name=name, kind=PrincipalKind.USER, roles={project: role})


def app(secret: str) -> Callable[[float], str]:
    """The authenticator app holding *secret*: its code at a time."""
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    totp = TOTP(key, 6, SHA1(), 30)  # noqa: S303 (RFC 6238's HMAC, as the apps)
    return lambda at: totp.generate(at).decode()


async def enrolled(mfa: MfaService, who: Principal, clock: Clock) -> Callable[[float], str]:
    enrolment = await mfa.enroll(who)
    code = app(enrolment.secret)
    await mfa.confirm(who, code(clock.now))
    return code


@pytest.mark.asyncio
async def test_enrolment_is_pending_until_its_first_code(
    mfa: MfaService, store: Store, clock: Clock
) -> None:
    ann = user(store, "ann")
    enrolment = await mfa.enroll(ann)
    assert enrolment.account == "ann@gw1" and enrolment.issuer == "pam"
    assert enrolment.uri.startswith("otpauth://totp/pam:ann%40gw1?")
    assert f"secret={enrolment.secret}" in enrolment.uri
    status = await mfa.status(ann.id)
    assert (status.enabled, status.pending) == (False, True)
    # Pending is not on: nothing asks for it yet.
    with pytest.raises(MfaNotEnrolled, match="has none"):
        await mfa.check_second_factor(ann, "123456", purpose="grant")
    with pytest.raises(MfaRefused, match="wrong second-factor code"):
        await mfa.confirm(ann, "000000" if app(enrolment.secret)(clock.now) != "000000" else "1")
    assert (await mfa.status(ann.id)).enabled is False
    status = await mfa.confirm(ann, app(enrolment.secret)(clock.now))
    assert (status.enabled, status.pending) == (True, False)
    assert store.get_principal("ann").mfa_enabled is True


@pytest.mark.asyncio
async def test_a_confirm_without_an_enrolment_is_refused(mfa: MfaService, store: Store) -> None:
    with pytest.raises(InvalidRequest, match="no enrolment is waiting"):
        await mfa.confirm(user(store, "bea"), "123456")


@pytest.mark.asyncio
async def test_machines_do_not_enrol(mfa: MfaService, store: Store) -> None:
    info = store.add_principal("bot", kind=PrincipalKind.MACHINE, roles={"default": Role.MEMBER})
    bot = Principal(id=info.id, name="bot", kind=PrincipalKind.MACHINE)
    with pytest.raises(Forbidden, match="machine principal"):
        await mfa.enroll(bot)
    with pytest.raises(MfaNotEnrolled, match="bot is a machine principal"):
        await mfa.check_second_factor(bot, "123456", purpose="grant")


@pytest.mark.asyncio
async def test_the_check_needs_a_code_accepts_it_once_and_refuses_the_replay(
    mfa: MfaService, store: Store, clock: Clock
) -> None:
    cid = user(store, "cid")
    code = await enrolled(mfa, cid, clock)
    clock.now += 30
    with pytest.raises(MfaRequired, match="this access needs a second-factor code") as needed:
        await mfa.check_second_factor(cid, None, purpose="grant")
    assert needed.value.code == "mfa_required"
    await mfa.check_second_factor(cid, code(clock.now), purpose="grant")
    with pytest.raises(MfaRefused, match="already used") as replay:
        await mfa.check_second_factor(cid, code(clock.now), purpose="approval")
    assert replay.value.code == "mfa_replayed"
    # The enrolment's own first code cannot be used again either.
    with pytest.raises(MfaRefused, match="already used"):
        await mfa.check_second_factor(cid, code(clock.now - 30), purpose="grant")


@pytest.mark.asyncio
async def test_wrong_codes_are_counted_in_the_store_and_pause_the_principal(
    mfa: MfaService, store: Store, clock: Clock
) -> None:
    dan = user(store, "dan")
    code = await enrolled(mfa, dan, clock)
    clock.now += 30
    wrong = "000000" if code(clock.now) != "000000" else "111111"
    for _ in range(MAX_FAILED_CODES):
        with pytest.raises(MfaRefused, match="wrong"):
            await mfa.check_second_factor(dan, wrong, purpose="grant")
    # Another service on the same store (another gateway) sees the pause.
    other = MfaService(store, direct, gateway_id="gw2", clock=clock)
    with pytest.raises(MfaRefused, match="too many wrong") as paused:
        await other.check_second_factor(dan, code(clock.now), purpose="grant")
    assert paused.value.code == "mfa_throttled"
    assert paused.value.hint == "try again in 300 s"
    clock.now += 301
    await mfa.check_second_factor(dan, code(clock.now), purpose="grant")


@pytest.mark.asyncio
async def test_replacing_a_factor_needs_a_current_code_and_the_new_one_starts_fresh(
    mfa: MfaService, store: Store, clock: Clock
) -> None:
    eve = user(store, "eve")
    old = await enrolled(mfa, eve, clock)
    clock.now += 30
    with pytest.raises(MfaRequired):
        await mfa.enroll(eve)
    enrolment = await mfa.enroll(eve, old(clock.now))
    # Until confirmed the old factor still counts.
    assert (await mfa.status(eve.id)).enabled
    new = app(enrolment.secret)
    # The first code of the new secret, in the very step the old code was
    # used, is not a "replay": the old secret's steps say nothing about it.
    await mfa.confirm(eve, new(clock.now))
    clock.now += 30
    with pytest.raises(MfaRefused, match="wrong"):
        await mfa.check_second_factor(eve, old(clock.now), purpose="grant")
    await mfa.check_second_factor(eve, new(clock.now), purpose="grant")


@pytest.mark.asyncio
async def test_disable_needs_a_code_and_reset_needs_an_admin_of_every_project(
    mfa: MfaService, store: Store, clock: Clock
) -> None:
    fay = user(store, "fay")
    code = await enrolled(mfa, fay, clock)
    clock.now += 30
    with pytest.raises(MfaRequired):
        await mfa.disable(fay, None)
    status = await mfa.disable(fay, code(clock.now))
    assert status.enabled is False
    with pytest.raises(InvalidRequest, match="no second factor"):
        await mfa.disable(fay, code(clock.now))

    code = await enrolled(mfa, fay, clock)
    project_admin = user(store, "pa", Role.ADMIN, "default")
    with pytest.raises(Forbidden, match="not an administrator of every project"):
        await mfa.reset("fay", by=project_admin)
    root = user(store, "root", Role.ADMIN, "*")
    status = await mfa.reset("fay", by=root)
    assert (status.enabled, status.reset_by) == (False, "root")
    assert status.reset_at is not None
    assert (await mfa.status(fay.id)).reset_by == "root"


@pytest.mark.asyncio
async def test_the_secret_is_sealed_at_rest_and_bound_to_its_user(
    mfa: MfaService, store: Store, clock: Clock, store_url: str, key: bytes
) -> None:
    gil = user(store, "gil")
    hal = user(store, "hal")
    enrolment = await mfa.enroll(gil)
    await mfa.confirm(gil, app(enrolment.secret)(clock.now))
    raw = base64.b32decode(enrolment.secret)
    with store._transaction(write=False) as conn:
        row = conn.execute(select(mfa_factors).where(mfa_factors.c.principal_id == gil.id)).one()
    sealed = bytes(row.secret_ciphertext)
    assert raw not in sealed and enrolment.secret.encode() not in sealed
    if store_url.startswith("sqlite:///"):
        for path in Path(store_url.removeprefix("sqlite:///")).parent.glob("state.db*"):
            data = path.read_bytes()
            assert raw not in data and enrolment.secret.encode() not in data
    # The blob copied onto another user's row does not open.
    with store._transaction(write=True) as conn:
        conn.execute(mfa_factors.insert().values(principal_id=hal.id, updated_at=row.updated_at))
        conn.execute(
            mfa_factors.update()
            .where(mfa_factors.c.principal_id == hal.id)
            .values(secret_ciphertext=sealed)
        )
    with pytest.raises(SecretDecryptError, match="second-factor secret"):
        await mfa.check_second_factor(hal, "123456", purpose="grant")


def test_two_gateways_on_one_store_cannot_both_accept_one_code(store_url: str, key: bytes) -> None:
    """Two stores (two gateways) check one code at once: the row lock makes the
    second wait for the first's outcome, so it sees the replay."""
    with Store.open(store_url, SecretBox(key)) as one, Store.open(store_url, SecretBox(key)) as two:
        info = one.add_principal("ivy", kind=PrincipalKind.USER, roles={"default": Role.MEMBER})
        secret = secrets.token_bytes(20)
        one.begin_mfa_enrolment(info.id, secret)
        totp = TOTP(secret, 6, SHA1(), 30)  # noqa: S303
        first = totp.generate(T0).decode()
        assert one.use_mfa_code(
            info.id, lambda s, st: check_code(s, first, st, now=T0), action=MfaAction.CONFIRM
        )
        code = totp.generate(T0 + 30).decode()
        # Both deciders meet here if both transactions are inside at once (no
        # lock): then both would accept. With the lock only one is ever inside,
        # and the bounded wait simply runs out.
        inside = threading.Barrier(2, timeout=2)
        verdicts: list[Verdict | None] = []

        def decide(secret: bytes, state: CodeState) -> Verdict:
            with contextlib.suppress(threading.BrokenBarrierError):
                inside.wait()
            return check_code(secret, code, state, now=T0 + 30)

        def use(store: Store) -> None:
            verdicts.append(store.use_mfa_code(info.id, decide, action=MfaAction.VERIFY))

        threads = [threading.Thread(target=use, args=(s,)) for s in (one, two)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        outcomes = sorted(str(v.outcome) for v in verdicts if v is not None)
        assert outcomes == ["accepted", "replayed"]


@pytest.mark.asyncio
async def test_sign_in_asks_for_the_code_after_the_right_password(
    store: Store, mfa: MfaService, clock: Clock
) -> None:
    identity = IdentityService(store, direct, session_ttl=timedelta(hours=1), mfa=mfa)
    identity.throttle = LoginThrottle(limit=3, address_limit=10, window=60, clock=clock)
    info = await identity.add_user("jo", role=Role.MEMBER, password=PASSWORD)
    jo = Principal(id=info.id, name="jo", kind=PrincipalKind.USER)
    # Without a factor, no code is asked.
    assert (await identity.login("jo", PASSWORD)).principal == "jo"
    code = await enrolled(mfa, jo, clock)
    clock.now += 30
    # The right password and no code: asked for one, not counted as a failure.
    for _ in range(5):
        with pytest.raises(MfaRequired, match="signing in needs a second-factor code"):
            await identity.login("jo", PASSWORD)
    # A wrong password never reaches the code (and never uses one up).
    with pytest.raises(Unauthenticated, match="wrong user name or password"):
        await identity.login("jo", "guess", otp=code(clock.now))
    # A wrong code is a failed sign-in too, and so is a used one (the
    # enrolment's first code).
    with pytest.raises(MfaRefused, match="wrong second-factor code"):
        await identity.login("jo", PASSWORD, otp="000000" if code(clock.now) != "000000" else "1")
    with pytest.raises(MfaRefused, match="already used"):
        await identity.login("jo", PASSWORD, otp=code(clock.now - 30))
    # Three failed sign-ins: paused, the right password and code not checked.
    with pytest.raises(Unauthenticated, match="too many failed sign-ins"):
        await identity.login("jo", PASSWORD, otp=code(clock.now))
    clock.now += 61
    issued = await identity.login("jo", PASSWORD, otp=code(clock.now))
    assert issued.principal == "jo"
    with pytest.raises(MfaRefused, match="already used"):
        await identity.login("jo", PASSWORD, otp=code(clock.now))


@pytest.mark.asyncio
async def test_project_settings_default_to_no_mfa_and_round_trip(mfa: MfaService) -> None:
    assert await mfa.approval_needs_mfa("payments") is False
    settings = await mfa.set_project_settings("payments", approval_mfa=True, by="root")
    assert (settings.project, settings.approval_mfa, settings.updated_by) == (
        "payments",
        True,
        "root",
    )
    assert settings.updated_at is not None
    assert await mfa.approval_needs_mfa("payments") is True
    assert await mfa.approval_needs_mfa("other") is False
    await mfa.set_project_settings("payments", approval_mfa=False, by="root")
    assert await mfa.approval_needs_mfa("payments") is False
    with pytest.raises(InvalidRequest, match="invalid project name"):
        await mfa.set_project_settings("*", approval_mfa=True, by="root")


@pytest.mark.asyncio
async def test_removing_a_user_removes_their_second_factor(
    mfa: MfaService, store: Store, clock: Clock
) -> None:
    kim = user(store, "kim")
    await enrolled(mfa, kim, clock)
    assert store.remove_principal("kim") is True
    with store._transaction(write=False) as conn:
        assert conn.execute(select(mfa_factors)).all() == []

"""Tests of gateway.identity.service: sign-in throttling and the last admin, on a
real SQLite store (the store's own thread is replaced by a direct call)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.credentials.secretbox import SecretBox
from gateway.errors import Forbidden, Unauthenticated
from gateway.identity.principals import ALL_PROJECTS, Role
from gateway.identity.service import IdentityService, LoginThrottle
from gateway.store import Store

T = TypeVar("T")
PASSWORD = "correct horse battery"


async def direct(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[IdentityService]:
    with Store.open(
        f"sqlite:///{tmp_path / 'state.db'}", SecretBox(secrets.token_bytes(32))
    ) as store:
        yield IdentityService(store, direct, session_ttl=timedelta(hours=1))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.asyncio
async def test_guessing_one_users_password_is_paused_then_allowed_again(
    service: IdentityService,
) -> None:
    clock = Clock()
    service.throttle = LoginThrottle(limit=3, address_limit=10, window=60, clock=clock)
    await service.add_user("alice", role=Role.MEMBER, password=PASSWORD)
    for _ in range(3):
        with pytest.raises(Unauthenticated, match="wrong user name or password"):
            await service.login("alice", "guess", source="10.0.0.9")
    # Paused: even the right password is not checked, from any address.
    with pytest.raises(Unauthenticated, match="too many failed sign-ins") as refused:
        await service.login("alice", PASSWORD, source="10.0.0.10")
    assert refused.value.hint == "try again in 60 s"
    clock.now += 61
    issued = await service.login("alice", PASSWORD, source="10.0.0.10")
    assert issued.principal == "alice"


@pytest.mark.asyncio
async def test_one_address_spraying_names_is_paused(service: IdentityService) -> None:
    clock = Clock()
    service.throttle = LoginThrottle(limit=5, address_limit=3, window=60, clock=clock)
    await service.add_user("bob", role=Role.MEMBER, password=PASSWORD)
    for name in ("a1", "a2", "a3"):
        with pytest.raises(Unauthenticated, match="wrong user name"):
            await service.login(name, "guess", source="10.0.0.9")
    with pytest.raises(Unauthenticated, match="too many failed sign-ins"):
        await service.login("bob", PASSWORD, source="10.0.0.9")
    # Another address signs bob in.
    assert (await service.login("bob", PASSWORD, source="10.0.0.8")).principal == "bob"


@pytest.mark.asyncio
async def test_a_success_clears_the_names_failures(service: IdentityService) -> None:
    service.throttle = LoginThrottle(limit=3, address_limit=10, window=60, clock=Clock())
    await service.add_user("carol", role=Role.MEMBER, password=PASSWORD)
    for source in ("10.0.0.1", "10.0.0.2"):
        with pytest.raises(Unauthenticated):
            await service.login("carol", "guess", source=source)
    await service.login("carol", PASSWORD, source="10.0.0.3")
    for source in ("10.0.0.4", "10.0.0.5"):
        with pytest.raises(Unauthenticated, match="wrong user name"):
            await service.login("carol", "guess", source=source)
    assert (await service.login("carol", PASSWORD, source="10.0.0.6")).principal == "carol"


@pytest.mark.asyncio
async def test_the_last_admin_of_every_project_stays(service: IdentityService) -> None:
    await service.add_user("root", role=Role.ADMIN, project=ALL_PROJECTS)
    await service.add_user("analyst", role=Role.ADMIN, project="analytics")
    for act in (service.disable, service.remove):
        with pytest.raises(Forbidden, match="root is the last enabled admin of every project"):
            await act("root")
    # A second global admin makes the first one removable, and not the other way round.
    await service.add_user("ops", role=Role.ADMIN, project=ALL_PROJECTS)
    await service.disable("root")
    with pytest.raises(Forbidden, match="ops is the last enabled admin"):
        await service.disable("ops")
    # A project admin is never the last global admin.
    await service.disable("analyst")


@pytest.mark.asyncio
async def test_an_unknown_name_costs_the_same_verification_as_a_wrong_password(
    service: IdentityService, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.identity import service as service_module

    calls: list[str | None] = []
    real = service_module.verify_password

    def counted(stored: str | None, password: str) -> bool:
        calls.append(stored)
        return real(stored, password)

    monkeypatch.setattr(service_module, "verify_password", counted)
    await service.add_user("dora", role=Role.MEMBER, password=PASSWORD)
    for name in ("dora", "nobody"):
        with pytest.raises(Unauthenticated, match="wrong user name or password"):
            await service.login(name, "guess", source="10.0.0.1")
    # One argon2 verification each: against dora's hash, and against the dummy.
    assert len(calls) == 2 and calls[0] is not None and calls[1] is None


@pytest.mark.asyncio
async def test_a_short_password_is_refused_wherever_it_is_set(service: IdentityService) -> None:
    from gateway.errors import InvalidRequest
    from gateway.identity.hashing import hash_password

    with pytest.raises(InvalidRequest, match="at least 8 characters"):
        await service.add_user("eve", role=Role.MEMBER, password="short")
    # gateway init hashes through the same function.
    with pytest.raises(InvalidRequest, match="at least 8 characters"):
        hash_password("1234567")


@pytest.mark.asyncio
async def test_signing_out_ends_a_session_token_not_a_local_or_machine_one(
    service: IdentityService,
) -> None:
    from gateway.identity.hashing import new_token, token_digest

    root = await service.add_user("root", role=Role.ADMIN, project=ALL_PROJECTS, password=PASSWORD)
    store = service._store
    local = new_token()
    store.add_token(root.id, kind="local", digest=token_digest(local), expires_at=None)
    machine = await service.create_machine_token(
        "ci", role=Role.MEMBER, project="default", ttl=timedelta(days=1)
    )
    session = await service.login("root", PASSWORD, source="10.0.0.1")
    for token in (local, machine.token, session.token):
        await service.logout(token)
    assert (await service.authenticate(local, loopback=True)).name == "root"
    assert (await service.authenticate(machine.token, loopback=False)).name == "ci"
    with pytest.raises(Unauthenticated):
        await service.authenticate(session.token, loopback=False)

"""The credentials in use: a looked-up target is reused until a refresh drops it,
the masking list holds every stored password it can decrypt, and SCRAM caches
are per credential. The store is a stand-in that counts its reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.credentials.targets import Credentials
from gateway.errors import ConfigError
from gateway.net.upstream import SslMode

T = TypeVar("T")


@dataclass
class Resource:
    name: str
    host: str = "db.example"
    port: int = 5432
    database: str = "app"
    ssl_mode: SslMode = "verify-full"
    ca_cert: str | None = None


@dataclass
class Account:
    resource_name: str
    name: str
    username: str


class Store:
    def __init__(self) -> None:
        self.passwords = {("db1", "ro"): "pw-ro", ("db1", "rw"): "pw-rw"}
        self.pending: dict[tuple[str, str], str] = {}
        self.reads = 0

    def get_resource(self, name: str) -> Resource:
        self.reads += 1
        return Resource(name)

    def get_account(self, resource: str, name: str) -> Account:
        return Account(resource, name, f"user_{name}")

    def list_accounts(self, resource: str | None = None) -> list[Account]:
        return [Account(r, a, f"user_{a}") for r, a in self.passwords] + [
            Account("db1", "broken", "user_broken")
        ]

    def reveal_password(self, resource: str, name: str) -> str:
        if (resource, name) not in self.passwords:
            raise ConfigError("the stored password does not decrypt")
        return self.passwords[(resource, name)]

    def reveal_pending_password(self, resource: str, name: str) -> str | None:
        return self.pending.get((resource, name))


async def inline(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


async def test_a_target_is_reused_until_a_refresh_drops_it() -> None:
    store = Store()
    credentials = Credentials(store, inline)
    first = await credentials.upstream_target("db1", "ro")
    assert (first.username, first.password, first.address) == (
        "user_ro",
        "pw-ro",
        "db.example:5432",
    )
    assert await credentials.upstream_target("db1", "ro") is first
    assert store.reads == 1

    store.passwords[("db1", "ro")] = "rotated"
    await credentials.refresh()
    again = await credentials.upstream_target("db1", "ro")
    assert again.password == "rotated" and store.reads == 2


async def test_refresh_loads_every_stored_password_it_can_decrypt() -> None:
    credentials = Credentials(Store(), inline)
    assert credentials.stored_secrets == ()
    await credentials.refresh()
    assert sorted(credentials.stored_secrets) == ["pw-ro", "pw-rw"]


async def test_scram_caches_are_per_credential() -> None:
    store = Store()
    credentials = Credentials(store, inline)
    target = await credentials.upstream_target("db1", "ro")
    cache = credentials.scram_cache(target)
    cache[(b"salt", 4096)] = b"salted"
    assert credentials.scram_cache(target) is cache
    store.passwords[("db1", "ro")] = "rotated"
    await credentials.refresh()
    rotated = await credentials.upstream_target("db1", "ro")
    assert credentials.scram_cache(rotated) == {}


async def test_refresh_masks_the_new_password_of_a_rotation_in_flight() -> None:
    store = Store()
    store.pending[("db1", "ro")] = "pw-ro-next"
    credentials = Credentials(store, inline)
    await credentials.refresh()
    assert sorted(credentials.stored_secrets) == ["pw-ro", "pw-ro-next", "pw-rw"]


async def test_a_refused_password_is_retried_with_the_stored_one_when_it_changed() -> None:
    store = Store()
    credentials = Credentials(store, inline)
    stale = await credentials.upstream_target("db1", "ro")
    store.passwords[("db1", "ro")] = "rotated"
    retry = await credentials.retry_target(stale)
    assert retry is not None and retry.password == "rotated"
    # The fresh one is what new connections get from now on.
    assert await credentials.upstream_target("db1", "ro") is retry


async def test_a_refused_password_is_retried_with_a_rotation_in_flight() -> None:
    store = Store()
    credentials = Credentials(store, inline)
    target = await credentials.upstream_target("db1", "ro")
    assert await credentials.retry_target(target) is None
    store.pending[("db1", "ro")] = "pw-ro-next"
    retry = await credentials.retry_target(target)
    assert retry is not None
    assert (retry.password, retry.username, retry.address) == (
        "pw-ro-next",
        target.username,
        target.address,
    )
    # A pending password is tried, never cached as the stored one.
    assert (await credentials.upstream_target("db1", "ro")).password == "pw-ro"

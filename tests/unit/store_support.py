"""Shared by the store tests: a controllable clock, the store-URL fixture
that runs each test on SQLite and on a fresh schema of a real PostgreSQL, and
a store holding one resource and account to open sessions on.

The PostgreSQL is the one named by ``PAM_TEST_PG_STORE_URL`` when that is set
(a superuser URL: each test creates and drops its own schema), and otherwise a
throwaway 15 cluster that the first such test starts (TLS, scram-sha-256) and
the session stops."""

from __future__ import annotations

import contextlib
import os
import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

import gateway.store
from gateway.credentials.schedule import presence_lease
from gateway.credentials.secretbox import SecretBox
from gateway.store import Store
from gateway.store.models import AccessSession
from gateway.testing.pgcluster import PostgresNotInstalled, TempCluster

PG_URL = os.environ.get("PAM_TEST_PG_STORE_URL")
T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def pg_admin_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_store_server() -> Iterator[str]:
    """A superuser URL of the PostgreSQL the store tests use."""
    if PG_URL is not None:
        yield PG_URL
        return
    cluster = TempCluster()
    try:
        cluster.start()
    except PostgresNotInstalled as exc:
        pytest.fail(f"store tests need a PostgreSQL server: {exc}", pytrace=False)
    try:
        yield cluster.superuser_dsn()
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    server: str = request.getfixturevalue("pg_store_server")
    admin = create_engine(pg_admin_url(server))
    schema = "pam_test_" + uuid.uuid4().hex[:12]
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(pg_admin_url(server)).update_query_dict(
            {"options": f"-csearch_path={schema}"}
        )
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


def newest_revision() -> str:
    """The id of the newest schema migration (what a store opened now is at)."""
    versions = Path(gateway.store.__file__).parent / "migrations" / "versions"
    return max(path.name.partition("_")[0] for path in versions.glob("0*.py"))


@contextlib.contextmanager
def store_with_db1(url: str, key: bytes, clock: FakeClock) -> Iterator[Store]:
    """The store at *url* (sealed with *key*, on *clock*) with one resource,
    ``db1``, and its account ``ro``."""
    with Store.open(url, SecretBox(key), clock=clock) as opened:
        opened.add_resource("db1", "db.example.com", 5432, "app")
        opened.add_account("db1", "ro", "app_reader", "pw-" + secrets.token_hex(8))
        yield opened


def open_session(
    store: Store, gateway_id: str | None, *, client_public_key: str | None = None
) -> AccessSession:
    """alice's session on ``db1``/``ro`` for an hour from T0, held by *gateway_id*
    (a tunnel grant's with *client_public_key*)."""
    return store.create_session(
        requester="alice",
        resource="db1",
        account="ro",
        listen_host="127.0.0.1",
        expires_at=T0 + timedelta(hours=1),
        gateway_id=gateway_id,
        client_public_key=client_public_key,
    )


@pytest.fixture(name="store")
def db1_store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    """``store``: one holding ``db1``/``ro`` on each backend, under a fresh key
    (import it into a test module to use it)."""
    with store_with_db1(store_url, secrets.token_bytes(32), clock) as opened:
        yield opened


#: how long the store tests' presence leases last
PRESENCE_LEASE_SECONDS = 15.0


def renew_presence(store: Store, gateway_id: str) -> None:
    """Take or renew *gateway_id*'s presence lease (it is alive)."""
    assert store.acquire_lease(presence_lease(gateway_id), gateway_id, PRESENCE_LEASE_SECONDS)

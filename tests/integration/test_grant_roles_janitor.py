"""Grant roles and their janitor in this process, against a real PostgreSQL 15
and a real store: what the daemon tests cannot reach from outside.

Here the generated password can be caught as it is made (the daemon keeps it in
memory only), to prove that it signs in as the role and appears nowhere in the
server's log; a grant id is known before its role is made, so a role of the
same name can be put in the way; and the janitor's retries are driven sweep by
sweep.
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import APP_DATABASE
from harness import unique

import gateway.credentials.ephemeral.roles as roles_module
from gateway.access.ports import SessionRecord
from gateway.app.runtime import StoreThread
from gateway.credentials.ephemeral import EphemeralRoles, EphemeralSettings
from gateway.credentials.secretbox import SecretBox
from gateway.credentials.targets import Credentials
from gateway.errors import InvalidRequest
from gateway.reasons import SessionEndReason
from gateway.store import Store
from gateway.testing.pgcluster import TempCluster
from gateway.testing.pgconf import sql_ident, sql_literal

RESOURCE = "prod"


class MovableClock:
    """Now, or a moment a test sets."""

    def __init__(self) -> None:
        self.now: datetime | None = None

    def __call__(self) -> datetime:
        return self.now or datetime.now(UTC)


@dataclass
class World:
    pg: TempCluster
    store: Store
    db: StoreThread
    roles: EphemeralRoles
    template: str
    rotator: str
    #: every password the roles service generated, in order
    generated: list[str]
    clock: MovableClock

    def open_session(self, requester: str = "alice", minutes: int = 60) -> SessionRecord:
        return self.store.create_session(
            requester=requester,
            resource=RESOURCE,
            account="eph",
            listen_host="127.0.0.1",
            expires_at=datetime.now(UTC) + timedelta(minutes=minutes),
        )

    def end(self, session: SessionRecord) -> SessionRecord:
        ended = self.store.end_session(session.id, reason=SessionEndReason.CLIENT_ENDED)
        self.roles.ended(ended)
        return ended

    def sql(self, query: str, database: str = "postgres") -> str:
        return self.pg.admin_sql(query, database)

    def role(self, name: str, columns: str = "rolcanlogin") -> str:
        return self.sql(f"SELECT {columns} FROM pg_roles WHERE rolname = {sql_literal(name)}")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(f"sqlite:///{tmp_path / 'state.db'}", SecretBox(secrets.token_bytes(32))) as s:
        yield s


@pytest.fixture
async def world(
    pg: TempCluster, store: Store, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[World]:
    template, rotator = unique("tmpl"), unique("rotator")
    password = "rot-" + os.urandom(9).hex()
    pg.admin_sql(
        f"CREATE ROLE {sql_ident(template)} NOLOGIN;\n"
        f"GRANT CONNECT ON DATABASE {APP_DATABASE} TO {sql_ident(template)};\n"
        f"CREATE ROLE {sql_ident(rotator)} LOGIN CREATEROLE PASSWORD {sql_literal(password)};\n"
        f"GRANT CONNECT ON DATABASE {APP_DATABASE} TO {sql_ident(rotator)};",
        redact=[password],
    )
    pg.admin_sql(f"GRANT USAGE, CREATE ON SCHEMA public TO {sql_ident(template)};", APP_DATABASE)
    store.add_resource(
        RESOURCE,
        pg.host,
        pg.port,
        APP_DATABASE,
        ssl_mode="verify-full",
        ca_cert=pg.ca_cert_path.read_text(),
    )
    store.set_rotation_credential(RESOURCE, rotator, password)
    store.add_ephemeral_account(RESOURCE, "eph", template, None)
    generated: list[str] = []
    real = roles_module.generate_password

    def catch(length: int, alphabet: str) -> str:
        generated.append(real(length, alphabet))
        return generated[-1]

    monkeypatch.setattr(roles_module, "generate_password", catch)
    db = StoreThread()
    clock = MovableClock()
    roles = EphemeralRoles(
        store,
        db,
        Credentials(store, db),
        EphemeralSettings(
            connect_timeout=10,
            password_length=32,
            password_alphabet=string.ascii_letters + string.digits,
            retry_first_delay_seconds=0.01,
            retry_max_delay_seconds=0.01,
            gateway_id="gw-test",
        ),
        clock=clock,
    )
    try:
        yield World(pg, store, db, roles, template, rotator, generated, clock)
    finally:
        await roles.close()
        db.shutdown()


async def test_a_grant_role_signs_in_with_a_password_the_server_never_sees(
    world: World, pg: TempCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_from = pg.log_size()
    with pg.server_settings(log_statement="all", log_min_error_statement="info"):
        session = world.open_session()
        await world.roles.prepare(session)
        [password] = world.generated
        target = world.roles.credentials.grant_target(session.id)
        assert target is not None and (target.username, target.password) == (
            session.username,
            password,
        )
        # The password signs in as the role, directly (not through pam).
        with psycopg.connect(
            pg.dsn(session.username, password, APP_DATABASE), autocommit=True
        ) as conn:
            assert conn.execute("select current_user").fetchone() == (session.username,)
        server_log = pg.read_log(log_from)
    assert f'CREATE ROLE "{session.username}" LOGIN PASSWORD \'SCRAM-SHA-256$4096:' in server_log
    assert password not in server_log
    valid_until, comment = world.role(
        session.username, "rolvaliduntil, shobj_description(oid, 'pg_authid')"
    ).split("|")
    assert datetime.fromisoformat(valid_until) == (
        session.expires_at + timedelta(seconds=60)
    ).replace(microsecond=0)
    assert comment == f"pam gateway gw-test grant {session.id}"

    # An extension moves VALID UNTIL with it.
    later = world.store.extend_session(
        session.id, expires_at=session.expires_at + timedelta(hours=1)
    )
    world.roles.expiry_moved(later)
    await world.roles.close()  # lets the change finish
    moved = world.role(session.username, "rolvaliduntil")
    assert datetime.fromisoformat(moved) == (later.expires_at + timedelta(seconds=60)).replace(
        microsecond=0
    )

    world.end(later)
    assert world.roles.credentials.grant_target(session.id) is None
    assert await world.roles.janitor.sweep() == 1
    assert world.role(session.username) == ""
    assert world.store.unfinished_ephemeral_roles() == []
    # Nor does the store (its file and write-ahead log) or anything this process printed.
    stored = b"".join(f.read_bytes() for f in tmp_path.glob("state.db*"))
    assert password.encode() not in stored
    printed = capsys.readouterr()
    assert "grant_role_created" in printed.out + printed.err  # the log is in there
    assert password not in printed.out + printed.err


async def test_a_same_named_role_that_is_not_pam_s_is_refused_and_left_alone(
    world: World,
) -> None:
    session = world.open_session(requester="mallory")
    name = session.username
    secret_password = "theirs-" + os.urandom(6).hex()
    world.sql(
        f"CREATE ROLE {sql_ident(name)} LOGIN PASSWORD {sql_literal(secret_password)};\n"
        f"GRANT {sql_ident(world.template)} TO {sql_ident(name)};"
    )
    before = world.role(name, "rolcanlogin, rolpassword, rolvaliduntil")

    with pytest.raises(InvalidRequest) as refused:
        await world.roles.prepare(session)
    assert refused.value.message == (
        f"cannot make this grant's role '{name}' on {RESOURCE}: a role of that name already"
        " exists (not a member of pam_managed, so not pam's); nothing was changed"
    )
    assert world.role(name, "rolcanlogin, rolpassword, rolvaliduntil") == before
    assert world.generated == []
    assert world.store.unfinished_ephemeral_roles() == []
    assert world.roles.credentials.grant_target(session.id) is None

    # Had it appeared between the check and the CREATE ROLE, the janitor would
    # find the grant's row and still leave the role alone.
    world.store.record_ephemeral_role(
        name, resource=RESOURCE, account="eph", session_id=session.id, cleanup_after_seconds=None
    )
    world.end(session)
    assert await world.roles.janitor.sweep() == 1
    assert world.role(name, "rolcanlogin, rolpassword, rolvaliduntil") == before
    assert world.store.unfinished_ephemeral_roles() == []
    world.sql(f"DROP ROLE {sql_ident(name)}")


async def test_a_drop_refused_by_the_server_is_retried_until_it_succeeds(
    world: World, pg: TempCluster
) -> None:
    session = world.open_session()
    await world.roles.prepare(session)
    # A privilege in another database: DROP OWNED acts on this database only,
    # so DROP ROLE is refused (the documented limitation).
    other = unique("otherdb")
    pg.create_database(other)
    world.sql(
        f"CREATE TABLE t (id int); GRANT SELECT ON t TO {sql_ident(session.username)};", other
    )
    world.end(session)
    assert await world.roles.janitor.sweep() == 0
    [waiting] = world.store.unfinished_ephemeral_roles()
    assert waiting.attempts == 1 and waiting.disabled_at is not None
    assert waiting.last_error is not None
    assert "could not drop it: role" in waiting.last_error
    assert "cannot be dropped because some objects depend on it" in waiting.last_error
    assert world.role(session.username) == "f"  # it cannot sign in meanwhile

    world.sql(f"DROP DATABASE {sql_ident(other)}")
    await _sweep_until_settled(world)
    assert world.role(session.username) == ""


async def test_with_cleanup_after_the_role_is_disabled_at_the_end_and_dropped_later(
    world: World, pg: TempCluster
) -> None:
    world.store.add_ephemeral_account(RESOURCE, "kept", world.template, 86400)
    session = world.store.create_session(
        requester="alice",
        resource=RESOURCE,
        account="kept",
        listen_host="127.0.0.1",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    await world.roles.prepare(session)
    live = psycopg.connect(
        pg.dsn(session.username, world.generated[0], APP_DATABASE), autocommit=True
    )
    ended = world.end(session)
    # At the end: no sign-in and no backend left; the role stays for a day.
    assert await world.roles.janitor.sweep() == 0
    [row] = world.store.unfinished_ephemeral_roles()
    assert row.drop_after == ended.ended_at + timedelta(days=1)
    assert world.role(session.username) == "f"
    with pytest.raises(psycopg.OperationalError):
        live.execute("select 1")
    live.close()
    assert (
        world.sql(
            f"SELECT count(*) FROM pg_stat_activity WHERE usename = {sql_literal(session.username)}"
        )
        == "0"
    )
    # Not looked at again before it is due...
    assert world.store.ephemeral_roles_due(datetime.now(UTC)) == []
    assert await world.roles.janitor.sweep() == 0
    assert world.role(session.username) == "f"
    # ... and dropped once it is.
    world.clock.now = datetime.now(UTC) + timedelta(days=1, minutes=1)
    assert await world.roles.janitor.sweep() == 1
    assert world.role(session.username) == ""


async def _sweep_until_settled(world: World) -> None:
    """Sweep until nothing is left to drop (each retry is due within 10 ms)."""
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    while world.store.unfinished_ephemeral_roles():
        assert datetime.now(UTC) < deadline, world.store.unfinished_ephemeral_roles()
        await world.roles.janitor.sweep()
